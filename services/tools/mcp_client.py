"""MCP servers as tools: one long-lived connection per configured server, its tools registered as <server>.<tool>."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from services.common.config import McpServerConfig
from services.tools.registry import Tool, ToolDefinitionError, ToolFailure, ToolRegistry

log = logging.getLogger(__name__)

# How long starting a server (spawn or connect, initialize, list its tools) may take before the attempt fails.
CONNECT_TIMEOUT_SECONDS = 30.0
# A server whose tools were never listed is retried in the background after this, doubling up to the maximum.
_FIRST_RETRY_SECONDS = 1.0
_MAX_RETRY_SECONDS = 60.0
# How long close() waits for a server to shut down (the SDK gives a stdio server ~4 s to exit) before cancelling.
_CLOSE_TIMEOUT_SECONDS = 10.0
_MAX_ERROR_CHARS = 500

ToolsListed = Callable[["McpServerConnection", list[mcp_types.Tool]], None]


@dataclass
class _Call:
    tool: str
    arguments: dict[str, Any]
    future: asyncio.Future[mcp_types.CallToolResult]


class McpServerConnection:
    """The connection to one MCP server, owned by one task.

    The SDK's transports and session are anyio context managers that must be entered and exited in the same task,
    so a single task (``start``) opens them, serves calls sent to it through a stream (each call in its own child
    task, so a slow call never holds up another), and closes them. When the connection ends (a stdio server that
    crashed, an HTTP server that went away) the task reconnects on the next call; a server that never came up is
    retried in the background with backoff. ``on_listed`` receives the server's tools after each (re)connection.
    """

    def __init__(self, config: McpServerConfig, on_listed: ToolsListed) -> None:
        self.config = config
        self.name = config.name
        self._on_listed = on_listed
        self._send: MemoryObjectSendStream[_Call]
        self._receive: MemoryObjectReceiveStream[_Call]
        self._send, self._receive = anyio.create_memory_object_stream[_Call](math.inf)
        self._task: asyncio.Task[None] | None = None
        self._serving: TaskGroup | None = None
        self._listed_once = False
        self._closing = False
        self.attempted = asyncio.Event()
        """Set once the first connection attempt has ended (tools listed or failed)."""
        self.error: str | None = None
        """Why the last connection attempt failed; None once the server listed its tools."""

    def start(self) -> None:
        """Starts the owning task; it connects in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._own(), name=f"mcp-server-{self.name}")

    async def call(self, tool: str, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        """The server's result of ``tool``; ToolFailure when the server is unavailable or the connection drops.

        Cancelling the caller cancels the request on the server's session.
        """
        if self._task is None or self._task.done():
            raise ToolFailure(f"MCP server {self.name!r} is not running (the tools service is shutting down)")
        future: asyncio.Future[mcp_types.CallToolResult] = asyncio.get_running_loop().create_future()
        self._send.send_nowait(_Call(tool, arguments, future))
        return await future

    async def close(self) -> None:
        """Cancels calls in flight, closes the session and stops a stdio server's process."""
        self._closing = True
        self._send.close()
        if self._serving is not None:
            self._serving.cancel_scope.cancel()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=_CLOSE_TIMEOUT_SECONDS)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=_CLOSE_TIMEOUT_SECONDS)

    async def _own(self) -> None:
        failures = 0
        waking: _Call | None = None
        while not self._closing:
            try:
                waking = await self._connected(waking)
                failures = 0
            except Exception as e:
                reason = _reason(e)
                self.error = reason
                failures += 1
                retry = "on the next call" if self._listed_once else f"in {self._retry_after(failures):g}s"
                log.warning("MCP server %r: connection failed (%s); retrying %s", self.name, reason, retry)
                self._fail_waiting(waking, f"MCP server {self.name!r} is unavailable: {reason}")
                waking = None
                self.attempted.set()
            if waking is None and not self._closing:
                try:
                    waking = await self._next_call(None if self._listed_once else self._retry_after(failures))
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return

    @staticmethod
    def _retry_after(failures: int) -> float:
        return min(_FIRST_RETRY_SECONDS * 2 ** max(failures - 1, 0), _MAX_RETRY_SECONDS)

    async def _next_call(self, timeout: float | None) -> _Call | None:
        """The next call (it triggers a reconnection), or None after ``timeout``; EndOfStream once closed."""
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            return await self._receive.receive()
        return None

    def _fail_waiting(self, waking: _Call | None, message: str) -> None:
        """Fails the call that asked for the connection and those queued behind it, so none waits for a retry."""
        calls = [waking] if waking is not None else []
        while True:
            try:
                calls.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        for call in calls:
            if not call.future.done():
                call.future.set_exception(ToolFailure(message))

    async def _connected(self, waking: _Call | None) -> _Call | None:
        """One connection's life: open, list tools, serve calls until it ends or ``close``, then close it.

        Returns a call that arrived after the connection ended, for the next connection to serve.
        """
        ended = anyio.Event()
        carried: _Call | None = None
        async with contextlib.AsyncExitStack() as stack:
            read, write = await stack.enter_async_context(self._transport())
            relay_send, relay_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            group = await stack.enter_async_context(anyio.create_task_group())
            group.start_soon(_relay, read, relay_send, ended)
            session = await stack.enter_async_context(ClientSession(relay_receive, write))
            with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
                await session.initialize()
                tools = await _list_tools(session)
            self._listed_once = True
            self.error = None
            log.info("MCP server %r: connected, %d tools", self.name, len(tools))
            self._on_listed(self, tools)
            self.attempted.set()
            self._serving = group
            group.start_soon(_cancel_when, ended, group)
            call = waking
            while call is not None or not ended.is_set():
                if call is None:
                    try:
                        call = await self._receive.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                if ended.is_set():
                    carried = call
                    break
                group.start_soon(self._serve, session, call, ended)
                call = None
            group.cancel_scope.cancel()
        self._serving = None
        if ended.is_set() and not self._closing:
            log.warning("MCP server %r: the connection ended; reconnecting on the next call", self.name)
        return carried

    async def _serve(self, session: ClientSession, call: _Call, ended: anyio.Event) -> None:
        future = call.future
        try:
            with anyio.CancelScope() as scope:
                future.add_done_callback(lambda done: scope.cancel() if done.cancelled() else None)
                if future.done():
                    return
                try:
                    result = await session.call_tool(call.tool, call.arguments)
                except MCPError as e:
                    if e.code == mcp_types.CONNECTION_CLOSED:
                        ended.set()
                    if not future.done():
                        future.set_exception(ToolFailure(f"MCP server {self.name!r}: {_shorten(e.message)}"))
                except Exception as e:
                    # Anything but an MCP error response means the connection is suspect: open a fresh one.
                    ended.set()
                    if not future.done():
                        future.set_exception(ToolFailure(f"MCP server {self.name!r} failed: {_reason(e)}"))
                else:
                    if not future.done():
                        future.set_result(result)
        finally:
            if not future.done():
                future.set_exception(ToolFailure(f"MCP server {self.name!r}: the connection closed during the call"))

    @contextlib.asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[Any, Any]]:
        config = self.config
        if config.command is not None:
            parameters = StdioServerParameters(command=config.command, args=config.args, env=config.env or None)
            async with stdio_client(parameters) as streams:
                yield streams
        else:
            assert config.url is not None  # one of the two, checked by McpServerConfig
            async with (
                create_mcp_http_client(headers=config.headers or None) as http,
                streamable_http_client(config.url, http_client=http) as streams,
            ):
                yield streams


async def _relay(
    source: AsyncIterator[SessionMessage | Exception],
    sink: MemoryObjectSendStream[SessionMessage | Exception],
    ended: anyio.Event,
) -> None:
    """Passes the server's messages to the session and sets ``ended`` when the transport closes (a crash, even
    when no call is in flight, so the next call reconnects instead of failing on a dead connection)."""
    try:
        async with sink:
            async for message in source:
                await sink.send(message)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        ended.set()


async def _cancel_when(ended: anyio.Event, group: TaskGroup) -> None:
    await ended.wait()
    group.cancel_scope.cancel()


async def _list_tools(session: ClientSession) -> list[mcp_types.Tool]:
    result = await session.list_tools()
    tools = list(result.tools)
    while result.next_cursor is not None:
        result = await session.list_tools(params=mcp_types.PaginatedRequestParams(cursor=result.next_cursor))
        tools.extend(result.tools)
    return tools


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _reason(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return _reason(error.exceptions[0])
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS:g}s"
    return _shorten(f"{type(error).__name__}: {error}")


def result_value(result: mcp_types.CallToolResult) -> Any:
    """A tool result as a JSON value: structuredContent when present, else its text (one block: a string, several:
    a list); other blocks (images, audio, resources) are described, not inlined. ToolFailure with the text when the
    server flagged an error."""
    parts: list[Any] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            parts.append({"type": block.type, "mime_type": block.mime_type, "bytes_base64": len(block.data)})
        else:
            parts.append(block.model_dump(mode="json", by_alias=True, exclude_none=True))
    if result.is_error:
        text = "\n".join(part for part in parts if isinstance(part, str))
        raise ToolFailure(text or "the MCP server reported an error without a message")
    if result.structured_content is not None:
        return result.structured_content
    return parts[0] if len(parts) == 1 else parts


def input_schema(tool: mcp_types.Tool) -> dict[str, Any]:
    """The tool's inputSchema as an object schema (a root without a type is an object by the MCP spec)."""
    schema = dict(tool.input_schema)
    schema.setdefault("type", "object")
    return schema


class McpToolset:
    """MCP servers whose tools are offered by ``registry``: ``start`` connects those added so far in the background
    (and ``add`` after it connects the new one at once) and registers each server's tools as <server>.<tool> as soon
    as it lists them; ``remove`` disconnects one and unregisters its tools; ``close`` disconnects them all.

    A tool the registry refuses (a name it does not accept, a clash with a registered tool, a schema that is not
    valid JSON Schema) is left out with a warning; a server that is down never stops the others or the service.
    A tool named in its server's ``approval_required`` (or every tool, with "*") requires approval.
    """

    def __init__(self, servers: Sequence[McpServerConfig], registry: ToolRegistry) -> None:
        self.registry = registry
        self.connections: dict[str, McpServerConnection] = {}
        self._started = False
        self._refused: set[str] = set()
        for server in servers:
            self.add(server)

    def add(self, server: McpServerConfig) -> McpServerConnection:
        """Adds a server (connected at once when the toolset has started); ValueError if its name is taken."""
        if server.name in self.connections:
            raise ValueError(f"MCP server {server.name!r} is already added")
        connection = self.connections[server.name] = McpServerConnection(server, self._register)
        if self._started:
            connection.start()
        return connection

    async def remove(self, name: str) -> None:
        """Disconnects server ``name`` (calls in flight fail) and unregisters its tools."""
        connection = self.connections.pop(name)
        for tool in self.tool_names(connection):
            self.registry.unregister(tool)
        self._refused = {refused for refused in self._refused if not refused.startswith(f"{name}.")}
        await connection.close()

    def tool_names(self, connection: McpServerConnection) -> list[str]:
        """The registered tools of ``connection``."""
        return [
            tool.name
            for tool in self.registry.list()
            if isinstance(tool.handler, _McpHandler) and tool.handler.connection is connection
        ]

    async def start(self) -> None:
        self._started = True
        for connection in self.connections.values():
            connection.start()

    async def wait_attempted(self) -> None:
        """Returns once every server has been connected or has failed its first attempt."""
        await asyncio.gather(*(connection.attempted.wait() for connection in self.connections.values()))

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.connections.values()))

    def _register(self, connection: McpServerConnection, tools: list[mcp_types.Tool]) -> None:
        marked = set(connection.config.approval_required)
        for listed in tools:
            name = f"{connection.name}.{listed.name}"
            if name in self._refused or self._is_ours(name, connection):
                continue
            tool = Tool(
                name=name,
                description=listed.description or listed.title or f"{listed.name} of MCP server {connection.name}",
                input_schema=input_schema(listed),
                handler=_McpHandler(connection, listed.name),
                timeout_seconds=connection.config.timeout_seconds,
                requires_approval="*" in marked or listed.name in marked,
                # The server's own hints: a read-only or idempotent tool may run again after a crash.
                idempotent=bool(
                    listed.annotations and (listed.annotations.read_only_hint or listed.annotations.idempotent_hint)
                ),
            )
            try:
                self.registry.register(tool)
            except ToolDefinitionError as e:
                self._refused.add(name)
                log.warning("MCP server %r: tool %r left out: %s", connection.name, listed.name, e)

    def _is_ours(self, name: str, connection: McpServerConnection) -> bool:
        """Whether ``name`` is already registered for this connection (listed again after a reconnection)."""
        if name not in self.registry:
            return False
        handler = self.registry.get(name).handler
        return isinstance(handler, _McpHandler) and handler.connection is connection


@dataclass(frozen=True)
class _McpHandler:
    connection: McpServerConnection
    tool: str

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        return result_value(await self.connection.call(self.tool, arguments))

"""The tools service as an MCP server: its registry offered over MCP streamable HTTP, calls run by the ToolExecutor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Generator
from typing import Any

import mcp_types
import uvicorn
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from services.common import InvalidArgumentError, NotFoundError, PermissionDeniedError
from services.common.config import McpEndpointConfig
from services.tools.executor import Execution, ToolCall, ToolExecutor

log = logging.getLogger(__name__)

SERVER_NAME = "meshpilot-tools"
# On close, how long calls in flight may finish before they are cancelled and answered with an error (the gRPC side
# drains with its own, longer grace; an MCP client has no idempotency key to retry with, so it is told).
_CLOSE_GRACE_SECONDS = 1.0
# How long uvicorn then waits for responses before it cancels their requests: only a backstop, as calls end first.
_UVICORN_GRACE_SECONDS = 5
_MAX_MESSAGE_CHARS = 500
_INSTRUCTIONS = (
    "MeshPilot's tools. A tool that requires a human's approval is listed but cannot be called over MCP: "
    "it runs only in a MeshPilot agent run, where a human approves each call."
)

_Context = ServerRequestContext[None, Any]


class McpEndpoint:
    """Serves a ToolExecutor's tools over MCP streamable HTTP at ``http://host:port/path``.

    tools/list reads ``executor.tools()`` at every request, so tools registered while serving (an MCP server's,
    connected in the background) appear in the next list. tools/call goes through ``executor.execute``: the same
    schema validation, time limits and approval rules as ExecuteTool over gRPC. An unknown tool is an MCP error
    (INVALID_PARAMS, naming the available tools); everything else the client can act on (arguments that break the
    schema, a tool that requires approval, the tool's own failure or timeout) is a result with ``isError`` and the
    reason. Nothing unexpected reaches the client beyond an incident id that is logged with the trace.

    Stateless streamable HTTP with JSON responses, as the SDK recommends behind a load balancer: no session lives
    in the process, so any replica can answer any request, and no call needs server-to-client messages. Requests
    on the 2026-07-28 protocol, which has no sessions, are served the same way. Bound to 127.0.0.1 by default,
    where the SDK also refuses requests whose Host or Origin is not local (DNS rebinding); there is no
    authentication yet, so bind another address only on a trusted network.
    """

    def __init__(self, executor: ToolExecutor, config: McpEndpointConfig) -> None:
        self.executor = executor
        self.config = config
        self._mcp: Server[None] = Server(
            SERVER_NAME,
            instructions=_INSTRUCTIONS,
            lifespan=self._lifespan,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self._ready = asyncio.Event()
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[Execution]] = set()
        self._port = config.port

    @property
    def url(self) -> str:
        """The endpoint's URL, with the bound port once started."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self._port}{self.config.path}"

    async def start(self) -> None:
        """Binds host:port (0 picks a free port) and serves in a background task of the running loop.

        Returns once requests are served; raises OSError naming the address when it cannot be bound.
        """
        if self._task is not None:
            raise RuntimeError("the MCP endpoint is already started")
        host, port = self.config.host, self.config.port
        # Bound here rather than by uvicorn, which exits the process when it cannot bind.
        try:
            listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            raise OSError(
                e.errno,
                f"the MCP endpoint cannot listen on {self.url} ({e.strerror or e}); change tools.mcp_endpoint.host "
                "or .port, or set tools.mcp_endpoint.enabled to false",
            ) from e
        self._port = listener.getsockname()[1]
        app = self._mcp.streamable_http_app(
            streamable_http_path=self.config.path,
            stateless_http=True,
            json_response=True,
            host=self.config.host,
        )
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            # The service configures logging; uvicorn's records propagate to it.
            log_config=None,
            ws="none",
            timeout_graceful_shutdown=_UVICORN_GRACE_SECONDS,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]), name="mcp-endpoint")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            listener.close()
            self._task.result()  # its exception, if it raised one
            raise RuntimeError(f"the MCP endpoint at {self.url} stopped while starting")
        log.info("MCP endpoint serving %d tools at %s", len(self.executor.tools()), self.url)

    async def close(self) -> None:
        """Stops serving: idle connections close at once; calls in flight get a second to finish, then are
        cancelled and answered with an error saying so."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        if self._calls:
            _, running = await asyncio.wait(self._calls, timeout=_CLOSE_GRACE_SECONDS)
            for run in running:
                run.cancel()
        await self._task

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Server[None]) -> AsyncIterator[None]:
        # Entered once the streamable-HTTP session manager runs: the listening socket is served from here on.
        self._ready.set()
        yield

    async def _list_tools(
        self, _: _Context, params: mcp_types.PaginatedRequestParams | None
    ) -> mcp_types.ListToolsResult:
        tools = [
            mcp_types.Tool(name=tool.name, description=tool.description, input_schema=tool.input_schema)
            for tool in self.executor.tools()
        ]
        # One page (a registry holds tens of tools); ttl 0: the list changes as tools register, so it is not cached.
        return mcp_types.ListToolsResult(tools=tools, ttl_ms=0)

    async def _call_tool(self, _: _Context, params: mcp_types.CallToolRequestParams) -> mcp_types.CallToolResult:
        name = params.name
        run = asyncio.ensure_future(self.executor.execute(ToolCall(name=name, arguments=params.arguments)))
        self._calls.add(run)
        run.add_done_callback(self._calls.discard)
        try:
            execution = await run
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the request itself was cancelled (uvicorn's shutdown backstop): it is not answered
            return _error_result(
                f"the tools service shut down during the call of tool {name!r}; whether it took effect is unknown"
            )
        except NotFoundError as e:
            # The spec's error for an unknown tool; the message lists the available ones.
            raise MCPError(code=mcp_types.INVALID_PARAMS, message=_bounded(str(e))) from None
        except InvalidArgumentError as e:
            return _error_result(str(e))
        except PermissionDeniedError:
            return _error_result(
                f"tool {name!r} requires a human's approval, which an MCP call cannot carry; it can only be "
                "called in a MeshPilot agent run, where a human approves each call"
            )
        except Exception as e:
            incident = uuid.uuid4().hex[:12]
            log.error("MCP call of tool %r failed (incident %s)", name, incident, exc_info=e)
            raise MCPError(
                code=mcp_types.INTERNAL_ERROR,
                message=f"internal error in the tools service (incident {incident}); see its log",
            ) from None
        outcome = execution.outcome
        if outcome.error is not None:
            return _error_result(outcome.error.message)
        text = json.dumps(outcome.result, ensure_ascii=False)
        structured = outcome.result if isinstance(outcome.result, dict) else None
        return mcp_types.CallToolResult(content=[mcp_types.TextContent(text=text)], structured_content=structured)


class _EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process: the stock one takes SIGTERM and SIGINT for
    itself, so the service would stop serving MCP without draining gRPC or closing its stores."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bounded(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _error_result(message: str) -> mcp_types.CallToolResult:
    return mcp_types.CallToolResult(content=[mcp_types.TextContent(text=_bounded(message))], is_error=True)

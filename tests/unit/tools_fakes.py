"""Fakes and helpers shared by the tools service's idempotency and approval tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, ServerConfig, ToolsConfig
from services.common.approval import ApprovalSigner
from services.tools import OutcomeStore, Tool, ToolExecutor, ToolFailure, ToolRegistry, create_server

SIGNING_KEY = b"0123456789abcdef0123456789abcdef"
ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["text"],
    "additionalProperties": False,
}


class CountingHandler:
    """A tool handler that counts its runs; with ``hold`` it waits for ``release()``, so a test can act mid-call.

    ``finished`` counts runs that reached their end (a cancelled run does not).
    """

    def __init__(self, *, hold: bool = False, fail: bool = False) -> None:
        self.calls = 0
        self.finished = 0
        self.started = asyncio.Event()
        self._gate = asyncio.Event()
        self._fail = fail
        if not hold:
            self._gate.set()

    def release(self) -> None:
        self._gate.set()

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        self.calls += 1
        self.started.set()
        await self._gate.wait()
        self.finished += 1
        if self._fail:
            raise ToolFailure(f"failed on {arguments['text']}")
        return {"text": arguments["text"], "run": self.calls}


def make_registry(*tools: tuple[str, CountingHandler] | Tool) -> ToolRegistry:
    """A registry of echo tools (name, handler) or given Tools."""
    registry = ToolRegistry(default_timeout_seconds=5, max_timeout_seconds=5)
    for tool in tools:
        if isinstance(tool, tuple):
            name, handler = tool
            tool = Tool(name, f"The {name} tool.", ECHO_SCHEMA, handler)
        registry.register(tool)
    return registry


def make_executor(
    db_path: Path,
    registry: ToolRegistry,
    *,
    signer: ApprovalSigner | None = None,
    approval_required: Iterable[str] = (),
) -> ToolExecutor:
    return ToolExecutor(
        registry,
        store=OutcomeStore(db_path),
        signer=signer or ApprovalSigner(SIGNING_KEY),
        approval_required=approval_required,
    )


def mesh_config(data_dir: Path, **tools: Any) -> MeshConfig:
    return MeshConfig(data_dir=data_dir, tools=ToolsConfig(server=ServerConfig(port=0, metrics=False), **tools))


@asynccontextmanager
async def serving(config: MeshConfig, registry: ToolRegistry) -> AsyncIterator[tools_pb2_grpc.ToolsServiceStub]:
    """A stub of a started tools server over ``registry``."""
    server = create_server(config, registry=registry)
    await server.start()
    await server.set_serving()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield tools_pb2_grpc.ToolsServiceStub(channel)
    finally:
        await server.stop(0)


def execute_request(name: str, arguments: dict[str, Any], **fields: Any) -> tools_pb2.ExecuteToolRequest:
    request = tools_pb2.ExecuteToolRequest(call_id="call-1", name=name, **fields)
    json_format.ParseDict(arguments, request.arguments)
    return request


async def eventually(condition: Any, *, timeout: float = 5.0) -> None:
    """Waits until ``condition()`` (sync or async) is true; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)

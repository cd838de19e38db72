"""ToolSourceService: the tools service's tool sources at the front door, each call forwarded for the caller's
tenant (the tools service keeps a tenant's sources to itself)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshpilot.planner.v1 import tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import rpc_error_to_mesh_error
from services.common.auth import TENANT_METADATA, current_principal

T = TypeVar("T")
# Registering an MCP server waits for it to start and list its tools (the tools service allows 30 s).
REGISTER_TIMEOUT_S = 45.0
LOOKUP_TIMEOUT_S = 10.0


class ToolSourceServicer(tool_sources_pb2_grpc.ToolSourceServiceServicer):
    """Forwards to ``tools`` with the caller's tenant; the tools service's status codes pass through."""

    def __init__(self, tools: tools_pb2_grpc.ToolsServiceStub) -> None:
        self._tools = tools

    async def _forward(self, call: Callable[[tuple[tuple[str, str], ...]], Awaitable[T]]) -> T:
        try:
            return await call(((TENANT_METADATA, current_principal().tenant),))
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_mesh_error(e, "tools") from e

    async def RegisterToolSource(
        self, request: tools_pb2.RegisterToolSourceRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ToolSource:
        return await self._forward(
            lambda metadata: self._tools.RegisterToolSource(request, metadata=metadata, timeout=REGISTER_TIMEOUT_S)
        )

    async def ListToolSources(
        self, request: tools_pb2.ListToolSourcesRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolSourcesResponse:
        return await self._forward(
            lambda metadata: self._tools.ListToolSources(request, metadata=metadata, timeout=LOOKUP_TIMEOUT_S)
        )

    async def UnregisterToolSource(
        self, request: tools_pb2.UnregisterToolSourceRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.UnregisterToolSourceResponse:
        return await self._forward(
            lambda metadata: self._tools.UnregisterToolSource(request, metadata=metadata, timeout=LOOKUP_TIMEOUT_S)
        )

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        return await self._forward(
            lambda metadata: self._tools.ListTools(request, metadata=metadata, timeout=LOOKUP_TIMEOUT_S)
        )

"""The tools service process: its registry of built-in tools, the gRPC server, and startup/shutdown of its clients."""

from __future__ import annotations

from meshpilot.knowledge.v1 import knowledge_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, MeshServer, serve
from services.common.server import ServiceBinding
from services.tools.builtin import KnowledgeClient, builtin_tools
from services.tools.registry import ToolRegistry
from services.tools.servicer import ToolsServicer

SERVICE_NAME = tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name


def default_registry(config: MeshConfig, knowledge: KnowledgeClient | None) -> ToolRegistry:
    """A registry with config.tools' timeouts holding every built-in tool (knowledge-graph ones when ``knowledge``)."""
    registry = ToolRegistry(
        default_timeout_seconds=config.tools.default_timeout_seconds,
        max_timeout_seconds=config.tools.max_timeout_seconds,
    )
    for tool in builtin_tools(knowledge):
        registry.register(tool)
    return registry


def _build(
    config: MeshConfig,
    registry: ToolRegistry | None,
    knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None,
) -> tuple[MeshServer, KnowledgeClient]:
    knowledge = KnowledgeClient(config.knowledge.server.target(), stub=knowledge_stub)
    registry = registry if registry is not None else default_registry(config, knowledge)
    binding = ServiceBinding(SERVICE_NAME, ToolsServicer(registry), tools_pb2_grpc.add_ToolsServiceServicer_to_server)
    return MeshServer(config.tools.server, [binding]), knowledge


def create_server(
    config: MeshConfig,
    registry: ToolRegistry | None = None,
    knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None = None,
) -> MeshServer:
    """The tools server (not started), serving ``registry`` or the built-in tools.

    The built-in knowledge-graph tools call ``knowledge_stub`` when given (tests), else config.knowledge's target
    through a channel opened on first use (``main`` opens it in startup and closes it on shutdown).
    """
    server, _ = _build(config, registry, knowledge_stub)
    return server


async def main(config: MeshConfig) -> None:
    """Runs the tools service until SIGTERM: opens the knowledge channel in startup and closes it on shutdown."""
    server, knowledge = _build(config, None, None)
    await serve(server, startup=knowledge.open, shutdown=knowledge.close)

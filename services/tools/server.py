"""The tools service process: its registry of built-in tools, the gRPC server, and startup/shutdown of its clients."""

from __future__ import annotations

from meshpilot.knowledge.v1 import knowledge_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, MeshServer, serve
from services.common.approval import ApprovalSigner, load_or_create_key
from services.common.server import ServiceBinding
from services.tools.builtin import KnowledgeClient, builtin_tools
from services.tools.executor import ToolExecutor
from services.tools.idempotency import OutcomeStore
from services.tools.mcp_client import McpToolset
from services.tools.registry import ToolRegistry
from services.tools.sandbox import BubblewrapSandbox
from services.tools.servicer import ToolsServicer

SERVICE_NAME = tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name


def default_registry(config: MeshConfig, knowledge: KnowledgeClient | None) -> ToolRegistry:
    """A registry with config.tools' timeouts holding every built-in tool (knowledge-graph ones when ``knowledge``).

    append_note writes its notebooks under <data_dir>/notes; python runs in a bubblewrap sandbox with
    config.tools.sandbox's limits, and is left out (with a warning) when it is disabled or bubblewrap cannot run here.
    """
    registry = ToolRegistry(
        default_timeout_seconds=config.tools.default_timeout_seconds,
        max_timeout_seconds=config.tools.max_timeout_seconds,
    )
    sandbox = BubblewrapSandbox(config.tools.sandbox) if config.tools.sandbox.enabled else None
    for tool in builtin_tools(knowledge, notes_dir=config.data_dir / "notes", sandbox=sandbox):
        registry.register(tool)
    return registry


def create_executor(config: MeshConfig, registry: ToolRegistry) -> ToolExecutor:
    """The executor over ``registry`` with config's outcome store, approval key (created if missing) and markings.

    Raises ConfigError when tools.approval_required names a tool the registry does not hold.
    """
    assert config.tools.db_path is not None and config.approvals.key_file is not None  # filled in by MeshConfig
    signer = ApprovalSigner(
        load_or_create_key(config.approvals.key_file), ttl_seconds=config.approvals.token_ttl_seconds
    )
    return ToolExecutor(
        registry,
        store=OutcomeStore(config.tools.db_path),
        signer=signer,
        approval_required=config.tools.approval_required,
    )


def _build(
    config: MeshConfig,
    registry: ToolRegistry | None,
    knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None,
) -> tuple[MeshServer, KnowledgeClient, ToolExecutor]:
    knowledge = KnowledgeClient(config.knowledge.server.target(), stub=knowledge_stub)
    registry = registry if registry is not None else default_registry(config, knowledge)
    executor = create_executor(config, registry)
    binding = ServiceBinding(SERVICE_NAME, ToolsServicer(executor), tools_pb2_grpc.add_ToolsServiceServicer_to_server)
    return MeshServer(config.tools.server, [binding]), knowledge, executor


def create_server(
    config: MeshConfig,
    registry: ToolRegistry | None = None,
    knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None = None,
) -> MeshServer:
    """The tools server (not started), serving ``registry`` or the built-in tools.

    The built-in knowledge-graph tools call ``knowledge_stub`` when given (tests), else config.knowledge's target
    through a channel opened on first use (``main`` opens it in startup and closes it on shutdown). Raises
    ConfigError when tools.approval_required names an unknown tool.
    """
    server, _, _ = _build(config, registry, knowledge_stub)
    return server


async def main(config: MeshConfig) -> None:
    """Runs the tools service until SIGTERM: in startup opens the knowledge channel and starts connecting the MCP
    servers of tools.mcp_servers (in the background: their tools appear as each lists them, and one that is down
    never holds up the service); on shutdown lets keyed calls still running store their outcomes, then closes the
    outcome store, the MCP connections and the knowledge channel."""
    server, knowledge, executor = _build(config, None, None)
    mcp = McpToolset(config.tools.mcp_servers, executor.registry)

    async def startup() -> None:
        await knowledge.open()
        await mcp.start()

    async def shutdown() -> None:
        try:
            await executor.close()
        finally:
            try:
                await mcp.close()
            finally:
                await knowledge.close()

    await serve(server, startup=startup, shutdown=shutdown)

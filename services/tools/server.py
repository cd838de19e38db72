"""The tools service process: its registry of built-in tools, the gRPC server, and startup/shutdown of its clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshpilot.knowledge.v1 import knowledge_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, MeshServer, serve
from services.common.approval import ApprovalSigner, load_or_create_key
from services.common.auth import is_loopback
from services.common.server import ServiceBinding
from services.common.tls import server_tls, tls_identity
from services.tools.builtin import KnowledgeClient, builtin_tools
from services.tools.executor import ToolExecutor
from services.tools.idempotency import IdempotencyStore, OutcomeStore
from services.tools.mcp_server import McpEndpoint
from services.tools.pg_stores import PostgresOutcomeStore, PostgresSourceStore
from services.tools.registry import ToolRegistry
from services.tools.sandbox import BubblewrapSandbox
from services.tools.servicer import ToolsServicer
from services.tools.sources import SourceStore, ToolSources, ToolSourceStore

log = logging.getLogger(__name__)

# How long startup waits for the MCP servers' first connection attempts before turning SERVING.
SOURCES_WAIT_SECONDS = 10.0
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


def outcome_store(config: MeshConfig) -> IdempotencyStore:
    """PostgreSQL when tools.database_url is set (replicas share it), else the SQLite file at tools.db_path."""
    assert config.tools.db_path is not None  # filled in by MeshConfig
    if config.tools.database_url:
        # A waiter gives up on another replica's call only after it outlived any run: the longest time limit, the
        # grace a timed-out handler gets, and room to record.
        return PostgresOutcomeStore(config.tools.database_url, wait_seconds=config.tools.max_timeout_seconds + 15)
    return OutcomeStore(config.tools.db_path)


def source_store(config: MeshConfig) -> ToolSourceStore:
    """Where registered tool sources are kept: beside the outcomes, in PostgreSQL or SQLite."""
    assert config.tools.db_path is not None  # filled in by MeshConfig
    if config.tools.database_url:
        return PostgresSourceStore(config.tools.database_url)
    return SourceStore(config.tools.db_path)


def create_executor(
    config: MeshConfig,
    registry: ToolRegistry,
    scoped: Callable[[str], ToolRegistry | None] = lambda tenant: None,
) -> ToolExecutor:
    """The executor over ``registry`` with config's outcome store, approval key (created if missing) and markings.

    Raises ConfigError when tools.approval_required names a tool that is neither registered nor of a declared source.
    """
    assert config.tools.db_path is not None and config.approvals.key_file is not None  # filled in by MeshConfig
    signer = ApprovalSigner(
        load_or_create_key(config.approvals.key_file), ttl_seconds=config.approvals.token_ttl_seconds
    )
    return ToolExecutor(
        registry,
        store=outcome_store(config),
        signer=signer,
        approval_required=config.tools.approval_required,
        sources=[server.name for server in config.tools.mcp_servers] + [api.name for api in config.tools.openapi],
        scoped=scoped,
    )


def allows_registered_commands(config: MeshConfig) -> bool:
    """tools.allow_registered_commands, or (unset) whether the tools service binds only a loopback address."""
    if config.tools.allow_registered_commands is not None:
        return config.tools.allow_registered_commands
    return is_loopback(config.tools.server.host)


class ToolsService:
    """The tools service's parts: the gRPC server over ``registry`` (default: the built-ins), the tool sources, the
    MCP endpoint, and what ``startup`` opens and ``shutdown`` closes.

    The built-in knowledge-graph tools call ``knowledge_stub`` when given (tests), else config.knowledge's target
    through a channel opened in ``startup``. Raises ConfigError when tools.approval_required names an unknown tool.
    """

    def __init__(
        self,
        config: MeshConfig,
        registry: ToolRegistry | None = None,
        knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None = None,
    ) -> None:
        assert config.tools.db_path is not None  # filled in by MeshConfig
        self.config = config
        self.knowledge = KnowledgeClient(
            config.knowledge.server.target(), stub=knowledge_stub, tls=tls_identity(config, "tools")
        )
        registry = registry if registry is not None else default_registry(config, self.knowledge)
        self.sources = ToolSources(
            config.tools,
            registry,
            source_store(config),
            allow_commands=allows_registered_commands(config),
        )
        self.executor = create_executor(config, registry, scoped=self.sources.scoped)
        endpoint = config.tools.mcp_endpoint
        self.mcp_endpoint = McpEndpoint(self.executor, endpoint) if endpoint.enabled else None
        servicer = ToolsServicer(self.executor, self.sources)
        binding = ServiceBinding(SERVICE_NAME, servicer, tools_pb2_grpc.add_ToolsServiceServicer_to_server)
        self.server = MeshServer(config.tools.server, [binding], tls=server_tls(config, "tools"))

    async def startup(self) -> None:
        """Opens the knowledge channel, adds the tool sources and starts the MCP endpoint. MCP servers connect in the
        background; startup waits up to SOURCES_WAIT_SECONDS for their first attempts, so a healthy server's tools
        are there when the service turns SERVING, while one that is down never holds it up for long."""
        # A database that does not connect stops the service here, naming tools.database_url.
        await self.executor.store.open()
        await self.knowledge.open()
        await self.sources.start()
        if self.config.tools.database_url:
            self.sources.follow()  # sources registered or unregistered on other replicas
        try:
            await asyncio.wait_for(self.sources.wait_connected(), SOURCES_WAIT_SECONDS)
        except TimeoutError:
            log.warning(
                "MCP servers still connecting after %gs; serving without their tools for now", SOURCES_WAIT_SECONDS
            )
        if self.mcp_endpoint is not None:
            await self.mcp_endpoint.start()

    async def shutdown(self) -> None:
        """Lets keyed calls still running store their outcomes, then closes everything ``startup`` opened."""
        try:
            if self.mcp_endpoint is not None:
                await self.mcp_endpoint.close()
            await self.executor.close()
        finally:
            try:
                await self.sources.close()
            finally:
                await self.knowledge.close()

    async def start(self) -> None:
        """Starts serving at once (tests): the server, ``startup``, then SERVING."""
        await self.server.start()
        await self.startup()
        await self.server.set_serving()

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.shutdown()


def create_server(
    config: MeshConfig,
    registry: ToolRegistry | None = None,
    knowledge_stub: knowledge_pb2_grpc.KnowledgeServiceStub | None = None,
) -> MeshServer:
    """The gRPC server alone (not started), serving ``registry`` or the built-in tools, without tool sources or the
    MCP endpoint (RegisterToolSource: FAILED_PRECONDITION); ``ToolsService`` has them all. Raises ConfigError when
    tools.approval_required names an unknown tool."""
    knowledge = KnowledgeClient(
        config.knowledge.server.target(), stub=knowledge_stub, tls=tls_identity(config, "tools")
    )
    executor = create_executor(config, registry if registry is not None else default_registry(config, knowledge))
    binding = ServiceBinding(SERVICE_NAME, ToolsServicer(executor), tools_pb2_grpc.add_ToolsServiceServicer_to_server)
    return MeshServer(config.tools.server, [binding], tls=server_tls(config, "tools"))


async def main(config: MeshConfig) -> None:
    """Runs the tools service until SIGTERM; see ``ToolsService.startup`` and ``shutdown``."""
    service = ToolsService(config)
    await serve(service.server, startup=service.startup, shutdown=service.shutdown)

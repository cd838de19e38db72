"""The planner's servicers (PlannerService, AgentService: proto <-> domain over RunManager, AgentCatalog, RunStore),
its factory and its main."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from a2a.types import a2a_pb2_grpc
from google.protobuf import empty_pb2
from prometheus_client import CollectorRegistry

from meshpilot.planner.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    tool_sources_pb2,
    tool_sources_pb2_grpc,
)
from meshpilot.tools.v1 import tools_pb2_grpc
from services.common import InvalidArgumentError, MeshConfig, MeshServer, create_channel, serve
from services.common.approval import ApprovalSigner, load_or_create_key
from services.common.auth import (
    ApiKeyStore,
    Authenticator,
    AuthInterceptor,
    auth_required,
    current_principal,
    is_loopback,
    key_store,
)
from services.common.json_values import message_to_json
from services.common.routing import ReplicaSet
from services.common.server import ServiceBinding
from services.common.tls import server_tls, tls_identity
from services.planner import a2a
from services.planner.agents import AgentCatalog
from services.planner.clients import InferenceLLMClient, ToolsServiceClient
from services.planner.convert import (
    STATES_FROM_PROTO,
    agent_to_proto,
    budget_from_proto,
    definition_from_proto,
    run_to_proto,
    session_to_proto,
    validate_comment,
    validate_task,
)
from services.planner.executor import ExecutorDeps, LLMClient, ToolClient
from services.planner.feedback import validate_feedback
from services.planner.guardrails import Redactor
from services.planner.pg_store import PostgresRunStore
from services.planner.quotas import QuotaInterceptor, TenantQuotas
from services.planner.runs import RunManager
from services.planner.store import JournalStore, RunStore
from services.planner.tool_sources import ToolSourceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
AGENT_SERVICE_NAME = agents_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
TOOL_SOURCE_SERVICE_NAME = tool_sources_pb2.DESCRIPTOR.services_by_name["ToolSourceService"].full_name
MAX_PAGE_SIZE = 500
DEFAULT_USAGE_WINDOW_SECONDS = 3600
MAX_USAGE_WINDOW_SECONDS = 30 * 86_400
DEFAULT_PAGE_SIZE = 50


def _tenant() -> str:
    """The caller's tenant (set by the AuthInterceptor; the default tenant when authentication is off)."""
    return current_principal().tenant


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    """Sessions and runs over gRPC, each call on the caller's tenant's records only (another tenant's are NOT_FOUND).
    Run and WatchRun stream events only after they are journaled."""

    def __init__(
        self,
        config: MeshConfig,
        runs: RunManager,
        store: JournalStore,
        channels: list[grpc.aio.Channel | ReplicaSet] | None = None,
        keys: ApiKeyStore | None = None,
    ) -> None:
        self.config = config
        self.runs = runs
        self.store = store
        self.channels = channels or []
        self.keys = keys

    async def close(self) -> None:
        """Stops driving runs (they resume in the next planner), then closes the stores and this planner's channels."""
        await self.runs.close()
        await self.store.close()
        if self.keys is not None:
            self.keys.close()
        for channel in self.channels:
            await channel.close()

    async def CreateSession(
        self, request: planner_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Session:
        return session_to_proto(await self.store.create_session(tenant=_tenant()))

    async def GetSession(
        self, request: planner_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Session:
        return session_to_proto(await self.store.get_session(request.session_id, tenant=_tenant()))

    async def Run(
        self, request: planner_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.RunEvent]:
        task = validate_task(request.task)
        if request.agent_version < 0:
            raise InvalidArgumentError(f"agent_version is {request.agent_version}; use 1, 2, ... or 0 for the latest")
        tenant = _tenant()
        agent = await self.runs.catalog.get(request.agent, request.agent_version, tenant=tenant)
        budget = budget_from_proto(request.budget, self.runs.budget_of(agent.definition))
        run_id = await self.runs.start(
            request.session_id, task, agent=agent.name, agent_version=agent.version, budget=budget, tenant=tenant
        )
        # The run goes on if this stream breaks: WatchRun(run_id, last sequence) picks it up again.
        async for event in self.runs.watch(run_id, tenant=tenant):
            yield event

    async def WatchRun(
        self, request: planner_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.RunEvent]:
        async for event in self.runs.watch(request.run_id, request.after_sequence, tenant=_tenant()):
            yield event

    async def GetRun(self, request: planner_pb2.GetRunRequest, context: grpc.aio.ServicerContext) -> planner_pb2.Run:
        return run_to_proto(await self.store.get_run(request.run_id, tenant=_tenant()))

    async def ListRuns(
        self, request: planner_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.ListRunsResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgumentError(
                f"page_size is {request.page_size}; use 1 to {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
            )
        if request.state and request.state not in STATES_FROM_PROTO:
            raise InvalidArgumentError(f"state {request.state} is not a RunState; leave it unset for every state")
        runs = await self.store.list_runs(
            state=STATES_FROM_PROTO.get(request.state),
            agent=request.agent,
            session_id=request.session_id,
            limit=request.page_size or DEFAULT_PAGE_SIZE,
            tenant=_tenant(),
        )
        return planner_pb2.ListRunsResponse(runs=[run_to_proto(run) for run in runs])

    async def CancelRun(
        self, request: planner_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Run:
        return run_to_proto(await self.runs.cancel(request.run_id, tenant=_tenant()))

    async def ApproveToolCall(
        self, request: planner_pb2.ApproveToolCallRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Run:
        arguments = message_to_json(request.arguments) if request.HasField("arguments") else None
        return run_to_proto(
            await self.runs.decide(
                request.run_id,
                request.call_id,
                approved=True,
                arguments=arguments,
                comment=validate_comment(request.comment, "comment"),
                tenant=_tenant(),
            )
        )

    async def GetUsage(
        self, request: planner_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Usage:
        if not 0 <= request.window_seconds <= MAX_USAGE_WINDOW_SECONDS:
            raise InvalidArgumentError(
                f"window_seconds is {request.window_seconds}; use 1 to {MAX_USAGE_WINDOW_SECONDS}, or 0 for an hour"
            )
        tenant = _tenant()
        window = request.window_seconds or DEFAULT_USAGE_WINDOW_SECONDS
        runs, usage = await self.store.usage_since(time.time() - window, tenant=tenant)
        limits = self.runs.quotas.limits(tenant)
        return planner_pb2.Usage(
            tenant=tenant,
            window_seconds=window,
            runs=runs,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            active_runs=await self.store.count_active_runs(tenant=tenant),
            max_concurrent_runs=limits.max_concurrent_runs or 0,
            requests_per_minute=limits.requests_per_minute or 0,
            tokens_per_minute=limits.tokens_per_minute or 0,
            tokens_last_minute=self.runs.quotas.tokens_last_minute(tenant),
        )

    async def RateRun(self, request: planner_pb2.RateRunRequest, context: grpc.aio.ServicerContext) -> planner_pb2.Run:
        principal = current_principal()
        feedback = validate_feedback(request.score, request.comment, principal.key_id)
        return run_to_proto(await self.runs.feedback.rate(request.run_id, feedback, tenant=principal.tenant))

    async def RejectToolCall(
        self, request: planner_pb2.RejectToolCallRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Run:
        return run_to_proto(
            await self.runs.decide(
                request.run_id,
                request.call_id,
                approved=False,
                comment=validate_comment(request.reason, "reason"),
                tenant=_tenant(),
            )
        )


class AgentServicer(agents_pb2_grpc.AgentServiceServicer):
    """Agents as versioned data over the AgentCatalog."""

    def __init__(self, catalog: AgentCatalog) -> None:
        self.catalog = catalog

    async def CreateAgent(
        self, request: agents_pb2.CreateAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        definition = definition_from_proto(request.spec)
        return agent_to_proto(await self.catalog.create(request.name, definition, tenant=_tenant()))

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        return agent_to_proto(await self.catalog.get(request.name, request.version, tenant=_tenant()))

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ListAgentsResponse:
        agents = await self.catalog.list(tenant=_tenant())
        return agents_pb2.ListAgentsResponse(agents=[agent_to_proto(agent) for agent in agents])

    async def UpdateAgent(
        self, request: agents_pb2.UpdateAgentRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.Agent:
        definition = definition_from_proto(request.spec)
        return agent_to_proto(await self.catalog.update(request.name, definition, tenant=_tenant()))

    async def DeleteAgent(
        self, request: agents_pb2.DeleteAgentRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.catalog.delete(request.name, tenant=_tenant())
        return empty_pb2.Empty()


def create_server(
    config: MeshConfig,
    llm: LLMClient | None = None,
    tools: ToolClient | None = None,
    store: JournalStore | None = None,
    signer: ApprovalSigner | None = None,
) -> MeshServer:
    """The planner server; without ``llm``/``tools`` it dials the inference and tools services named in ``config``.
    Callers authenticate with API keys or JWTs when ``auth_required(config)``; every call is audited.

    The PlannerServicer is ``server.bindings[0].servicer``; ``await servicer.close()`` after the server stopped.
    """
    planner = config.planner
    if store is None:
        # PostgreSQL when a DSN is configured (replicas share it), else the embedded SQLite file; opened in main.
        database_url = planner.database_url
        store = (
            PostgresRunStore(database_url, lease_seconds=planner.lease_seconds)
            if database_url
            else RunStore(planner.db_path or config.data_dir / "planner.db")
        )
    channels: list[grpc.aio.Channel | ReplicaSet] = []
    tls = tls_identity(config, "planner")
    if llm is None:
        inference = config.inference
        if (address := inference.discover_address()) is not None:
            replicas = ReplicaSet.discover(
                *address, every=inference.discover_seconds, tls=tls, server="inference", policy=inference.routing
            )
        else:
            replicas = ReplicaSet.connect(
                inference.replica_targets(), tls=tls, server="inference", policy=inference.routing
            )
        channels.append(replicas)  # closed with the others: its channels, health watches and discovery
        llm = InferenceLLMClient(replicas)
    # The tools service: the agents' tool calls (unless ``tools`` is given) and ToolSourceService's forwarding.
    channels.append(create_channel(config.tools.server.target(), tls=tls, server="tools"))
    tools_stub = tools_pb2_grpc.ToolsServiceStub(channels[-1])
    if tools is None:
        tools = ToolsServiceClient(channels[-1])
    if signer is None:
        assert config.approvals.key_file is not None  # filled in by MeshConfig
        signer = ApprovalSigner(
            load_or_create_key(config.approvals.key_file), ttl_seconds=config.approvals.token_ttl_seconds
        )
    catalog = AgentCatalog(store, planner, tools.list_tools, llm.list_models)
    deps = ExecutorDeps(
        llm, tools, signer, step_max_tokens=planner.step_max_tokens, redactor=Redactor.from_config(planner.guardrails)
    )
    metrics = CollectorRegistry()
    quotas = TenantQuotas(planner.quotas, metrics)
    runs = RunManager(store, catalog, deps, history_turns=planner.history_turns, quotas=quotas, metrics=metrics)
    keys = authenticator = None
    if auth_required(config):
        keys = key_store(config)
        authenticator = Authenticator(config.auth, keys)
    servicer = PlannerServicer(config, runs, store, channels, keys)
    # A2A on the same port, behind the same authentication and tenant checks; the card's URL is set once bound.
    a2a_servicer = a2a.A2AServicer(runs, authenticated=authenticator is not None)
    # Reflection stays open on loopback (a developer's grpcurl); elsewhere it needs a key like everything else.
    auth = AuthInterceptor(authenticator, open_reflection=is_loopback(planner.server.host))
    server = MeshServer(
        planner.server,
        [
            ServiceBinding(SERVICE_NAME, servicer, planner_pb2_grpc.add_PlannerServiceServicer_to_server),
            ServiceBinding(
                AGENT_SERVICE_NAME, AgentServicer(catalog), agents_pb2_grpc.add_AgentServiceServicer_to_server
            ),
            ServiceBinding(
                TOOL_SOURCE_SERVICE_NAME,
                ToolSourceServicer(tools_stub),
                tool_sources_pb2_grpc.add_ToolSourceServiceServicer_to_server,
            ),
            ServiceBinding(a2a.SERVICE_NAME, a2a_servicer, a2a_pb2_grpc.add_A2AServiceServicer_to_server),
        ],
        # Inside the authentication: the call-rate quota is the authenticated tenant's.
        interceptors=[auth, QuotaInterceptor(quotas)],
        registry=metrics,
        tls=server_tls(config, "planner"),
        metrics_authorize=(lambda token: authenticator.authenticate(token) is not None) if authenticator else None,
    )
    a2a_servicer.url = planner.server.address or server.address
    return server


async def main(config: MeshConfig) -> None:
    """Serves the planner until SIGTERM. Runs a previous process left RUNNING resume first; runs in flight when it
    stops are left as journaled, for the next planner to resume."""
    server = create_server(config)
    servicer: PlannerServicer = server.bindings[0].servicer
    await servicer.store.open()  # a DSN that does not connect stops the planner here, naming the setting

    async def startup() -> None:
        if resumed := await servicer.runs.resume():
            log.warning("resuming %d runs a previous planner left unfinished", resumed)
        if config.planner.database_url:
            # Replicas share the journal: keep this one's leases and take over the runs of one that died.
            servicer.runs.maintain(config.planner.lease_seconds / 3)

    await serve(server, startup=startup, shutdown=servicer.close)

"""The PlannerService servicer (proto <-> domain over RunManager and RunStore), its factory and its main."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import MeshConfig, MeshServer, create_channel, serve
from services.common.server import ServiceBinding
from services.planner.agent import AgentLoop, LLMClient, ToolClient
from services.planner.clients import InferenceLLMClient, ToolsServiceClient
from services.planner.convert import budget_from_proto, run_to_proto, session_to_proto, validate_task
from services.planner.runs import RunManager
from services.planner.store import RunStore

log = logging.getLogger(__name__)

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    """Sessions and runs over gRPC; Run streams each event only after it is journaled."""

    def __init__(
        self, config: MeshConfig, runs: RunManager, store: RunStore, channels: list[grpc.aio.Channel] | None = None
    ) -> None:
        self.config = config
        self.runs = runs
        self.store = store
        self.channels = channels or []

    async def close(self) -> None:
        """Cancels runs in flight (journaling their end), then closes the store and the channels this planner owns."""
        await self.runs.close()
        await self.store.close()
        for channel in self.channels:
            await channel.close()

    async def CreateSession(
        self, request: planner_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Session:
        return session_to_proto(await self.store.create_session())

    async def GetSession(
        self, request: planner_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Session:
        return session_to_proto(await self.store.get_session(request.session_id))

    async def Run(
        self, request: planner_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.RunEvent]:
        task = validate_task(request.task)
        budget = budget_from_proto(request.budget, self.config.planner)
        active = await self.runs.start(request.session_id, task, budget)
        try:
            async for event in active.events():
                yield event
        finally:
            # Nobody is left to read the run (the client hung up, or the server is draining), so stop it.
            active.cancel("the Run stream closed before the run ended (client disconnected or planner stopping)")

    async def GetRun(self, request: planner_pb2.GetRunRequest, context: grpc.aio.ServicerContext) -> planner_pb2.Run:
        return run_to_proto(await self.store.get_run(request.run_id))

    async def CancelRun(
        self, request: planner_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.Run:
        return run_to_proto(await self.runs.cancel(request.run_id))


def create_server(
    config: MeshConfig,
    llm: LLMClient | None = None,
    tools: ToolClient | None = None,
    store: RunStore | None = None,
) -> MeshServer:
    """The planner server; without ``llm``/``tools`` it dials the inference and tools services named in ``config``.

    The servicer is ``server.bindings[0].servicer``; ``await servicer.close()`` after the server stopped.
    """
    planner = config.planner
    store = store or RunStore(planner.db_path or config.data_dir / "planner.db")
    channels = []
    if llm is None:
        channels.append(create_channel(config.inference.server.target()))
        llm = InferenceLLMClient(channels[-1])
    if tools is None:
        channels.append(create_channel(config.tools.server.target()))
        tools = ToolsServiceClient(channels[-1])
    agent = AgentLoop(
        llm, tools, step_max_tokens=planner.step_max_tokens, history_turns=planner.history_turns, guided=planner.guided
    )
    runs = RunManager(store, agent, history_turns=planner.history_turns)
    servicer = PlannerServicer(config, runs, store, channels)
    return MeshServer(
        planner.server, [ServiceBinding(SERVICE_NAME, servicer, planner_pb2_grpc.add_PlannerServiceServicer_to_server)]
    )


async def main(config: MeshConfig) -> None:
    """Serves the planner until SIGTERM: runs a previous process left unfinished are failed first, in-flight runs
    are cancelled (and journaled) on the way out."""
    server = create_server(config)
    servicer: PlannerServicer = server.bindings[0].servicer

    async def startup() -> None:
        if failed := await servicer.runs.fail_interrupted():
            log.warning("%d runs were left unfinished by a previous planner; marked FAILED (ABORTED)", failed)

    await serve(server, startup=startup, shutdown=servicer.close)

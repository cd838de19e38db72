"""Recording fakes of PlannerService and AgentService on an in-process server, for the CLI tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
from google.protobuf import empty_pb2, struct_pb2

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc

RUN_ID, SESSION_ID = "run-1", "session-1"


def event(sequence: int, **kind: Any) -> planner_pb2.RunEvent:
    """One event of run-1, e.g. ``event(3, tool_call=planner_pb2.ToolCall(...))``."""
    return planner_pb2.RunEvent(run_id=RUN_ID, session_id=SESSION_ID, sequence=sequence, **kind)


def struct(**fields: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


class FakePlanner(planner_pb2_grpc.PlannerServiceServicer):
    """Serves one run's ``journal``: Run streams it from the start, WatchRun after ``after_sequence``.

    ``breaks`` scripts broken streams: each Run/WatchRun pops the next entry (events to send, then abort with
    ``break_code``) until the list is empty; ``watch_replays_all`` makes WatchRun ignore after_sequence (a server that
    breaks the no-duplicate contract, which the client must survive). Unary calls answer ``run`` (or abort with ``error``); every request is
    recorded in ``requests`` as (method, request).
    """

    def __init__(
        self,
        journal: list[planner_pb2.RunEvent] | None = None,
        breaks: list[int] | None = None,
        break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> None:
        self.journal = journal or []
        self.breaks = breaks or []
        self.break_code = break_code
        self.watch_replays_all = False
        self.run = planner_pb2.Run(run_id=RUN_ID, session_id=SESSION_ID, state=planner_pb2.RUN_STATE_RUNNING)
        self.runs: list[planner_pb2.Run] = []
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.requests: list[tuple[str, Any]] = []

    def calls(self, method: str) -> list[Any]:
        return [request for name, request in self.requests if name == method]

    async def _stream(self, events: list[planner_pb2.RunEvent], context: grpc.aio.ServicerContext):
        limit = self.breaks.pop(0) if self.breaks else None
        for sent, item in enumerate(events):
            if sent == limit:
                break
            yield item
        if limit is not None:
            await context.abort(self.break_code, "connection reset by peer")

    async def Run(self, request, context):
        self.requests.append(("Run", request))
        async for item in self._stream(self.journal, context):
            yield item

    async def WatchRun(self, request, context):
        self.requests.append(("WatchRun", request))
        after = 0 if self.watch_replays_all else request.after_sequence
        async for item in self._stream([e for e in self.journal if e.sequence > after], context):
            yield item

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append((method, request))
        if self.error is not None:
            await context.abort(*self.error)
        return self.run

    async def GetRun(self, request, context):
        return await self._unary("GetRun", request, context)

    async def CancelRun(self, request, context):
        return await self._unary("CancelRun", request, context)

    async def ApproveToolCall(self, request, context):
        return await self._unary("ApproveToolCall", request, context)

    async def RejectToolCall(self, request, context):
        return await self._unary("RejectToolCall", request, context)

    async def ListRuns(self, request, context):
        self.requests.append(("ListRuns", request))
        return planner_pb2.ListRunsResponse(runs=self.runs)


class FakeAgents(agents_pb2_grpc.AgentServiceServicer):
    """Keeps every version of every agent in memory with the service's codes; records requests."""

    def __init__(self) -> None:
        self.versions: dict[str, list[agents_pb2.Agent]] = {}
        self.requests: list[tuple[str, Any]] = []
        self.error: tuple[grpc.StatusCode, str] | None = None

    async def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests.append((method, request))
        if self.error is not None:
            await context.abort(*self.error)

    def _store(self, name: str, spec: agents_pb2.AgentSpec) -> agents_pb2.Agent:
        versions = self.versions.setdefault(name, [])
        agent = agents_pb2.Agent(name=name, version=len(versions) + 1, spec=spec)
        agent.create_time.FromSeconds(1_700_000_000)
        versions.append(agent)
        return agent

    async def CreateAgent(self, request, context):
        await self._record("CreateAgent", request, context)
        if request.name in self.versions:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"agent '{request.name}' exists; update it")
        return self._store(request.name, request.spec)

    async def UpdateAgent(self, request, context):
        await self._record("UpdateAgent", request, context)
        if request.name not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no agent '{request.name}'")
        return self._store(request.name, request.spec)

    async def GetAgent(self, request, context):
        await self._record("GetAgent", request, context)
        versions = self.versions.get(request.name, [])
        if not versions or request.version > len(versions):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no agent '{request.name}' version {request.version}")
        return versions[request.version - 1] if request.version else versions[-1]

    async def ListAgents(self, request, context):
        await self._record("ListAgents", request, context)
        return agents_pb2.ListAgentsResponse(agents=[versions[-1] for versions in self.versions.values()])

    async def DeleteAgent(self, request, context):
        await self._record("DeleteAgent", request, context)
        if self.versions.pop(request.name, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no agent '{request.name}'")
        return empty_pb2.Empty()


class FakeMesh:
    """The fakes on a grpc.aio server (port 0) whose event loop runs in its own thread, so that CLI commands, which
    call asyncio.run themselves, can be invoked from plain tests. ``target`` is the address to pass as --planner."""

    def __init__(self, planner: FakePlanner | None = None, agents: FakeAgents | None = None) -> None:
        self.planner = planner or FakePlanner()
        self.agents = agents or FakeAgents()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.target = ""

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    async def _start(self) -> str:
        self.server = grpc.aio.server()
        planner_pb2_grpc.add_PlannerServiceServicer_to_server(self.planner, self.server)
        agents_pb2_grpc.add_AgentServiceServicer_to_server(self.agents, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    def __enter__(self) -> FakeMesh:
        self.thread.start()
        self.target = self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

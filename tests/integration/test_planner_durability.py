"""Durable runs through real processes and the real model: the planner SIGKILLed at random moments while runs call a
tool with effects (append_note), and an approval that waits across a planner restart. The tools service checks the
approval tokens itself."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common.approval import ApprovalSigner, load_or_create_key
from tests.integration.processes import ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# `make soak-planner` runs 20 kills; `make test` a smaller round of the same test.
KILLS = int(os.environ.get("MESHPILOT_PLANNER_KILLS", "8"))
IN_FLIGHT = 3
NOTES_AGENT = agents_pb2.AgentSpec(
    instructions="You keep notebooks: you add the line the user gives, word for word, with the append_note tool.",
    tools=["append_note"],
    policy=agents_pb2.PolicySpec(name="guided"),
    # Room for the longest note the schema allows (500 characters), so an action is never cut mid-JSON.
    sampling=agents_pb2.AgentSampling(step_max_tokens=512),
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    """Inference (the default model), tools and planner as processes, with the agent "notes" (append_note only;
    the tool needs no knowledge service)."""
    processes = ServiceProcesses(tmp_path_factory.mktemp("durable"), ("inference", "tools", "planner"))
    try:
        processes.start_all()
        asyncio.run(create_agent(processes.target("planner"), "notes", NOTES_AGENT))
        yield processes
    finally:
        processes.stop_all()


def note_lines(data_dir: Path) -> list[str]:
    return [line for path in sorted((data_dir / "notes").glob("*.txt")) for line in path.read_text().splitlines()]


async def finished_run(target: str, run_id: str, timeout: float = 300.0) -> planner_pb2.Run:
    """The run once it has ended, following it with WatchRun (again after each broken stream)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            try:
                async for _ in stub.WatchRun(planner_pb2.WatchRunRequest(run_id=run_id), timeout=30):
                    pass
                run = await stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id), timeout=10)
                if run.state not in (planner_pb2.RUN_STATE_RUNNING, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL):
                    return run
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end within {timeout:g}s")


async def start_run(target: str, task: str, agent: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        # wait_for_ready: channels in this process share subchannels, and one left backing off while the planner was
        # down would fail a new call at once even though the planner is SERVING again.
        stream = stub.Run(planner_pb2.RunRequest(task=task, agent=agent), timeout=30, wait_for_ready=True)
        first = await stream.read()
        stream.cancel()
        return first.run_id


async def create_agent(target: str, name: str, spec: agents_pb2.AgentSpec) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await agents_pb2_grpc.AgentServiceStub(channel).CreateAgent(
            agents_pb2.CreateAgentRequest(name=name, spec=spec), timeout=30
        )


async def test_runs_survive_planner_kills_and_every_tool_call_takes_effect_once(mesh) -> None:
    planner = mesh.target("planner")
    rng = random.Random(8)
    run_ids: list[str] = []
    in_flight: list[asyncio.Task[str]] = []

    try:
        for _ in range(KILLS):
            while len([t for t in in_flight if not t.done()]) < IN_FLIGHT:
                number = len(run_ids) + 1
                run_id = await start_run(planner, f"Add the line 'entry {number}' to the notebook.", "notes")
                run_ids.append(run_id)
                in_flight.append(asyncio.ensure_future(_ended(planner, run_id)))
            # Up to ~2 model calls' time: kills land before, during and after steps, tool calls and journal writes.
            await asyncio.sleep(rng.uniform(0.3, 3.5))
            await asyncio.to_thread(mesh.restart, "planner")
        runs = [await finished_run(planner, run_id) for run_id in run_ids]
    finally:
        for task in in_flight:
            task.cancel()

    calls = {(run.run_id, e.tool_call.call_id) for run in runs for e in run.events if e.HasField("tool_call")}
    results = [e.tool_result for run in runs for e in run.events if e.HasField("tool_result")]
    lines = note_lines(mesh.data_dir)
    replayed = sum(r.replayed for r in results)
    print(
        f"\n{KILLS} planner kills, {len(runs)} runs: {sum(r.state == planner_pb2.RUN_STATE_SUCCEEDED for r in runs)} "
        f"succeeded; {len(calls)} journaled tool calls, {len(lines)} lines written, {replayed} results replayed "
        f"by idempotency key"
    )
    assert all(run.state == planner_pb2.RUN_STATE_SUCCEEDED for run in runs), [
        (run.run_id, run.events[-1]) for run in runs if run.state != planner_pb2.RUN_STATE_SUCCEEDED
    ]
    assert len(results) == len(calls), "a journaled call has no result"
    assert len(lines) == len(calls), f"{len(calls)} journaled calls took effect {len(lines)} times"
    for run in runs:
        sequences = [e.sequence for e in run.events]
        assert sequences == list(range(1, len(sequences) + 1)), f"run {run.run_id}: gap or duplicate in the journal"


async def _ended(target: str, run_id: str) -> str:
    await finished_run(target, run_id)
    return run_id


async def test_a_call_in_flight_when_the_planner_dies_takes_effect_once(mesh) -> None:
    """The planner is frozen (SIGSTOP) the moment its tool_call event arrives, i.e. as it sends ExecuteTool, and
    SIGKILLed while frozen: the tools service completes the call it received (its run does not depend on the caller)
    and keeps the outcome under the call's key, so the resumed run gets it back (``replayed``) instead of appending a
    second line. If the request had not left yet, the resumed run sends it first: once, either way."""
    planner = mesh.target("planner")
    before = len(note_lines(mesh.data_dir))
    async with grpc.aio.insecure_channel(planner) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        request = planner_pb2.RunRequest(task="Add the line 'frozen entry' to the notebook.", agent="notes")
        stream = stub.Run(request, timeout=60, wait_for_ready=True)
        async for event in stream:
            if event.HasField("tool_call"):
                mesh.processes["planner"].send_signal(signal.SIGSTOP)
                run_id = event.run_id
                break
        stream.cancel()
    await asyncio.sleep(0.5)  # the tools service finishes the call; the frozen planner cannot journal its result
    mesh.kill("planner")
    mesh.start("planner")
    await asyncio.to_thread(mesh.wait_serving, "planner")
    run = await finished_run(planner, run_id)

    results = [e.tool_result for e in run.events if e.HasField("tool_result")]
    print(f"\ncall in flight at the kill: {len(results)} result(s), replayed={[r.replayed for r in results]}")
    assert run.state == planner_pb2.RUN_STATE_SUCCEEDED, run.events[-1]
    assert len(results) == 1
    assert len(note_lines(mesh.data_dir)) == before + 1


async def test_an_approval_waits_across_a_restart_and_the_tools_service_checks_tokens(mesh) -> None:
    planner = mesh.target("planner")
    # The tools service itself marks append_note: the planner learns it from ListTools, and no call runs without a
    # token the tools service accepts.
    mesh.env["MESHPILOT_TOOLS__APPROVAL_REQUIRED"] = '["append_note"]'
    await asyncio.to_thread(mesh.restart, "tools", kill=False)
    before = len(note_lines(mesh.data_dir))

    run_id = await start_run(planner, "Add the line 'approved entry' to the notebook.", "notes")
    async with grpc.aio.insecure_channel(planner) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        waiting = await _wait_for(stub, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
    pending = waiting.pending_approvals[0]
    assert pending.tool == "append_note"
    assert "tools service marks" in pending.reason

    await asyncio.to_thread(mesh.restart, "planner", kill=False)
    async with grpc.aio.insecure_channel(planner) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        still = await stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id), timeout=30, wait_for_ready=True)
        assert still.state == planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL
        assert len(note_lines(mesh.data_dir)) == before
        await stub.ApproveToolCall(planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id=pending.call_id))
    done = await finished_run(planner, run_id)

    assert done.state == planner_pb2.RUN_STATE_SUCCEEDED, done.events[-1]
    assert len(note_lines(mesh.data_dir)) == before + 1

    arguments = {"notebook": "direct", "text": "no approval"}
    key = load_or_create_key(mesh.data_dir / "approval.key")
    tokens = {
        "no token": "",
        "another call": ApprovalSigner(key).mint("run-x", "call-2", "append_note", arguments),
        "expired": ApprovalSigner(key, ttl_seconds=1, clock=lambda: time.time() - 60).mint(
            "run-x", "call-1", "append_note", arguments
        ),
        "other arguments": ApprovalSigner(key).mint("run-x", "call-1", "append_note", {"text": "else"}),
    }
    async with grpc.aio.insecure_channel(mesh.target("tools")) as channel:
        tools = tools_pb2_grpc.ToolsServiceStub(channel)
        request = tools_pb2.ExecuteToolRequest(call_id="call-1", run_id="run-x", name="append_note")
        request.arguments.update(arguments)
        codes = {}
        for name, token in tokens.items():
            request.approval_token = token
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tools.ExecuteTool(request)
            codes[name] = info.value.code()
        request.approval_token = ApprovalSigner(key).mint("run-x", "call-1", "append_note", arguments)
        granted = await tools.ExecuteTool(request)

    assert set(codes.values()) == {grpc.StatusCode.PERMISSION_DENIED}, codes
    assert granted.WhichOneof("outcome") == "result"
    assert (mesh.data_dir / "notes" / "direct.txt").read_text() == "no approval\n"


async def _wait_for(stub, run_id: str, state: int, timeout: float = 120.0) -> planner_pb2.Run:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id), timeout=30, wait_for_ready=True)
        if run.state == state:
            return run
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach state {state}; it is {run.state}")

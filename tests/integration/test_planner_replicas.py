"""Two planner replicas on one PostgreSQL journal, as real processes with the real model: one of them SIGKILLed
mid-run again and again while runs call a tool with effects; every run finishes on the survivor, none is lost, no
tool call takes effect twice, and a client watching through the survivor sees every event once."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator

import grpc
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.conftest import free_port
from tests.integration.processes import ServiceProcesses
from tests.integration.test_planner_durability import NOTES_AGENT, create_agent, finished_run, note_lines, start_run
from tests.postgres import fresh_schema, needs_postgres

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_postgres]

# `make soak-replicas` runs the acceptance's 10 kills; `make test` a smaller round of the same test.
KILLS = int(os.environ.get("MESHPILOT_REPLICA_KILLS", "4"))
IN_FLIGHT = 2
LEASE_SECONDS = 2


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcesses, ServiceProcesses]]:
    """Inference, tools and planner A as processes, and planner B (its own port and data directory) on the same
    PostgreSQL schema, inference, tools and approval key."""
    with fresh_schema() as dsn:
        journal = {"MESHPILOT_PLANNER__DATABASE_URL": dsn, "MESHPILOT_PLANNER__LEASE_SECONDS": str(LEASE_SECONDS)}
        first = ServiceProcesses(tmp_path_factory.mktemp("replica-a"), ("inference", "tools", "planner"), journal)
        second_dir = tmp_path_factory.mktemp("replica-b")
        second = ServiceProcesses(
            second_dir,
            ("planner",),
            {
                **journal,
                "MESHPILOT_PLANNER__SERVER__PORT": str(free_port()),
                "MESHPILOT_INFERENCE__SERVER__PORT": str(first.ports["inference"]),
                "MESHPILOT_TOOLS__SERVER__PORT": str(first.ports["tools"]),
                "MESHPILOT_APPROVALS__KEY_FILE": str(first.data_dir / "approval.key"),
            },
        )
        second.ports["planner"] = int(second.env["MESHPILOT_PLANNER__SERVER__PORT"])
        try:
            first.start_all()
            second.start_all()
            asyncio.run(create_agent(first.target("planner"), "notes", NOTES_AGENT))
            yield first, second
        finally:
            second.stop_all()
            first.stop_all()


async def test_runs_survive_a_replica_killed_again_and_again_and_take_effect_once(replicas) -> None:
    first, second = replicas
    rng = random.Random(11)
    run_ids: list[str] = []
    watched: list[list[int]] = []
    for kill in range(KILLS):
        victim, survivor = (first, second) if kill % 2 == 0 else (second, first)
        for _ in range(IN_FLIGHT):
            number = len(run_ids) + 1
            run_ids.append(
                await start_run(victim.target("planner"), f"Add the line 'entry {number}' to the notebook.", "notes")
            )
        # Kills land before, during and after model steps, tool calls and journal writes.
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        await asyncio.to_thread(victim.kill, "planner")
        # Watched through the survivor, which takes the victim's runs over once their leases expire.
        for seen in await asyncio.gather(
            *(watch(survivor.target("planner"), run_id) for run_id in run_ids[-IN_FLIGHT:])
        ):
            watched.append(seen)
        victim.start("planner")
        await asyncio.to_thread(victim.wait_serving, "planner")
    runs = [await finished_run(first.target("planner"), run_id) for run_id in run_ids]

    calls = {(run.run_id, e.tool_call.call_id) for run in runs for e in run.events if e.HasField("tool_call")}
    lines = note_lines(first.data_dir)
    print(
        f"\n{KILLS} replica kills, {len(runs)} runs: "
        f"{sum(r.state == planner_pb2.RUN_STATE_SUCCEEDED for r in runs)} succeeded; {len(calls)} journaled tool "
        f"calls, {len(lines)} lines written"
    )
    assert all(run.state == planner_pb2.RUN_STATE_SUCCEEDED for run in runs), [
        (run.run_id, run.events[-1]) for run in runs if run.state != planner_pb2.RUN_STATE_SUCCEEDED
    ]
    assert len(lines) == len(calls), f"{len(calls)} journaled calls took effect {len(lines)} times"
    for run, seen in zip(runs, watched, strict=True):
        sequences = [e.sequence for e in run.events]
        assert sequences == list(range(1, len(sequences) + 1)), f"run {run.run_id}: gap or duplicate in the journal"
        assert seen == sequences, f"run {run.run_id}: the survivor's watcher saw {seen}"


async def watch(target: str, run_id: str) -> list[int]:
    """The sequences one WatchRun from the start delivers, to the run's last event."""
    async with grpc.aio.insecure_channel(target) as channel:
        stream = planner_pb2_grpc.PlannerServiceStub(channel).WatchRun(
            planner_pb2.WatchRunRequest(run_id=run_id), timeout=300, wait_for_ready=True
        )
        return [event.sequence async for event in stream]

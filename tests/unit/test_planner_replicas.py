"""Planner replicas on one PostgreSQL journal: a watcher on one replica follows a run another drives, and when that
replica dies its run is taken over once its lease expires, with no step redone and no tool effect repeated."""

from __future__ import annotations

import asyncio

import pytest

from meshpilot.planner.v1 import planner_pb2
from services.common import load_config
from tests.postgres import fresh_schema, needs_postgres
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call

pytestmark = [needs_postgres, pytest.mark.slow]


def replica_config(tmp_path, dsn: str, name: str):
    return load_config(
        data_dir=str(tmp_path / name),
        planner={"server": {"port": 0, "metrics": False}, "database_url": dsn, "lease_seconds": 1},
    )


async def test_a_run_of_a_dead_replica_is_taken_over_and_a_watcher_elsewhere_sees_every_event_once(tmp_path) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    hung = llm.holds[1] = asyncio.Event()  # the run's second model call hangs on the replica that dies
    tools = FakeTools()  # one tools service for both replicas: it keeps outcomes by idempotency key
    with fresh_schema() as dsn:
        first = Planner(replica_config(tmp_path, dsn, "a"), llm, tools)
        second = Planner(replica_config(tmp_path, dsn, "b"), llm, tools)
        await first._start()
        await second._start()
        try:
            stream = first.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))
            async for event in stream:
                run_id = event.run_id
                if event.HasField("tool_result"):
                    break
            stream.cancel()
            # Watched through the other replica from the start.
            watched = asyncio.create_task(_collect(second.stub.WatchRun(planner_pb2.WatchRunRequest(run_id=run_id))))
            while len(llm.requests) < 2:  # the first replica now waits on the hung model call
                await asyncio.sleep(0.05)
            await first._stop()  # dies: its run is left as journaled, its lease no longer renewed
            second.servicer.runs.maintain(0.2)
            events = await asyncio.wait_for(watched, 60)
            stored = await second.stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id))
        finally:
            hung.set()
            await second._stop()

    sequences = [event.sequence for event in events]
    assert sequences == list(range(1, len(events) + 1))  # every event once, no gap
    assert events[-1].final_answer.answer == "The capital of France is Paris."
    assert stored.state == planner_pb2.RUN_STATE_SUCCEEDED
    assert [name for _, name, _, _ in tools.calls] == ["country_facts"]  # the tool ran once
    assert sum(event.HasField("tool_call") for event in events) == 1  # the step was not redone
    assert len(llm.requests) == 3  # the hung call died with its replica; the survivor asked the model again
    llm.assert_consumed()


async def _collect(stream) -> list[planner_pb2.RunEvent]:
    return [event async for event in stream]

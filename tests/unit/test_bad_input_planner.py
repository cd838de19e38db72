"""Bad input to the planner, through the mesh in-process (real gRPC clients to tools and a fake-engine inference):
the largest budget.timeout, megabyte ids and NaN in approved arguments."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.planner.convert import MAX_RUN_TIMEOUT_S
from tests.fuzz.mesh import InProcessMesh


@pytest.fixture
async def planner(tmp_path: Path) -> AsyncIterator[planner_pb2_grpc.PlannerServiceStub]:
    async with InProcessMesh(tmp_path) as mesh:
        yield planner_pb2_grpc.PlannerServiceStub(mesh.channels["planner"])


def _run(seconds: int) -> planner_pb2.RunRequest:
    budget = planner_pb2.RunBudget(timeout=duration_pb2.Duration(seconds=seconds))
    return planner_pb2.RunRequest(task="What is the capital of France?", budget=budget)


async def test_the_largest_run_timeout_runs(planner) -> None:
    events = [event async for event in planner.Run(_run(int(MAX_RUN_TIMEOUT_S)), timeout=30)]
    assert events[-1].WhichOneof("event") == "final_answer", events[-1]
    assert events[-1].final_answer.answer == "Paris"


async def test_the_largest_duration_is_refused_not_a_run_out_of_time_at_once(planner) -> None:
    # Without the bound, 315576000000 s overflowed the deadline of every call: the run failed at once with
    # DEADLINE_EXCEEDED "time budget ran out".
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in planner.Run(_run(315_576_000_000), timeout=30):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "budget.timeout is 3.15576e+11s; use a duration up to 86400s" in caught.value.details()


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, big: stub.GetSession(planner_pb2.GetSessionRequest(session_id=big), timeout=10),
        lambda stub, big: stub.GetRun(planner_pb2.GetRunRequest(run_id=big), timeout=10),
        lambda stub, big: stub.CancelRun(planner_pb2.CancelRunRequest(run_id=big), timeout=10),
    ],
    ids=["GetSession", "GetRun", "CancelRun"],
)
async def test_a_100k_id_is_not_found_with_a_short_message(planner, call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(planner, "a" * 100_000)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details()) < 200


async def test_nan_in_approved_arguments_is_invalid_argument(planner) -> None:
    request = planner_pb2.ApproveToolCallRequest(run_id="r", call_id="c", arguments=struct_pb2.Struct())
    request.arguments.update({"expression": "1+1", "scale": math.nan})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planner.ApproveToolCall(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("arguments.scale is NaN: JSON has no NaN or Infinity")

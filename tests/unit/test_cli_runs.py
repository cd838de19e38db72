"""`meshpilot approve/reject` and `meshpilot runs ...` against a recording fake PlannerService."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from meshpilot.cli import app
from meshpilot.planner.v1 import planner_pb2
from tests.unit.cli_fakes import RUN_ID, FakeMesh, FakePlanner, event, struct


@pytest.fixture
def mesh():
    with FakeMesh() as running:
        yield running


def invoke(mesh: FakeMesh, *args: str):
    return CliRunner().invoke(app, [*args, "--planner", mesh.target])


def test_approve_sends_edited_arguments_and_the_comment(mesh) -> None:
    done = invoke(mesh, "approve", RUN_ID, "call-7", "--arguments", '{"text": "hi", "n": 2}', "--comment", "ok")

    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == f"approved call-7; run {RUN_ID} is running"
    [request] = mesh.planner.calls("ApproveToolCall")
    assert (request.run_id, request.call_id, request.comment) == (RUN_ID, "call-7", "ok")
    assert dict(request.arguments) == {"text": "hi", "n": 2}


def test_approve_without_arguments_keeps_the_models(mesh) -> None:
    assert invoke(mesh, "approve", RUN_ID, "call-7").exit_code == 0

    [request] = mesh.planner.calls("ApproveToolCall")
    assert not request.HasField("arguments")


@pytest.mark.parametrize(("arguments", "message"), [("{text: hi}", "not valid JSON"), ("[1, 2]", "a JSON object")])
def test_approve_with_bad_arguments_exits_2_and_calls_nothing(mesh, arguments, message) -> None:
    done = invoke(mesh, "approve", RUN_ID, "call-7", "--arguments", arguments)

    assert done.exit_code == 2
    assert "--arguments" in done.stderr and message in done.stderr
    assert mesh.planner.requests == []


def test_approve_a_call_not_waiting_exits_1_with_the_code(mesh) -> None:
    mesh.planner.error = (grpc.StatusCode.FAILED_PRECONDITION, "call call-7 is not waiting for approval")

    done = invoke(mesh, "approve", RUN_ID, "call-7")

    assert done.exit_code == 1
    assert done.stderr.strip() == "error: FAILED_PRECONDITION: call call-7 is not waiting for approval"


def test_reject_sends_the_reason(mesh) -> None:
    done = invoke(mesh, "reject", RUN_ID, "call-7", "--reason", "not that file")

    assert done.exit_code == 0
    [request] = mesh.planner.calls("RejectToolCall")
    assert (request.run_id, request.call_id, request.reason) == (RUN_ID, "call-7", "not that file")


@pytest.mark.parametrize(
    ("args", "state", "agent"),
    [
        ([], planner_pb2.RUN_STATE_UNSPECIFIED, ""),
        (["--state", "waiting"], planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL, ""),
        (["--state", "failed", "--agent", "geo-react"], planner_pb2.RUN_STATE_FAILED, "geo-react"),
    ],
)
def test_runs_list_passes_its_filters(mesh, args, state, agent) -> None:
    assert invoke(mesh, "runs", "list", *args).exit_code == 0

    [request] = mesh.planner.calls("ListRuns")
    assert (request.state, request.agent) == (state, agent)


def test_runs_list_rejects_an_unknown_state(mesh) -> None:
    done = invoke(mesh, "runs", "list", "--state", "sleeping")

    assert done.exit_code == 2
    assert mesh.planner.requests == []


def test_runs_list_prints_a_row_per_run(mesh) -> None:
    mesh.planner.runs = [
        planner_pb2.Run(
            run_id="run-9", state=planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL, agent="notes", agent_version=3, task="t"
        ),
        planner_pb2.Run(run_id="run-8", state=planner_pb2.RUN_STATE_SUCCEEDED, task="What is the capital of Peru?"),
    ]

    table = invoke(mesh, "runs", "list")
    as_json = invoke(mesh, "runs", "list", "--json")

    lines = table.stdout.splitlines()
    assert "run-9" in lines[1] and "waiting_for_approval" in lines[1] and "notes@3" in lines[1]
    assert "run-8" in lines[2] and "succeeded" in lines[2] and "default" in lines[2]
    assert [run["state"] for run in json.loads(as_json.stdout)] == [
        "RUN_STATE_WAITING_FOR_APPROVAL",
        "RUN_STATE_SUCCEEDED",
    ]


def test_runs_get_shows_waiting_approvals_with_their_commands(mesh) -> None:
    asked = planner_pb2.ApprovalRequested(step=2, call_id="call-7", tool="append_note", arguments=struct(text="hi"))
    mesh.planner.run = planner_pb2.Run(
        run_id=RUN_ID,
        state=planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL,
        task="note it",
        pending_approvals=[asked],
        events=[event(1, approval_requested=asked)],
    )

    done = invoke(mesh, "runs", "get", RUN_ID)
    as_json = invoke(mesh, "runs", "get", RUN_ID, "--json")

    assert f"run {RUN_ID} · waiting_for_approval" in done.stdout
    assert 'waiting: append_note {"text": "hi"}' in done.stdout
    assert f"meshpilot approve {RUN_ID} call-7 --planner {mesh.target}" in done.stdout
    assert done.stdout.count("meshpilot approve") == 1  # the journaled request is history, not a second prompt
    assert "⏸ waiting for approval: append_note" in done.stdout
    assert json.loads(as_json.stdout)["pending_approvals"][0]["call_id"] == "call-7"


def test_runs_watch_follows_from_after_and_exits_by_the_outcome() -> None:
    journal = [
        event(1, step_started=planner_pb2.StepStarted(step=1)),
        event(2, tool_call=planner_pb2.ToolCall(step=1, call_id="c1", tool="country_facts")),
        event(3, error=planner_pb2.RunError(code="CANCELLED", message="cancelled by a user")),
    ]
    with FakeMesh(FakePlanner(journal)) as mesh:
        done = invoke(mesh, "runs", "watch", RUN_ID, "--after", "1")

    assert done.exit_code == 1
    [request] = mesh.planner.calls("WatchRun")
    assert (request.run_id, request.after_sequence) == (RUN_ID, 1)
    assert "step 1" not in done.stdout
    assert "→ country_facts" in done.stdout and "run failed: CANCELLED: cancelled by a user" in done.stdout


def test_runs_watch_of_an_unknown_run_exits_1() -> None:
    planner = FakePlanner(breaks=[0], break_code=grpc.StatusCode.NOT_FOUND)
    with FakeMesh(planner) as mesh:
        done = invoke(mesh, "runs", "watch", "run-404")

    assert done.exit_code == 1
    assert "error: NOT_FOUND" in done.stderr


def test_runs_cancel(mesh) -> None:
    mesh.planner.run = planner_pb2.Run(run_id=RUN_ID, state=planner_pb2.RUN_STATE_CANCELLED)

    done = invoke(mesh, "runs", "cancel", RUN_ID)

    assert done.stdout.strip() == f"run {RUN_ID}: cancelled"
    assert mesh.planner.calls("CancelRun")[0].run_id == RUN_ID

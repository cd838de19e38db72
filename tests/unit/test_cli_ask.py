"""`meshpilot ask`: agent selection, re-attaching after a broken stream, and approval waits."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import struct_pb2
from typer.testing import CliRunner

from meshpilot.cli import app
from meshpilot.cli.ask import AskError, run_ask
from meshpilot.cli.run_stream import ReconnectPolicy, RunFollower, RunStreamError
from meshpilot.planner.v1 import planner_pb2
from tests.unit.cli_fakes import RUN_ID, SESSION_ID, FakeMesh, FakePlanner, event, struct

FAST = ReconnectPolicy(initial_backoff_s=0.01, max_backoff_s=0.02, max_wait_s=5)

FRANCE = [
    event(1, step_started=planner_pb2.StepStarted(step=1)),
    event(2, model_output=planner_pb2.ModelOutput(step=1, text='{"tool": "country_facts"}')),
    event(3, tool_call=planner_pb2.ToolCall(step=1, call_id="c1", tool="country_facts", arguments=struct(c="France"))),
    event(4, tool_result=planner_pb2.ToolResult(step=1, call_id="c1", tool="country_facts", result=struct_pb2.Value())),
    event(5, step_started=planner_pb2.StepStarted(step=2)),
    event(6, model_output=planner_pb2.ModelOutput(step=2, text="Paris")),
    event(7, final_answer=planner_pb2.FinalAnswer(answer="Paris is the capital.")),
]

NOTE = [
    event(1, plan=planner_pb2.PlanMade(step=1, revision=1, steps=["look up Peru", "write the note"])),
    event(
        2,
        approval_requested=planner_pb2.ApprovalRequested(
            step=1, call_id="call-7", tool="append_note", arguments=struct(text="Lima"), reason="append_note writes"
        ),
    ),
    event(
        3,
        approval_decision=planner_pb2.ApprovalDecision(
            step=1, call_id="call-7", tool="append_note", approved=True, arguments=struct(text="LIMA"), comment="caps"
        ),
    ),
    event(4, final_answer=planner_pb2.FinalAnswer(answer="Noted.")),
]


def ask(mesh: FakeMesh, *, as_json: bool = False, planner_flag: str | None = None) -> None:
    asyncio.run(
        run_ask(
            "q",
            target=mesh.target,
            session_id=None,
            as_json=as_json,
            max_steps=0,
            timeout=0,
            planner_flag=planner_flag,
            reconnect=FAST,
        )
    )


def test_ask_passes_the_agent_and_its_version() -> None:
    with FakeMesh(FakePlanner(list(FRANCE))) as mesh:
        done = CliRunner().invoke(
            app,
            ["ask", "q", "--agent", "geo-react", "--agent-version", "3", "--max-steps", "4", "--planner", mesh.target],
        )

    assert done.exit_code == 0, done.output
    [request] = mesh.planner.calls("Run")
    assert (request.task, request.agent, request.agent_version, request.budget.max_steps) == ("q", "geo-react", 3, 4)


def test_ask_without_agent_leaves_the_choice_to_the_planner() -> None:
    with FakeMesh(FakePlanner(list(FRANCE))) as mesh:
        CliRunner().invoke(app, ["ask", "q", "--planner", mesh.target])

    [request] = mesh.planner.calls("Run")
    assert (request.agent, request.agent_version) == ("", 0)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_a_broken_stream_is_followed_again_after_the_last_event(capsys, k) -> None:
    with FakeMesh(FakePlanner(list(FRANCE), breaks=[k])) as mesh:
        ask(mesh)
        watched = mesh.planner.calls("WatchRun")

    out, err = capsys.readouterr()
    assert [(w.run_id, w.after_sequence) for w in watched] == [(RUN_ID, k)]
    assert err.count("(stream lost; reconnecting…)") == 1
    assert out.count("step 1") == out.count("step 2") == out.count("→ country_facts") == 1
    assert out.count("Paris is the capital.") == 1
    assert f"session {SESSION_ID}" in out


def test_each_break_resumes_where_the_last_stream_stopped(capsys) -> None:
    with FakeMesh(FakePlanner(list(FRANCE), breaks=[2, 3], break_code=grpc.StatusCode.INTERNAL)) as mesh:
        ask(mesh, as_json=True)
        watched = mesh.planner.calls("WatchRun")

    out, err = capsys.readouterr()
    assert [w.after_sequence for w in watched] == [2, 5]
    assert err.count("(stream lost; reconnecting…)") == 2
    transcript = json.loads(out)
    assert transcript["answer"] == "Paris is the capital."
    assert [step["type"] for step in transcript["steps"]] == ["model_output", "tool_call", "model_output"]


def test_events_a_server_replays_are_not_printed_twice(capsys) -> None:
    planner = FakePlanner(list(FRANCE), breaks=[4])
    planner.watch_replays_all = True
    with FakeMesh(planner) as mesh:
        ask(mesh)

    out, _ = capsys.readouterr()
    assert out.count("→ country_facts") == 1 and out.count("step 1") == 1


def test_a_break_before_any_event_is_reported_without_reconnecting(capsys) -> None:
    planner = FakePlanner(list(FRANCE), breaks=[0], break_code=grpc.StatusCode.INTERNAL)
    with FakeMesh(planner) as mesh, pytest.raises(AskError):
        ask(mesh)

    out, err = capsys.readouterr()
    assert "error: INTERNAL: connection reset by peer" in out
    assert planner.calls("WatchRun") == [] and "reconnecting" not in err


def test_approval_waits_print_the_commands_that_decide_them(capsys) -> None:
    with FakeMesh(FakePlanner(list(NOTE))) as mesh:
        ask(mesh)

    lines = capsys.readouterr().out.splitlines()
    assert "plan (revision 1):" in lines
    assert "  1. look up Peru" in lines and "  2. write the note" in lines
    assert '  ⏸ waiting for approval: append_note {"text": "Lima"}' in lines
    assert "    reason: append_note writes" in lines
    assert f"    approve: meshpilot approve {RUN_ID} call-7" in lines
    assert f'    reject:  meshpilot reject {RUN_ID} call-7 --reason "..."' in lines
    assert '  ✓ approved append_note {"text": "LIMA"} — caps' in lines
    assert "Noted." in lines


def test_approval_commands_name_the_planner_given_on_the_command_line(capsys) -> None:
    with FakeMesh(FakePlanner(list(NOTE))) as mesh:
        ask(mesh, planner_flag=mesh.target)

    assert f"meshpilot approve {RUN_ID} call-7 --planner {mesh.target}" in capsys.readouterr().out


def test_json_transcript_holds_plan_and_approvals_and_stderr_the_wait(capsys) -> None:
    with FakeMesh(FakePlanner(list(NOTE))) as mesh:
        ask(mesh, as_json=True)

    out, err = capsys.readouterr()
    steps = json.loads(out)["steps"]
    assert steps[0] == {"type": "plan", "step": 1, "revision": 1, "steps": ["look up Peru", "write the note"]}
    assert steps[1]["type"] == "approval_requested" and steps[1]["call_id"] == "call-7"
    assert steps[2] == {
        "type": "approval_decision",
        "step": 1,
        "call_id": "call-7",
        "tool": "append_note",
        "approved": True,
        "arguments": {"text": "LIMA"},
        "comment": "caps",
    }
    assert f"meshpilot approve {RUN_ID} call-7" in err


def test_a_rejection_prints_the_reason(capsys) -> None:
    rejected = planner_pb2.ApprovalDecision(step=1, call_id="call-7", tool="append_note", comment="not today")
    with FakeMesh(FakePlanner([event(1, approval_decision=rejected), NOTE[-1]])) as mesh:
        ask(mesh)

    assert "  ✗ rejected append_note — not today" in capsys.readouterr().out.splitlines()


class DownPlanner:
    """A stub whose WatchRun always fails with ``code``."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code, self.watched = code, 0

    def WatchRun(self, request, timeout=None):
        self.watched += 1

        async def fail():
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down")
            yield  # pragma: no cover - makes this an async generator

        return fail()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def follower(stub, clock: FakeClock, **kwargs) -> tuple[RunFollower, list[str]]:
    notices: list[str] = []
    policy = ReconnectPolicy(initial_backoff_s=1, max_backoff_s=8, max_wait_s=30)
    made = RunFollower(
        stub,
        lambda e: None,
        run_id=RUN_ID,
        policy=policy,
        clock=clock,
        sleep=clock.sleep,
        on_lost=lambda: notices.append("lost"),
        **kwargs,
    )
    return made, notices


def test_a_run_unreachable_past_max_wait_fails_with_the_last_code() -> None:
    clock, stub = FakeClock(), DownPlanner(grpc.StatusCode.UNAVAILABLE)
    made, notices = follower(stub, clock)

    with pytest.raises(RunStreamError) as caught:
        asyncio.run(made.follow())

    assert caught.value.code == "UNAVAILABLE"
    assert notices == ["lost"]
    # backoff 1, 2, 4, 8, 8: the next 8 would pass 30 s
    assert clock.now == 23 and stub.watched == 6


def test_reconnecting_stops_at_the_deadline() -> None:
    clock, stub = FakeClock(), DownPlanner(grpc.StatusCode.UNAVAILABLE)
    made, _ = follower(stub, clock, deadline=5.0)

    with pytest.raises(RunStreamError):
        asyncio.run(made.follow())

    assert clock.now == 3  # 1 + 2; waiting 4 more would pass the deadline


def test_codes_that_end_the_run_are_not_retried() -> None:
    clock, stub = FakeClock(), DownPlanner(grpc.StatusCode.OUT_OF_RANGE)
    made, notices = follower(stub, clock)

    with pytest.raises(RunStreamError) as caught:
        asyncio.run(made.follow())

    assert caught.value.code == "OUT_OF_RANGE" and stub.watched == 1 and notices == []

"""`meshpilot runs ...`, `approve` and `reject`: look at runs, follow one, cancel it, decide its tool calls."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format, struct_pb2
from rich.console import Console
from rich.table import Table

from meshpilot.cli.options import (
    UNARY_TIMEOUT_S,
    ConfigOption,
    JsonOption,
    PlannerOption,
    call_service,
    fail,
    planner_target,
)
from meshpilot.cli.run_stream import EventPrinter, RunFollower, RunStreamError, approval_commands
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc

runs_app = typer.Typer(help="Runs of the planner: list, inspect, follow and cancel them.", no_args_is_help=True)

RunIdArgument = Annotated[str, typer.Argument(help="The run's id (printed by `ask` and `runs list`).")]
CallIdArgument = Annotated[str, typer.Argument(help="The waiting tool call's id (printed with the approval request).")]


class StateFilter(StrEnum):
    """The states `runs list --state` accepts."""

    waiting = "waiting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


_STATES = {
    StateFilter.waiting: planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL,
    StateFilter.running: planner_pb2.RUN_STATE_RUNNING,
    StateFilter.succeeded: planner_pb2.RUN_STATE_SUCCEEDED,
    StateFilter.failed: planner_pb2.RUN_STATE_FAILED,
    StateFilter.cancelled: planner_pb2.RUN_STATE_CANCELLED,
}


def state_name(state: int) -> str:
    """``RUN_STATE_WAITING_FOR_APPROVAL`` -> ``waiting_for_approval``."""
    return planner_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()


def _run_json(run: planner_pb2.Run) -> dict[str, Any]:
    return json_format.MessageToDict(run, preserving_proto_field_name=True)


def _planner_stub(channel: grpc.aio.Channel) -> planner_pb2_grpc.PlannerServiceStub:
    return planner_pb2_grpc.PlannerServiceStub(channel)


def parse_arguments(text: str) -> struct_pb2.Struct:
    """``--arguments`` as a Struct; raises ValueError when it is not a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--arguments is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f'--arguments must be a JSON object such as \'{{"text": "hello"}}\', not {text!r}')
    arguments = struct_pb2.Struct()
    arguments.update(value)
    return arguments


@runs_app.command("list")
def list_runs(
    state: Annotated[StateFilter | None, typer.Option(help="Only runs in this state.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only runs of this agent.")] = None,
    session: Annotated[str | None, typer.Option(help="Only runs of this session.")] = None,
    limit: Annotated[int, typer.Option(min=0, max=500, help="Most runs to list; 0 lets the planner choose (50).")] = 0,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """List runs, newest first."""
    request = planner_pb2.ListRunsRequest(
        state=_STATES[state] if state else planner_pb2.RUN_STATE_UNSPECIFIED,
        agent=agent or "",
        session_id=session or "",
        page_size=limit,
    )
    response = call_service(
        planner_target(planner, config), lambda ch: _planner_stub(ch).ListRuns(request, timeout=UNARY_TIMEOUT_S)
    )
    if json_output:
        typer.echo(json.dumps([_run_json(run) for run in response.runs], ensure_ascii=False))
        return
    table = Table("RUN", "STATE", "AGENT", "CREATED", "TASK", box=None)
    for run in response.runs:
        agent_label = f"{run.agent or 'default'}@{run.agent_version}" if run.agent_version else run.agent or "default"
        created = run.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if run.HasField("create_time") else ""
        table.add_row(run.run_id, state_name(run.state), agent_label, created, run.task[:60])
    Console(soft_wrap=True).print(table)


@runs_app.command("get")
def get_run(
    run_id: RunIdArgument,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Show one run: its state, answer, waiting approvals and events."""
    request = planner_pb2.GetRunRequest(run_id=run_id)
    run = call_service(
        planner_target(planner, config), lambda ch: _planner_stub(ch).GetRun(request, timeout=UNARY_TIMEOUT_S)
    )
    if json_output:
        typer.echo(json.dumps(_run_json(run), ensure_ascii=False))
        return
    console = Console(soft_wrap=True)
    console.print(f"run {run.run_id} · {state_name(run.state)}", highlight=False)
    console.print(f"  agent:   {run.agent or 'default'} (version {run.agent_version})", highlight=False)
    console.print(f"  session: {run.session_id}", highlight=False)
    console.print(f"  task:    {run.task}", highlight=False)
    if run.answer:
        console.print(f"  answer:  {run.answer}", highlight=False)
    if run.HasField("feedback"):
        said = f" · {run.feedback.comment}" if run.feedback.comment else ""
        console.print(f"  rating:  {run.feedback.score}/5{said}", highlight=False)
    for asked in run.pending_approvals:
        approve, reject = approval_commands(run.run_id, asked.call_id, planner)
        args = json.dumps(json_format.MessageToDict(asked.arguments), ensure_ascii=False)
        console.print(f"  waiting: {asked.tool} {args}\n    {approve}\n    {reject}", highlight=False)
    if run.events:
        console.print("events:")
        printer = EventPrinter(console, console, commands=False)  # the waiting calls' commands are printed above
        for event in run.events:
            printer(event)


@runs_app.command("watch")
def watch_run(
    run_id: RunIdArgument,
    after: Annotated[int, typer.Option(min=0, help="Print only events after this sequence; 0 replays the run.")] = 0,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Print a run's events (as `ask` does) until it ends; exits 1 when the run failed."""
    target = planner_target(planner, config)
    console = Console(soft_wrap=True)
    notices = Console(stderr=True)
    failed: list[planner_pb2.RunEvent] = []

    def on_event(event: planner_pb2.RunEvent) -> None:
        printer(event)
        if event.WhichOneof("event") == "error":
            failed.append(event)

    printer = EventPrinter(console, notices, planner)

    async def follow(channel: grpc.aio.Channel) -> None:
        follower = RunFollower(
            _planner_stub(channel),
            on_event,
            run_id=run_id,
            after_sequence=after,
            on_lost=lambda: notices.print("(stream lost; reconnecting…)", style="dim", highlight=False),
        )
        await follower.follow()

    try:
        call_service(target, follow)
    except RunStreamError as e:
        fail(f"{e.code}: {e.message}", 1)
    if failed:
        raise typer.Exit(1)


@runs_app.command("cancel")
def cancel_run(run_id: RunIdArgument, planner: PlannerOption = None, config: ConfigOption = None) -> None:
    """Stop a run that has not ended; it ends with an error event CANCELLED."""
    request = planner_pb2.CancelRunRequest(run_id=run_id)
    run = call_service(
        planner_target(planner, config), lambda ch: _planner_stub(ch).CancelRun(request, timeout=UNARY_TIMEOUT_S)
    )
    typer.echo(f"run {run.run_id}: {state_name(run.state)}")


@runs_app.command("rate")
def rate_run(
    run_id: RunIdArgument,
    score: Annotated[int, typer.Argument(min=1, max=5, help="1 (wrong or useless) to 5 (exactly right).")],
    comment: Annotated[str, typer.Option(help="Why, in a sentence or two (at most 1000 characters).")] = "",
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Rate an ended run's answer; a new rating replaces the run's previous one."""
    request = planner_pb2.RateRunRequest(run_id=run_id, score=score, comment=comment)
    run = call_service(
        planner_target(planner, config), lambda ch: _planner_stub(ch).RateRun(request, timeout=UNARY_TIMEOUT_S)
    )
    typer.echo(f"rated run {run.run_id}: {run.feedback.score}/5")


def approve(
    run_id: RunIdArgument,
    call_id: CallIdArgument,
    arguments: Annotated[
        str | None, typer.Option(help='Run the call with these arguments instead, a JSON object: \'{"text": "hi"}\'.')
    ] = None,
    comment: Annotated[str, typer.Option(help="Your words, journaled with the decision.")] = "",
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Let a tool call that waits for approval run, optionally with edited arguments."""
    request = planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id=call_id, comment=comment)
    if arguments is not None:
        try:
            request.arguments.CopyFrom(parse_arguments(arguments))
        except ValueError as e:
            fail(str(e), 2)
    run = call_service(
        planner_target(planner, config),
        lambda ch: _planner_stub(ch).ApproveToolCall(request, timeout=UNARY_TIMEOUT_S),
    )
    typer.echo(f"approved {call_id}; run {run.run_id} is {state_name(run.state)}")


def reject(
    run_id: RunIdArgument,
    call_id: CallIdArgument,
    reason: Annotated[str, typer.Option(help="Why; the agent sees it as the call's error.")] = "rejected by a human",
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Refuse a tool call that waits for approval; the agent sees the reason and goes on."""
    request = planner_pb2.RejectToolCallRequest(run_id=run_id, call_id=call_id, reason=reason)
    run = call_service(
        planner_target(planner, config),
        lambda ch: _planner_stub(ch).RejectToolCall(request, timeout=UNARY_TIMEOUT_S),
    )
    typer.echo(f"rejected {call_id}; run {run.run_id} is {state_name(run.state)}")

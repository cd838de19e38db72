"""`meshpilot ask`: streams one run from the planner to the terminal, or prints it as one JSON object."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

from rich.console import Console

from meshpilot.cli.options import CREDENTIALS
from meshpilot.cli.run_stream import (
    DEFAULT_RECONNECT,
    EventPrinter,
    ReconnectPolicy,
    RunFollower,
    RunStreamError,
    RunTranscript,
)
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import create_channel

# The stream may outlive the run's own timeout by this much: the planner ends a timed-out run with an error event.
STREAM_GRACE_S = 30.0


class AskError(Exception):
    """The run could not complete; the reason was already printed."""


def run_request(
    question: str, *, session_id: str | None, max_steps: int, timeout: float, agent: str = "", agent_version: int = 0
) -> planner_pb2.RunRequest:
    """The RunRequest of one `ask`: zeros and empty strings leave the choice to the agent and the planner."""
    budget = planner_pb2.RunBudget(max_steps=max_steps)
    if timeout > 0:
        budget.timeout.FromTimedelta(timedelta(seconds=timeout))
    return planner_pb2.RunRequest(
        task=question, session_id=session_id or "", budget=budget, agent=agent, agent_version=agent_version
    )


async def run_ask(
    question: str,
    *,
    target: str,
    session_id: str | None,
    as_json: bool,
    max_steps: int,
    timeout: float,
    agent: str = "",
    agent_version: int = 0,
    planner_flag: str | None = None,
    reconnect: ReconnectPolicy = DEFAULT_RECONNECT,
) -> None:
    """Runs ``question`` on the planner at ``target``; raises AskError (after printing why) unless it answered.

    A stream that breaks after the run started is followed again with WatchRun (see RunFollower), announced on stderr;
    approval waits print the commands that decide them (naming ``planner_flag`` when the user gave --planner).
    """
    request = run_request(
        question, session_id=session_id, max_steps=max_steps, timeout=timeout, agent=agent, agent_version=agent_version
    )
    console = Console(stderr=as_json)
    notices = Console(stderr=True)
    transcript = RunTranscript()
    printer = EventPrinter(None if as_json else console, notices, planner_flag)

    def on_event(event: planner_pb2.RunEvent) -> None:
        transcript.add(event)
        printer(event)

    began = time.monotonic()
    deadline = began + timeout + STREAM_GRACE_S if timeout > 0 else None
    try:
        async with create_channel(target, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls) as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            follower = RunFollower(
                stub,
                on_event,
                policy=reconnect,
                deadline=deadline,
                on_lost=lambda: notices.print("(stream lost; reconnecting…)", style="dim", highlight=False),
            )
            await follower.follow(stub.Run(request, timeout=(timeout + STREAM_GRACE_S) if timeout > 0 else None))
    except RunStreamError as e:
        hint = " (is the mesh up? run `meshpilot up`)" if e.code == "UNAVAILABLE" and not transcript.run_id else ""
        transcript.error = {"code": e.code, "message": e.message + hint}
        if not as_json:
            console.print(f"[red]error: {e.code}: {e.message}{hint}[/]", highlight=False)
    total_ms = (time.monotonic() - began) * 1000
    if as_json:
        sys.stdout.write(json.dumps(transcript.as_json(total_ms), ensure_ascii=False) + "\n")
    elif transcript.session_id:
        console.print(f"[dim]session {transcript.session_id} · {total_ms / 1000:.1f}s[/]")
    if transcript.error is not None or transcript.answer is None:
        raise AskError(transcript.error)

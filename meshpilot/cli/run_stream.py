"""Following a run's event stream: printing events, folding them into a transcript, and re-attaching after a break."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from rich.console import Console

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common.json_values import message_to_json

TERMINAL_EVENTS = frozenset({"final_answer", "error"})

# A stream that ends with these did not end the run: the planner restarted, a proxy dropped the connection, or the
# transport reset the stream (CANCELLED without us cancelling). The run goes on; WatchRun picks it up again.
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})


class RunStreamError(Exception):
    """Following a run failed for good; ``code`` is a gRPC status name, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a follower re-attaches to a run whose stream broke."""

    initial_backoff_s: float = 0.25
    """Wait before the first WatchRun after a break; doubled after each failed attempt."""
    max_backoff_s: float = 4.0
    """Longest wait between two attempts."""
    max_wait_s: float = 120.0
    """Give up when the run has been unreachable this long (an outage, not a slow run: waiting for approval is fine)."""


DEFAULT_RECONNECT = ReconnectPolicy()


class RunFollower:
    """Feeds every event of one run exactly once, in sequence order, to ``on_event`` until the run ends.

    When a stream breaks with a code in RECONNECT_CODES (or ends before a final_answer/error event) and the run's id
    is known, it calls WatchRun(run_id, after_sequence=last sequence seen) with backoff, calling ``on_lost`` once per
    outage. It raises RunStreamError when the break comes before any event, on any other code, after
    ``policy.max_wait_s`` without an event, or at ``deadline`` (a ``clock`` reading; None: no deadline).
    """

    def __init__(
        self,
        stub: planner_pb2_grpc.PlannerServiceStub,
        on_event: Callable[[planner_pb2.RunEvent], None],
        *,
        run_id: str = "",
        after_sequence: int = 0,
        policy: ReconnectPolicy = DEFAULT_RECONNECT,
        deadline: float | None = None,
        on_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.stub, self.on_event, self.policy, self.deadline = stub, on_event, policy, deadline
        self.run_id, self.last_sequence = run_id, after_sequence
        self.on_lost, self.clock, self.sleep = on_lost, clock, sleep
        self._lost_since: float | None = None  # clock reading of the break we are recovering from

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def watch(self) -> AsyncIterator[planner_pb2.RunEvent]:
        """A WatchRun stream from the last sequence seen."""
        request = planner_pb2.WatchRunRequest(run_id=self.run_id, after_sequence=self.last_sequence)
        return self.stub.WatchRun(request, timeout=self._remaining())

    async def _drain(self, stream: AsyncIterator[planner_pb2.RunEvent]) -> bool:
        """Feeds the stream's new events; True when the run's last event arrived."""
        async for event in stream:
            if event.sequence and event.sequence <= self.last_sequence:
                continue  # WatchRun replays nothing we saw, but a server without sequences must not lose events
            self.run_id = event.run_id or self.run_id
            self.last_sequence = max(self.last_sequence, event.sequence)
            self._lost_since = None
            self.on_event(event)
            if event.WhichOneof("event") in TERMINAL_EVENTS:
                return True
        return False

    async def follow(self, stream: AsyncIterator[planner_pb2.RunEvent] | None = None) -> None:
        """Follows ``stream`` (default: WatchRun of ``run_id``) and its successors until the run ends."""
        backoff = self.policy.initial_backoff_s
        while True:
            try:
                if await self._drain(stream if stream is not None else self.watch()):
                    return
                error = RunStreamError("UNAVAILABLE", "the run's stream ended before its final event")
            except grpc.aio.AioRpcError as e:
                error = RunStreamError(e.code().name, e.details() or "")
                if e.code() not in RECONNECT_CODES:
                    raise error from e
            stream = None
            if not self.run_id:
                raise error
            now = self.clock()
            if self._lost_since is None:
                self._lost_since = now
                backoff = self.policy.initial_backoff_s
                self.on_lost()
            remaining = self._remaining()
            if now - self._lost_since + backoff > self.policy.max_wait_s or (
                remaining is not None and remaining <= backoff
            ):
                raise error
            await self.sleep(backoff)
            backoff = min(backoff * 2, self.policy.max_backoff_s)


def _usage(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
    }


def _struct(message: Any) -> Any:
    return message_to_json(message)


class RunTranscript:
    """Folds a run's events into the steps, usage and timings that `ask --json` prints."""

    def __init__(self) -> None:
        self.session_id = ""
        self.run_id = ""
        self.answer: str | None = None
        self.error: dict[str, str] | None = None
        self.steps: list[dict[str, Any]] = []
        self.usage: dict[str, int] = {}
        self.model_ms = 0.0
        self.tool_ms = 0.0
        self._calls: dict[str, dict[str, Any]] = {}

    def add(self, event: planner_pb2.RunEvent) -> None:
        self.session_id, self.run_id = event.session_id, event.run_id
        kind = event.WhichOneof("event")
        if kind == "model_output":
            out = event.model_output
            self.model_ms += out.timings.total_ms
            self.steps.append({"type": "model_output", "step": out.step, "text": out.text})
        elif kind == "tool_call":
            call = event.tool_call
            entry = {"type": "tool_call", "step": call.step, "tool": call.tool, "arguments": _struct(call.arguments)}
            self._calls[call.call_id] = entry
            self.steps.append(entry)
        elif kind == "tool_result":
            result = event.tool_result
            entry = self._calls.get(result.call_id, {"type": "tool_call", "step": result.step, "tool": result.tool})
            if result.WhichOneof("outcome") == "error":
                entry["error"] = result.error
            else:
                entry["result"] = _struct(result.result)
            duration_ms = result.duration.ToTimedelta().total_seconds() * 1000
            entry["duration_ms"] = round(duration_ms, 1)
            if result.replayed:
                entry["replayed"] = True
            self.tool_ms += duration_ms
        elif kind == "approval_requested":
            asked = event.approval_requested
            self.steps.append(
                {
                    "type": "approval_requested",
                    "step": asked.step,
                    "call_id": asked.call_id,
                    "tool": asked.tool,
                    "arguments": _struct(asked.arguments),
                    "reason": asked.reason,
                }
            )
        elif kind == "approval_decision":
            decision = event.approval_decision
            self.steps.append(
                {
                    "type": "approval_decision",
                    "step": decision.step,
                    "call_id": decision.call_id,
                    "tool": decision.tool,
                    "approved": decision.approved,
                    "arguments": _struct(decision.arguments),
                    "comment": decision.comment,
                }
            )
        elif kind == "plan":
            plan = event.plan
            self.steps.append({"type": "plan", "step": plan.step, "revision": plan.revision, "steps": list(plan.steps)})
        elif kind == "final_answer":
            self.answer = event.final_answer.answer
            self.usage = _usage(event.final_answer.usage)
        elif kind == "error":
            self.error = {"code": event.error.code, "message": event.error.message}

    def as_json(self, total_ms: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.answer,
            "session_id": self.session_id,
            "run_id": self.run_id,
            "steps": self.steps,
            "usage": self.usage,
            "timings": {
                "total_ms": round(total_ms, 1),
                "model_ms": round(self.model_ms, 1),
                "tool_ms": round(self.tool_ms, 1),
            },
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def approval_commands(run_id: str, call_id: str, planner: str | None = None) -> tuple[str, str]:
    """The exact commands that approve and reject one waiting call (naming the planner when it is not the default)."""
    suffix = f" --planner {planner}" if planner else ""
    return (
        f"meshpilot approve {run_id} {call_id}{suffix}",
        f'meshpilot reject {run_id} {call_id} --reason "..."{suffix}',
    )


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class EventPrinter:
    """Prints a run's events for a human on ``out``; approval waits go to ``notices`` when ``out`` is None
    (``ask --json``), because a run that waits for a human must say so even when stdout is reserved for JSON.

    With ``commands`` (a live run), an approval wait also prints the approve/reject commands, naming ``planner``.
    """

    def __init__(
        self, out: Console | None, notices: Console, planner: str | None = None, *, commands: bool = True
    ) -> None:
        self.out, self.notices, self.planner, self.commands = out, notices, planner, commands

    def __call__(self, event: planner_pb2.RunEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "approval_requested":
            self._approval_requested(event)
            return
        console = self.out
        if console is None:
            return
        if kind == "step_started":
            console.print(f"[dim]step {event.step_started.step}[/]")
        elif kind == "tool_call":
            console.print(
                f"  [cyan]→ {event.tool_call.tool}[/] {_compact(_struct(event.tool_call.arguments))}", highlight=False
            )
        elif kind == "tool_result":
            result = event.tool_result
            replayed = " [dim](replayed)[/]" if result.replayed else ""
            if result.WhichOneof("outcome") == "error":
                console.print(f"  [red]← error:[/] {result.error}{replayed}", highlight=False)
            else:
                text = _compact(_struct(result.result))
                console.print(f"  [green]←[/] {text[:300]}{replayed}", highlight=False)
        elif kind == "approval_decision":
            decision = event.approval_decision
            comment = f" — {decision.comment}" if decision.comment else ""
            if decision.approved:
                args = _compact(_struct(decision.arguments))
                console.print(f"  [green]✓ approved[/] {decision.tool} {args}{comment}", highlight=False)
            else:
                console.print(f"  [red]✗ rejected[/] {decision.tool}{comment}", highlight=False)
        elif kind == "plan":
            console.print(f"[dim]plan (revision {event.plan.revision}):[/]")
            for number, step in enumerate(event.plan.steps, 1):
                console.print(f"  {number}. {step}", highlight=False)
        elif kind == "final_answer":
            console.print(f"[bold]{event.final_answer.answer}[/]", highlight=False)
        elif kind == "error":
            console.print(f"[red]run failed: {event.error.code}: {event.error.message}[/]", highlight=False)

    def _approval_requested(self, event: planner_pb2.RunEvent) -> None:
        asked = event.approval_requested
        console = self.out or self.notices
        approve, reject = approval_commands(event.run_id, asked.call_id, self.planner)
        console.print(
            f"  [yellow]⏸ waiting for approval:[/] {asked.tool} {_compact(_struct(asked.arguments))}", highlight=False
        )
        if asked.reason:
            console.print(f"    reason: {asked.reason}", highlight=False)
        if not self.commands:
            return
        console.print(f"    approve: {approve}", highlight=False, soft_wrap=True)
        console.print(f"    reject:  {reject}", highlight=False, soft_wrap=True)

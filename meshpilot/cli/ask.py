"""`meshpilot ask`: streams one run from the planner to the terminal, or prints it as one JSON object."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format
from rich.console import Console

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import create_channel


class AskError(Exception):
    """The run could not complete; the reason was already printed."""


def _usage(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
    }


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
            entry = {
                "type": "tool_call",
                "step": call.step,
                "tool": call.tool,
                "arguments": json_format.MessageToDict(call.arguments),
            }
            self._calls[call.call_id] = entry
            self.steps.append(entry)
        elif kind == "tool_result":
            result = event.tool_result
            entry = self._calls.get(result.call_id, {"type": "tool_call", "step": result.step, "tool": result.tool})
            if result.WhichOneof("outcome") == "error":
                entry["error"] = result.error
            else:
                entry["result"] = json_format.MessageToDict(result.result)
            duration_ms = result.duration.ToTimedelta().total_seconds() * 1000
            entry["duration_ms"] = round(duration_ms, 1)
            self.tool_ms += duration_ms
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


def _print_event(console: Console, event: planner_pb2.RunEvent) -> None:
    kind = event.WhichOneof("event")
    if kind == "step_started":
        console.print(f"[dim]step {event.step_started.step}[/]")
    elif kind == "tool_call":
        args = json.dumps(json_format.MessageToDict(event.tool_call.arguments), ensure_ascii=False)
        console.print(f"  [cyan]→ {event.tool_call.tool}[/] {args}", highlight=False)
    elif kind == "tool_result":
        result = event.tool_result
        if result.WhichOneof("outcome") == "error":
            console.print(f"  [red]← error:[/] {result.error}", highlight=False)
        else:
            text = json.dumps(json_format.MessageToDict(result.result), ensure_ascii=False)
            console.print(f"  [green]←[/] {text[:300]}", highlight=False)
    elif kind == "final_answer":
        console.print(f"[bold]{event.final_answer.answer}[/]", highlight=False)
    elif kind == "error":
        console.print(f"[red]run failed: {event.error.code}: {event.error.message}[/]", highlight=False)


async def run_ask(
    question: str, *, target: str, session_id: str | None, as_json: bool, max_steps: int, timeout: float
) -> None:
    """Runs ``question`` on the planner at ``target``; raises AskError (after printing why) unless it answered."""
    budget = planner_pb2.RunBudget(max_steps=max_steps)
    if timeout > 0:
        budget.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)))
    request = planner_pb2.RunRequest(task=question, session_id=session_id or "", budget=budget)
    console = Console(stderr=as_json)
    transcript = RunTranscript()
    began = time.monotonic()
    try:
        async with create_channel(target) as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            async for event in stub.Run(request, timeout=(timeout + 30) if timeout > 0 else None):
                transcript.add(event)
                if not as_json:
                    _print_event(console, event)
    except grpc.aio.AioRpcError as e:
        hint = " (is the mesh up? run `meshpilot up`)" if e.code() == grpc.StatusCode.UNAVAILABLE else ""
        transcript.error = {"code": e.code().name, "message": (e.details() or "") + hint}
        if not as_json:
            console.print(f"[red]error: {e.code().name}: {e.details()}{hint}[/]", highlight=False)
    total_ms = (time.monotonic() - began) * 1000
    if as_json:
        sys.stdout.write(json.dumps(transcript.as_json(total_ms), ensure_ascii=False) + "\n")
    elif transcript.session_id:
        console.print(f"[dim]session {transcript.session_id} · {total_ms / 1000:.1f}s[/]")
    if transcript.error is not None or transcript.answer is None:
        raise AskError(transcript.error)

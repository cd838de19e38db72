"""The explicit, serialisable state of one run: what the executor journals with every event and resumes from."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from services.planner.types import Budget, Turn, Usage


class Phase(enum.Enum):
    """Where the executor stands; each value names what it does next when it (re)starts."""

    NEXT_STEP = "next_step"
    """Journal StepStarted for step + 1 (or end the run when the step budget is spent)."""
    ASK_MODEL = "ask_model"
    """StepStarted is journaled: ask the model for this step (again, if a crash lost its answer)."""
    RUN_TOOLS = "run_tools"
    """The step's tool calls are journaled: run those not done (with their idempotency keys), wait for approvals."""
    DONE = "done"


class CallStatus(enum.Enum):
    PENDING = "pending"
    """Journaled; runs (again, after a crash) under its idempotency key."""
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    """A human approved it: runs with an approval token."""
    DONE = "done"
    """Has its outcome (a rejected call's outcome is the rejection)."""


@dataclass
class CallRecord:
    """One tool call of a step. ``idempotency_key`` makes a call retried after a crash return its first outcome."""

    call_id: str
    tool: str
    arguments: dict[str, Any]
    idempotency_key: str
    status: CallStatus = CallStatus.PENDING
    approval_reason: str = ""
    result: Any = None
    error: str | None = None

    @property
    def observation(self) -> Any:
        """What the model reads about this call."""
        return {"error": self.error} if self.error is not None else self.result


@dataclass
class StepRecord:
    """One finished (or running) step: the model's output and either its tool calls or a note (why it was refused)."""

    step: int
    action: str
    calls: list[CallRecord] = field(default_factory=list)
    note: str | None = None


@dataclass
class AgentRef:
    """The agent version a run executes, with the parts of its definition the executor needs."""

    name: str
    version: int
    spec: dict[str, Any]


@dataclass
class RunSnapshot:
    """Everything needed to continue a run in another process: identity, task, budget, the transcript of steps, the
    phase, and ``memory`` (JSON the policy owns: facts, a plan ...). ``sequence`` is the last journaled event's.

    ``active_seconds`` counts only time spent running (not waiting for approval); the time budget is charged on it.
    """

    run_id: str
    session_id: str
    task: str
    agent: AgentRef
    budget: Budget
    history: list[Turn] = field(default_factory=list)
    phase: Phase = Phase.NEXT_STEP
    step: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    active_seconds: float = 0.0
    sequence: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def current(self) -> StepRecord | None:
        """The step being worked on (its record exists once the model answered it)."""
        return self.steps[-1] if self.steps and self.steps[-1].step == self.step else None

    def call(self, call_id: str) -> CallRecord | None:
        current = self.current
        return next((c for c in current.calls if c.call_id == call_id), None) if current else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_encode, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunSnapshot:
        data = json.loads(text)
        steps = [
            StepRecord(
                s["step"],
                s["action"],
                [CallRecord(**{**c, "status": CallStatus(c["status"])}) for c in s["calls"]],
                s["note"],
            )
            for s in data.pop("steps")
        ]
        return cls(
            **{
                **data,
                "agent": AgentRef(**data["agent"]),
                "budget": Budget(**data["budget"]),
                "history": [Turn(**t) for t in data["history"]],
                "phase": Phase(data["phase"]),
                "steps": steps,
                "usage": Usage(**data["usage"]),
            }
        )


def _encode(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

"""The planner's domain objects: usage, tools, budgets, turns and the events of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Usage:
    """Token accounting of one model call or, summed, of a whole run."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
        )


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one model call in milliseconds, as the inference service reports them."""

    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    decode_tokens_per_second: float = 0.0


class Generation(NamedTuple):
    """What one model call returned."""

    text: str
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Sampling:
    """How each model call of a run samples: temperature 0 is greedy; ``seed`` makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


@dataclass(frozen=True)
class AgentExample:
    """A worked example of an agent: a task, the tool call that starts it, and optionally the tool's result
    (``observation``, None: not shown) and the final answer taken from it (empty: not shown)."""

    task: str
    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    observation: Any = None
    answer: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the agent may call: its name, a one-line description, the JSON Schema of its arguments, and whether
    the tools service runs it only with a human's approval."""

    name: str
    description: str
    input_schema: dict[str, Any] = field(default_factory=dict)
    requires_approval: bool = False


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool call: exactly one of ``result`` (any JSON value) or ``error`` (the observation).

    ``replayed``: the tools service returned the outcome stored under the call's idempotency key (it did not run the
    tool again).
    """

    result: Any = None
    error: str | None = None
    duration_s: float = 0.0
    replayed: bool = False


@dataclass(frozen=True)
class Budget:
    """Limits of one run: model calls, tokens over all calls (prompt + completion) and wall-clock seconds."""

    max_steps: int
    max_tokens: int
    timeout_s: float


@dataclass(frozen=True)
class Turn:
    """One finished question and answer of a session."""

    task: str
    answer: str
    run_id: str = ""


@dataclass(frozen=True)
class StepStarted:
    step: int


@dataclass(frozen=True)
class ModelOutput:
    step: int
    text: str
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class ToolCalled:
    step: int
    call_id: str
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolReturned:
    """A call's outcome; ``started_at`` is the wall-clock time (Unix seconds) the planner sent it."""

    step: int
    call_id: str
    tool: str
    outcome: ToolOutcome
    started_at: float = 0.0


@dataclass(frozen=True)
class ApprovalRequested:
    """A call waits for a human's decision; the run is WAITING_FOR_APPROVAL meanwhile."""

    step: int
    call_id: str
    tool: str
    arguments: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class ApprovalDecided:
    """A human approved (with these arguments) or rejected (``comment`` is the observation) a call."""

    step: int
    call_id: str
    tool: str
    approved: bool
    arguments: dict[str, Any]
    comment: str


@dataclass(frozen=True)
class PlanMade:
    """A plan_execute agent's plan (revision 1, one more per re-plan)."""

    step: int
    revision: int
    steps: list[str]


@dataclass(frozen=True)
class Finished:
    """The run's last event on success."""

    answer: str
    usage: Usage
    duration_s: float


@dataclass(frozen=True)
class Failed:
    """The run's last event on failure; ``code`` is a google.rpc code name such as RESOURCE_EXHAUSTED."""

    code: str
    message: str


AgentEvent = (
    StepStarted
    | ModelOutput
    | ToolCalled
    | ToolReturned
    | ApprovalRequested
    | ApprovalDecided
    | PlanMade
    | Finished
    | Failed
)

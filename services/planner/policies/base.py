"""The policy interface: what to ask the model next, what its output means, and what the tools' outcomes teach.

A policy decides; the executor (services.planner.executor) acts, journals and resumes. The split follows vLLM's
schedule() / update_from_output(): ``request`` reads the run state, ``on_output`` and ``on_results`` apply what came
back. Everything a policy remembers lives in ``state.memory`` (plain JSON), so a run resumes in another process.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.planner.guardrails import new_nonce
from services.planner.state import RunSnapshot, StepRecord
from services.planner.types import AgentExample, ToolSpec

DEFAULT_MAX_PARALLEL_TOOL_CALLS = 4
DEFAULT_MAX_PLAN_STEPS = 5
DEFAULT_MAX_REPLANS = 2
# The key of the run's data-fence nonce in ``state.memory`` (every policy fences tool output with it).
NONCE_KEY = "data_nonce"


@dataclass(frozen=True)
class PolicyOptions:
    """Per-agent knobs (AgentSpec.policy); zero in the API selects these defaults."""

    max_parallel_tool_calls: int = DEFAULT_MAX_PARALLEL_TOOL_CALLS
    max_plan_steps: int = DEFAULT_MAX_PLAN_STEPS
    max_replans: int = DEFAULT_MAX_REPLANS


@dataclass(frozen=True)
class ModelRequest:
    """One model call: the chat and the JSON Schema its output is constrained to."""

    messages: list[dict[str, str]]
    json_schema: dict[str, Any]


@dataclass(frozen=True)
class CallTools:
    """Run these (tool, arguments) calls, concurrently, then ask again."""

    calls: list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Answer:
    """The run's final answer."""

    text: str


@dataclass(frozen=True)
class Note:
    """No tool this step: record ``text`` as what the model reads next (why its output was refused, or progress)."""

    text: str


@dataclass(frozen=True)
class NewPlan:
    """A plan (its steps), journaled as a plan event; the step's note shows it to the model."""

    steps: list[str]
    revision: int


Decision = CallTools | Answer | Note | NewPlan


@dataclass
class Context:
    """What a policy sees besides the state: the agent's instructions, the tools it may call this run, the
    agent's worked examples and whether the planner's built-in ones follow them."""

    instructions: str
    tools: Sequence[ToolSpec] = field(default_factory=list)
    examples: Sequence[AgentExample] = ()
    builtin_examples: bool = True


class Policy(ABC):
    """Decides a run's steps. Subclasses set ``name`` and are registered in services.planner.policies.POLICIES."""

    name: ClassVar[str]

    def __init__(self, options: PolicyOptions | None = None) -> None:
        self.options = options or PolicyOptions()

    @abstractmethod
    def request(self, state: RunSnapshot, context: Context) -> ModelRequest:
        """The model call for the step ``state.step``."""

    @abstractmethod
    def on_output(self, state: RunSnapshot, context: Context, text: str) -> Decision:
        """What the model's output means; may update ``state.memory``."""

    def on_results(self, state: RunSnapshot, context: Context, step: StepRecord) -> None:
        """Every call of ``step`` has its outcome; update ``state.memory`` (the transcript already holds them)."""
        return None


def data_nonce(state: RunSnapshot) -> str:
    """The run's nonce for fencing tool output (services.planner.guardrails.fence): made on first use and kept in
    ``state.memory``, so a run's prompts stay alike from step to step (the model's prefix cache) and across a resume."""
    nonce = state.memory.get(NONCE_KEY)
    if not isinstance(nonce, str) or not nonce:
        nonce = state.memory[NONCE_KEY] = new_nonce()
    return nonce


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object in ``text``; ValueError saying what is wrong (the model reads it as its observation)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the action was not complete JSON ({e.msg}); reply with one short JSON object") from e
    if not isinstance(value, dict):
        raise ValueError("the action must be a JSON object")
    return value


def parse_tool_calls(value: Any, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """``[{"tool": name, "arguments": {...}}, ...]`` as (name, arguments) pairs; ValueError if malformed."""
    if not isinstance(value, list) or not value:
        raise ValueError('"tool_calls" must be a non-empty list of {"tool": ..., "arguments": {...}}')
    if len(value) > limit:
        raise ValueError(f"at most {limit} tool calls per step")
    calls = []
    for item in value:
        if not (
            isinstance(item, dict) and isinstance(item.get("tool"), str) and isinstance(item.get("arguments"), dict)
        ):
            raise ValueError('each tool call needs "tool" (a name) and "arguments" (an object)')
        calls.append((item["tool"], item["arguments"]))
    return calls

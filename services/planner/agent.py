"""The agent loop: ask the model for a JSON action, run the tool it names, feed the observation back, until an answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from services.common import (
    DeadlineExceededError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
)
from services.planner.prompt import Step, action_schema, answer_candidates, build_messages, dumps
from services.planner.types import (
    AgentEvent,
    Budget,
    Failed,
    Finished,
    Generation,
    ModelOutput,
    StepStarted,
    ToolCalled,
    ToolOutcome,
    ToolReturned,
    ToolSpec,
    Turn,
    Usage,
)

T = TypeVar("T")

# Observations beyond this many characters are cut: a small model's context is short and the answer is usually early.
MAX_OBSERVATION_CHARS = 800


class LLMClient(Protocol):
    """Generates the next action of the agent."""

    async def generate(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any],
        max_tokens: int,
        *,
        timeout: float | None = None,
    ) -> Generation:
        """Greedy chat completion constrained to ``json_schema``; raises MeshError (UnavailableError, ...) on failure."""
        ...


class ToolClient(Protocol):
    """Lists and runs the tools the agent may use."""

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        """Every tool the agent may call."""
        ...

    async def execute(
        self, call_id: str, name: str, arguments: dict[str, Any], *, timeout: float | None = None
    ) -> ToolOutcome:
        """Runs one tool. Unknown tool: NotFoundError; arguments that break its schema: InvalidArgumentError.

        A tool that fails or times out returns an outcome with ``error`` set instead of raising.
        """
        ...


class _BudgetExceeded(Exception):
    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.message)
        self.failure = failure


def observation_text(outcome: ToolOutcome) -> str:
    """The observation the model sees for a tool outcome: compact JSON, cut to MAX_OBSERVATION_CHARS."""
    text = dumps({"error": outcome.error}) if outcome.error is not None else dumps(outcome.result)
    return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + " ...(cut)"


def parse_action(text: str) -> dict[str, Any]:
    """The action object in the model's output; raises ValueError saying what was wrong with it."""
    try:
        action = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the action was not complete JSON ({e.msg}); reply with one short JSON object") from e
    if not isinstance(action, dict):
        raise ValueError("the action must be a JSON object")
    if isinstance(action.get("final_answer"), str):
        return action
    if isinstance(action.get("tool"), str) and isinstance(action.get("arguments"), dict):
        return action
    raise ValueError('the action needs "final_answer" or "tool" and "arguments"')


class AgentLoop:
    """Runs one task to a final answer or an error, yielding every step as an AgentEvent.

    The last event is always ``Finished`` or ``Failed``. Budgets: ``max_steps`` model calls, ``max_tokens`` over all
    calls, and ``timeout_s`` of wall clock whose remainder is passed as the deadline of every model and tool call.
    Tool NOT_FOUND / INVALID_ARGUMENT and failed tools become observations the model sees; a dependency that is
    unavailable ends the run with UNAVAILABLE.
    """

    def __init__(
        self,
        llm: LLMClient,
        tools: ToolClient,
        *,
        step_max_tokens: int,
        history_turns: int,
        grounded_answers: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.llm = llm
        self.tools = tools
        self.step_max_tokens = step_max_tokens
        self.history_turns = history_turns
        self.grounded_answers = grounded_answers
        self.clock = clock

    async def run(self, task: str, history: Sequence[Turn], budget: Budget) -> AsyncIterator[AgentEvent]:
        started = self.clock()
        deadline = started + budget.timeout_s
        usage = Usage()
        history = list(history)[-self.history_turns :] if self.history_turns else []

        async def bounded(call: Callable[..., Awaitable[T]], *args: Any) -> T:
            """``call(*args, timeout=<time left>)``, the time left also bounding the wait."""
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise _BudgetExceeded(_out_of_time(budget))
            try:
                return await asyncio.wait_for(call(*args, timeout=remaining), remaining)
            except (TimeoutError, DeadlineExceededError) as e:
                raise _BudgetExceeded(_out_of_time(budget)) from e

        try:
            tools = await bounded(self.tools.list_tools)
            steps: list[Step] = []
            results: list[Any] = []
            asked: list[Any] = []
            called_tool = False
            for step in range(1, budget.max_steps + 1):
                yield StepStarted(step)
                messages = build_messages(tools, history, task, steps)
                # A model this small answers from memory when it may, and its memory is poor: it must look first.
                answers = answer_candidates(results, exclude=asked) if self.grounded_answers else None
                schema = action_schema(tools, allow_final=called_tool, answers=answers)
                generation = await bounded(self.llm.generate, messages, schema, self.step_max_tokens)
                usage += generation.usage
                yield ModelOutput(step, generation.text, generation.usage, generation.timings)
                if usage.total_tokens > budget.max_tokens:
                    raise _BudgetExceeded(
                        Failed(
                            "RESOURCE_EXHAUSTED",
                            f"token budget ran out: the run used {usage.total_tokens} tokens of its "
                            f"max_tokens={budget.max_tokens}; raise budget.max_tokens",
                        )
                    )
                try:
                    action = parse_action(generation.text)
                except ValueError as e:
                    steps.append(Step(generation.text, dumps({"error": str(e)})))
                    continue
                if "final_answer" in action:
                    yield Finished(action["final_answer"].strip(), usage, self.clock() - started)
                    return
                call_id = f"call-{step}"
                name, arguments = action["tool"], action["arguments"]
                yield ToolCalled(step, call_id, name, arguments)
                began = self.clock()
                try:
                    outcome = await bounded(self.tools.execute, call_id, name, arguments)
                except (NotFoundError, InvalidArgumentError) as e:
                    outcome = ToolOutcome(error=str(e), duration_s=self.clock() - began)
                yield ToolReturned(step, call_id, name, outcome)
                called_tool = True
                if outcome.error is None:
                    results.append(outcome.result)
                    asked.extend(v for v in arguments.values() if isinstance(v, str | int | float))
                steps.append(Step(generation.text, observation_text(outcome)))
            yield Failed(
                "RESOURCE_EXHAUSTED",
                f"step budget ran out: {budget.max_steps} steps without a final answer; raise budget.max_steps",
            )
        except _BudgetExceeded as e:
            yield e.failure
        except MeshError as e:
            # A dependency failed (unavailable, overloaded, refused our request): the run ends with its code.
            yield Failed(e.code.name, str(e))


def _out_of_time(budget: Budget) -> Failed:
    return Failed(
        "DEADLINE_EXCEEDED",
        f"time budget ran out: the run passed its timeout of {budget.timeout_s:g}s; raise budget.timeout",
    )

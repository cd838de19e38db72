"""The agent loop: ask the model for a JSON action, run the tool it names, feed the observation back, until an answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from services.common import (
    DeadlineExceededError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
)
from services.planner.grounding import Fact, collect_facts
from services.planner.prompt import (
    Step,
    action_schema,
    build_messages,
    free_answer_option,
    grounded_answer_options,
    observation_text,
    tool_call_options,
)
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
    unavailable ends the run with UNAVAILABLE (any other dependency failure with its own code).

    ``guided`` (the default, for small models such as SmolLM2-135M) narrows each step's schema: the first action must
    be a tool call; once a tool returned facts the only action left is a final answer that states one of them as a
    sentence ("The capital of France is Paris."), so answers are grounded in what the tools returned; a tool that
    failed or returned nothing is not offered again. Unguided, every step may call any tool or answer in free text.
    """

    def __init__(
        self,
        llm: LLMClient,
        tools: ToolClient,
        *,
        step_max_tokens: int,
        history_turns: int,
        guided: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.llm = llm
        self.tools = tools
        self.step_max_tokens = step_max_tokens
        self.history_turns = history_turns
        self.guided = guided
        self.clock = clock

    def _options(self, tools: list[ToolSpec], facts: list[Fact], spent_tools: set[str]) -> list[dict[str, Any]]:
        if not self.guided:
            return [*tool_call_options(tools), free_answer_option()]
        # A model this small answers from memory when it may, and its memory is poor: it must look first. Once a
        # tool returned something, it must answer from it, or it wanders off into more calls. A tool that failed (or
        # returned nothing) is not offered again: under greedy decoding the model would repeat the same call.
        if facts:
            return grounded_answer_options(facts)
        if not tools:
            return [free_answer_option()]
        return tool_call_options([t for t in tools if t.name not in spent_tools]) or grounded_answer_options([])

    async def run(self, task: str, history: Sequence[Turn], budget: Budget) -> AsyncGenerator[AgentEvent, None]:
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
            facts: list[Fact] = []
            spent_tools: set[str] = set()
            for step in range(1, budget.max_steps + 1):
                yield StepStarted(step)
                messages = build_messages(tools, history, task, steps)
                schema = action_schema(self._options(tools, facts, spent_tools))
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
                    steps.append(Step(generation.text, observation_text({"error": str(e)})))
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
                new_facts = []
                if outcome.error is None:
                    asked = [v for v in arguments.values() if isinstance(v, str | int | float)]
                    new_facts = collect_facts(outcome.result, str(asked[0]) if asked else "", exclude=asked)
                    facts += new_facts
                if not new_facts:
                    spent_tools.add(name)
                observed = {"error": outcome.error} if outcome.error is not None else outcome.result
                steps.append(Step(generation.text, observation_text(observed)))
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

"""The executor: drives one run from its journaled snapshot to its end, or until it waits for a human's approval."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from services.common import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from services.common.approval import ApprovalSigner
from services.planner.agents import AgentDefinition
from services.planner.guardrails import Redactor
from services.planner.journal import RunJournal
from services.planner.policies import Answer, CallTools, Context, NewPlan, Note, Policy
from services.planner.run_spans import RunSpans
from services.planner.state import CallRecord, CallStatus, Phase, RunSnapshot, StepRecord
from services.planner.store import DEFAULT_TENANT, LeaseLostError, RunState
from services.planner.types import (
    GREEDY,
    AgentEvent,
    ApprovalDecided,
    ApprovalRequested,
    Failed,
    Finished,
    Generation,
    ModelOutput,
    PlanMade,
    Sampling,
    StepStarted,
    ToolCalled,
    ToolOutcome,
    ToolReturned,
    ToolSpec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dependency that is restarting (a model loading for ~5-10 s) outlasts the channel's retry policy, and gRPC never
# retries a stream that broke after its first message; the executor retries such calls itself, within the run's time.
RETRY_FIRST_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 2.0
# Tool errors that are the model's mistake (or a refusal), shown to it as the call's observation.
_OBSERVED_ERRORS = (NotFoundError, InvalidArgumentError, PermissionDeniedError, FailedPreconditionError)


class LLMClient(Protocol):
    """The model the agent asks for its next step."""

    async def generate(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any],
        max_tokens: int,
        *,
        timeout: float | None = None,
        model: str = "",
        sampling: Sampling = GREEDY,
    ) -> Generation:
        """A chat completion constrained to ``json_schema``; raises MeshError (UnavailableError, ...) on failure."""
        ...

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        """The ids of the models served."""
        ...


class ToolClient(Protocol):
    """Lists and runs the tools."""

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        """Every registered tool."""
        ...

    async def execute(
        self,
        call_id: str,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str = "",
        approval_token: str = "",
        run_id: str = "",
    ) -> ToolOutcome:
        """Runs one tool; a repeated ``idempotency_key`` returns the first outcome (``replayed``). Unknown tool:
        NotFoundError; bad arguments: InvalidArgumentError; approval required and no valid token:
        PermissionDeniedError. A tool that fails or times out returns an outcome with ``error`` set."""
        ...


@dataclass
class ExecutorDeps:
    """What every executor of a planner shares. ``redactor`` defaults to the default guardrails over this process's
    environment, read once when the deps are made (planner.guardrails configures it: ``Redactor.from_config``)."""

    llm: LLMClient
    tools: ToolClient
    signer: ApprovalSigner
    step_max_tokens: int
    redactor: Redactor = field(default_factory=Redactor.default)
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    retry_delays: tuple[float, float] = (RETRY_FIRST_DELAY_S, RETRY_MAX_DELAY_S)


class RunEnded(Exception):
    """Raised inside the executor to end the run with ``failure``."""

    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class RunExecutor:
    """Runs a run's phases (services.planner.state.Phase) under its policy, journaling each transition before acting
    on it, so ``drive()`` can be called again on the stored snapshot in any process and repeats no journaled step:

    - the model is asked once per journaled StepStarted (again only if a crash lost its answer);
    - tool calls are journaled with idempotency keys before they run, and run again after a crash under the same key
      (the tools service returns the first outcome);
    - calls that need approval park the run (WAITING_FOR_APPROVAL, no time charged) until ``decide``.

    Secrets (``deps.redactor``) are taken out where text enters the run, before anything is journaled: tool outcomes
    (so the model, the guided policy's facts, the journal and watchers see them redacted), the model's output (its
    actions, arguments and answers) and failure messages.
    """

    journal: RunJournal
    definition: AgentDefinition
    policy: Policy
    deps: ExecutorDeps
    tenant: str = DEFAULT_TENANT
    cancel_reason: str = ""
    _running: set[str] = field(default_factory=set)
    _resumed_at: float = 0.0
    _active_before: float = 0.0
    _spans: RunSpans = field(init=False)

    def __post_init__(self) -> None:
        self._spans = RunSpans(self.journal.snapshot, self.tenant)

    @property
    def snapshot(self) -> RunSnapshot:
        return self.journal.snapshot

    def _remaining(self) -> float:
        return self.snapshot.budget.timeout_s - self._active()

    def _active(self) -> float:
        return self._active_before + self.deps.clock() - self._resumed_at

    async def _commit(
        self, events: list[AgentEvent] | tuple[()] = (), state: RunState = RunState.RUNNING, answer: str = ""
    ) -> None:
        self.snapshot.active_seconds = self._active()
        await self.journal.commit(events, state, answer)

    async def drive(self) -> RunState:
        """Advances the run until it ends (its final state) or waits for approval (WAITING_FOR_APPROVAL).

        Cancelling the task with ``cancel_reason`` set ends the run CANCELLED; without it (the planner shutting
        down) the run stays as journaled, to be resumed. Traced as a ``run`` span (services.planner.run_spans)."""
        with self._spans.run() as span:
            state = await self._drive()
            span.set_attribute("meshpilot.run.state", state.value)
            return state

    async def _drive(self) -> RunState:
        self._resumed_at, self._active_before = self.deps.clock(), self.snapshot.active_seconds
        try:
            tools = await self._retrying(lambda timeout: self.deps.tools.list_tools(timeout=timeout))
            context = Context(
                self.definition.instructions,
                [self._marked(t) for t in tools if self.definition.allows(t.name)],
                self.definition.examples,
                self.definition.builtin_examples,
            )
            while True:
                phase = self.snapshot.phase
                if phase is Phase.NEXT_STEP:
                    await self._next_step()
                elif phase is Phase.ASK_MODEL:
                    with self._spans.step(self.snapshot.step):
                        ended = await self._ask_model(context)
                    if ended is not None:
                        return ended
                elif phase is Phase.RUN_TOOLS:
                    with self._spans.step(self.snapshot.step):
                        parked = await self._run_tools(context)
                    if parked:
                        return RunState.WAITING_FOR_APPROVAL
                    async with self.journal.lock:
                        self.policy.on_results(self.snapshot, context, self.snapshot.steps[-1])
                        self.snapshot.phase = Phase.NEXT_STEP
                        await self._commit()
                else:
                    return RunState.SUCCEEDED
        except RunEnded as e:
            return await self._fail(e.failure)
        except asyncio.CancelledError:
            if not self.cancel_reason:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return await self._fail(Failed("CANCELLED", self.cancel_reason))
        except MeshError as e:
            # A dependency refused the run's request (bad model id, overload ...): the run ends with its code.
            return await self._fail(Failed(e.code.name, str(e)))
        except LeaseLostError:
            raise  # another replica drives the run now: stop without a word in its journal
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("run %s failed (incident %s)", self.snapshot.run_id, incident)
            return await self._fail(
                Failed("INTERNAL", f"internal error in the planner (incident {incident}); see its log")
            )

    def _marked(self, tool: ToolSpec) -> ToolSpec:
        """``tool`` as the policy should see it: requiring approval when the agent asks for it, too."""
        if tool.name in self.definition.approval_required and not tool.requires_approval:
            return replace(tool, requires_approval=True)
        return tool

    async def _fail(self, failure: Failed) -> RunState:
        state = RunState.CANCELLED if failure.code == "CANCELLED" else RunState.FAILED
        failure = Failed(failure.code, self.deps.redactor.text(failure.message))
        async with self.journal.lock:
            self.snapshot.phase = Phase.DONE
            await self._commit([failure], state)
        return state

    async def cancel_parked(self, reason: str) -> None:
        """Ends a run that no task is driving (it waits for approval) with CANCELLED."""
        self._resumed_at, self._active_before = self.deps.clock(), self.snapshot.active_seconds
        await self._fail(Failed("CANCELLED", reason))

    async def _next_step(self) -> None:
        snapshot = self.snapshot
        if snapshot.step >= snapshot.budget.max_steps:
            raise RunEnded(
                Failed(
                    "RESOURCE_EXHAUSTED",
                    f"step budget ran out: {snapshot.budget.max_steps} steps without a final answer; "
                    "raise budget.max_steps",
                )
            )
        async with self.journal.lock:
            snapshot.step += 1
            snapshot.phase = Phase.ASK_MODEL
            await self._commit([StepStarted(snapshot.step)])

    async def _ask_model(self, context: Context) -> RunState | None:
        """Asks the model for this step and journals what it decided; the run's final state if that ended it."""
        snapshot, definition = self.snapshot, self.definition
        request = self.policy.request(snapshot, context)
        max_tokens = definition.step_max_tokens or self.deps.step_max_tokens
        with self._spans.model_call(definition.model, max_tokens, definition.sampling) as record:
            generation = await self._retrying(
                lambda timeout: self.deps.llm.generate(
                    request.messages,
                    request.json_schema,
                    max_tokens,
                    timeout=timeout,
                    model=definition.model,
                    sampling=definition.sampling,
                )
            )
            record(generation)
        # A secret the model read despite the redaction of tool results (or guessed) goes no further: not into the
        # journal, not into a tool's arguments, not into the answer.
        text = self.deps.redactor.action(generation.text)
        async with self.journal.lock:
            step = snapshot.step
            snapshot.usage += generation.usage
            events: list[AgentEvent] = [ModelOutput(step, text, generation.usage, generation.timings)]
            if snapshot.usage.total_tokens > snapshot.budget.max_tokens:
                snapshot.phase = Phase.DONE
                events.append(
                    Failed(
                        "RESOURCE_EXHAUSTED",
                        f"token budget ran out: the run used {snapshot.usage.total_tokens} tokens of its "
                        f"max_tokens={snapshot.budget.max_tokens}; raise budget.max_tokens",
                    )
                )
                await self._commit(events, RunState.FAILED)
                return RunState.FAILED
            decision = self.policy.on_output(snapshot, context, text)
            match decision:
                case Answer(answer):
                    answer = self.deps.redactor.text(answer)
                    snapshot.phase = Phase.DONE
                    events.append(Finished(answer, snapshot.usage, self._active()))
                    await self._commit(events, RunState.SUCCEEDED, answer=answer)
                    return RunState.SUCCEEDED
                case Note(note):
                    snapshot.steps.append(StepRecord(step, text, note=note))
                    snapshot.phase = Phase.NEXT_STEP
                case NewPlan(steps, revision):
                    plan = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, start=1))
                    snapshot.steps.append(StepRecord(step, text, note=f"Plan (revision {revision}):\n{plan}"))
                    events.append(PlanMade(step, revision, steps))
                    snapshot.phase = Phase.NEXT_STEP
                case CallTools(calls):
                    events += self._journal_calls(step, text, calls, context)
                    snapshot.phase = Phase.RUN_TOOLS
            await self._commit(events)
            return None

    def _journal_calls(
        self, step: int, action: str, calls: list[tuple[str, dict[str, Any]]], context: Context
    ) -> list[AgentEvent]:
        snapshot = self.snapshot
        by_name = {tool.name: tool for tool in context.tools}
        record = StepRecord(step, action)
        events: list[AgentEvent] = []
        approvals: list[AgentEvent] = []
        for index, (tool, arguments) in enumerate(calls, start=1):
            call_id = f"call-{step}-{index}" if len(calls) > 1 else f"call-{step}"
            call = CallRecord(call_id, tool, arguments, idempotency_key=f"{snapshot.run_id}/{call_id}")
            events.append(ToolCalled(step, call_id, tool, arguments))
            spec = by_name.get(tool)
            if spec is not None and (spec.requires_approval or tool in self.definition.approval_required):
                call.status = CallStatus.AWAITING_APPROVAL
                call.approval_reason = (
                    f"the agent {snapshot.agent.name!r} requires approval for {tool!r}"
                    if tool in self.definition.approval_required
                    else f"the tools service marks {tool!r} as requiring approval"
                )
                approvals.append(ApprovalRequested(step, call_id, tool, arguments, call.approval_reason))
            record.calls.append(call)
        snapshot.steps.append(record)
        return events + approvals

    async def _run_tools(self, context: Context) -> bool:
        """Runs the step's calls that may run, concurrently (at most max_parallel_tool_calls at once), until all have
        their outcome (False) or the rest wait for approval (True: the run is parked)."""
        allowed = {tool.name for tool in context.tools}
        limit = asyncio.Semaphore(self.definition.policy_options.max_parallel_tool_calls)
        while True:
            async with self.journal.lock:
                calls = self.snapshot.steps[-1].calls
                runnable = [c for c in calls if c.status in (CallStatus.PENDING, CallStatus.APPROVED)]
                if not runnable:
                    if any(c.status is CallStatus.AWAITING_APPROVAL for c in calls):
                        await self._commit((), RunState.WAITING_FOR_APPROVAL)
                        return True
                    return False
                self._running.update(c.call_id for c in runnable)

            async def bounded(call: CallRecord) -> None:
                async with limit:
                    with self._spans.tool_call(call):
                        await self._execute(call, allowed)

            tasks = [asyncio.ensure_future(bounded(call)) for call in runnable]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # One call ended the run (out of time, a dependency gone for good) or the run was cancelled: stop
                # the others before the run's end is journaled, so no result is journaled after it.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                self._running.difference_update(c.call_id for c in runnable)

    async def _execute(self, call: CallRecord, allowed: set[str]) -> None:
        snapshot = self.snapshot
        started_at, began = self.deps.wall_clock(), self.deps.clock()
        if call.tool not in allowed:
            outcome = ToolOutcome(
                error=f"tool {call.tool!r} is not one of this agent's tools: {', '.join(sorted(allowed)) or 'none'}"
            )
        else:
            approved = call.status is CallStatus.APPROVED
            try:
                outcome = await self._retrying(
                    lambda timeout: self.deps.tools.execute(
                        call.call_id,
                        call.tool,
                        call.arguments,
                        timeout=timeout,
                        idempotency_key=call.idempotency_key,
                        approval_token=self.deps.signer.mint(snapshot.run_id, call.call_id, call.tool, call.arguments)
                        if approved
                        else "",
                        run_id=snapshot.run_id,
                    )
                )
            except _OBSERVED_ERRORS as e:
                outcome = ToolOutcome(error=str(e), duration_s=self.deps.clock() - began)
        # Before anything keeps it: the model, the guided policy's facts, the journal and watchers see the same text.
        outcome = self.deps.redactor.outcome(outcome)
        async with self.journal.lock:
            call.status = CallStatus.DONE
            call.result, call.error = outcome.result, outcome.error
            await self._commit([ToolReturned(snapshot.step, call.call_id, call.tool, outcome, started_at)])

    def waits_for_approval(self) -> bool:
        """Whether the run's current step has calls waiting for a decision and none ready to run: the state a park
        leaves, until a decision."""
        steps = self.snapshot.steps
        calls = steps[-1].calls if steps else []
        return _waiting(calls)

    async def decide(self, call_id: str, approved: bool, arguments: dict[str, Any] | None, comment: str) -> None:
        """Applies a human's decision on a call that waits for approval: approved calls run (with ``arguments`` if
        given) when the run is driven again; a rejected call's outcome is the rejection, which the model reads.
        NotFoundError for an unknown call, FailedPreconditionError for one that is not waiting."""
        async with self.journal.lock:
            snapshot = self.snapshot
            call = next((c for s in snapshot.steps for c in s.calls if c.call_id == call_id), None)
            if call is None:
                raise NotFoundError(
                    f"run {snapshot.run_id} has no tool call {call_id[:64]!r}; the approval_requested event names it"
                )
            if call.status is not CallStatus.AWAITING_APPROVAL:
                raise FailedPreconditionError(
                    f"tool call {call_id} is not waiting for approval (it {_status_text(call.status)})"
                )
            events: list[AgentEvent] = []
            if approved:
                call.arguments = call.arguments if arguments is None else arguments
                call.status = CallStatus.APPROVED
                events.append(ApprovalDecided(snapshot.step, call_id, call.tool, True, call.arguments, comment))
            else:
                reason = comment or "no reason given"
                call.status = CallStatus.DONE
                call.error = f"a human rejected this call: {reason}"
                events.append(ApprovalDecided(snapshot.step, call_id, call.tool, False, call.arguments, reason))
                events.append(ToolReturned(snapshot.step, call_id, call.tool, ToolOutcome(error=call.error)))
            waiting = _waiting(snapshot.steps[-1].calls)
            await self.journal.commit(events, RunState.WAITING_FOR_APPROVAL if waiting else RunState.RUNNING)

    async def _retrying(self, call: Callable[[float], Awaitable[T]]) -> T:
        """``call(time left)``, retried with backoff while the dependency is UNAVAILABLE, within the run's time."""
        delay, max_delay = self.deps.retry_delays
        while True:
            remaining = self._remaining()
            if remaining <= 0:
                raise RunEnded(_out_of_time(self.snapshot.budget.timeout_s))
            try:
                return await asyncio.wait_for(call(remaining), remaining)
            except (TimeoutError, DeadlineExceededError) as e:
                raise RunEnded(_out_of_time(self.snapshot.budget.timeout_s)) from e
            except UnavailableError as e:
                if self._remaining() <= delay:
                    raise RunEnded(
                        Failed("UNAVAILABLE", f"{e}; it stayed unavailable for the rest of the run's time budget")
                    ) from e
                log.warning("run %s: %s; retrying in %.2fs", self.snapshot.run_id, e, delay)
                await self.deps.sleep(delay)
                delay = min(delay * 2, max_delay)


def _status_text(status: CallStatus) -> str:
    return {
        CallStatus.PENDING: "is about to run",
        CallStatus.APPROVED: "was already approved",
        CallStatus.DONE: "already has its outcome",
    }.get(status, "is waiting")


def _out_of_time(timeout_s: float) -> Failed:
    return Failed(
        "DEADLINE_EXCEEDED", f"time budget ran out: the run passed its timeout of {timeout_s:g}s; raise budget.timeout"
    )


def _waiting(calls: Sequence[CallRecord]) -> bool:
    """Calls wait for a decision and none is ready to run."""
    return any(c.status is CallStatus.AWAITING_APPROVAL for c in calls) and not any(
        c.status in (CallStatus.PENDING, CallStatus.APPROVED) for c in calls
    )

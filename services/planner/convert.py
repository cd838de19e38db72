"""Proto <-> domain conversion for the planner: run events, runs, sessions and budgets."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from meshpilot.common.v1 import common_pb2
from meshpilot.planner.v1 import agents_pb2, planner_pb2
from services.common import InvalidArgumentError
from services.common.json_values import plain_numbers
from services.planner.agents import Agent, AgentDefinition
from services.planner.feedback import Feedback
from services.planner.policies import PolicyOptions
from services.planner.state import CallStatus, RunSnapshot
from services.planner.store import RunRecord, RunState, SessionRecord
from services.planner.types import (
    AgentEvent,
    AgentExample,
    ApprovalDecided,
    ApprovalRequested,
    Budget,
    Failed,
    Finished,
    ModelOutput,
    PlanMade,
    Sampling,
    StepStarted,
    Timings,
    ToolCalled,
    ToolReturned,
    Usage,
)

MAX_TASK_CHARS = 4000
# An approver's comment or a rejection's reason is journaled and shown to the model: a few sentences, not a document.
MAX_COMMENT_CHARS = 1000
# A run may last a day of active time (time waiting for approval is not counted); longer is a mistake, and a huge
# Duration would overflow the deadline arithmetic of every call.
MAX_RUN_TIMEOUT_S = 86_400.0

_STATES = {
    RunState.RUNNING: planner_pb2.RUN_STATE_RUNNING,
    RunState.SUCCEEDED: planner_pb2.RUN_STATE_SUCCEEDED,
    RunState.FAILED: planner_pb2.RUN_STATE_FAILED,
    RunState.CANCELLED: planner_pb2.RUN_STATE_CANCELLED,
    RunState.WAITING_FOR_APPROVAL: planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL,
}
STATES_FROM_PROTO = {value: key for key, value in _STATES.items()}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def usage_from_proto(usage: common_pb2.Usage) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_prompt_tokens)


def timings_to_proto(timings: Timings) -> common_pb2.Timings:
    return common_pb2.Timings(
        queue_ms=timings.queue_ms,
        time_to_first_token_ms=timings.time_to_first_token_ms,
        total_ms=timings.total_ms,
        decode_tokens_per_second=timings.decode_tokens_per_second,
    )


def timings_from_proto(timings: common_pb2.Timings) -> Timings:
    return Timings(timings.queue_ms, timings.time_to_first_token_ms, timings.total_ms, timings.decode_tokens_per_second)


def json_to_value(value: Any) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())


def json_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


def run_event(event: AgentEvent, run_id: str, session_id: str, sequence: int) -> planner_pb2.RunEvent:
    """The RunEvent for one agent event, stamped now."""
    proto = planner_pb2.RunEvent(run_id=run_id, session_id=session_id, sequence=sequence, time=timestamp(time.time()))
    match event:
        case StepStarted(step):
            proto.step_started.step = step
        case ModelOutput(step, text, usage, timings):
            proto.model_output.CopyFrom(
                planner_pb2.ModelOutput(
                    step=step, text=text, usage=usage_to_proto(usage), timings=timings_to_proto(timings)
                )
            )
        case ToolCalled(step, call_id, tool, arguments):
            proto.tool_call.CopyFrom(
                planner_pb2.ToolCall(step=step, call_id=call_id, tool=tool, arguments=json_to_struct(arguments))
            )
        case ToolReturned(step, call_id, tool, outcome, started_at):
            result = planner_pb2.ToolResult(
                step=step,
                call_id=call_id,
                tool=tool,
                duration=duration(outcome.duration_s),
                replayed=outcome.replayed,
            )
            if started_at:
                result.start_time.CopyFrom(timestamp(started_at))
            if outcome.error is not None:
                result.error = outcome.error
            else:
                result.result.CopyFrom(json_to_value(outcome.result))
            proto.tool_result.CopyFrom(result)
        case ApprovalRequested(step, call_id, tool, arguments, reason):
            proto.approval_requested.CopyFrom(approval_request_proto(step, call_id, tool, arguments, reason))
        case ApprovalDecided(step, call_id, tool, approved, arguments, comment):
            proto.approval_decision.CopyFrom(
                planner_pb2.ApprovalDecision(
                    step=step,
                    call_id=call_id,
                    tool=tool,
                    approved=approved,
                    arguments=json_to_struct(arguments),
                    comment=comment,
                )
            )
        case PlanMade(step, revision, steps):
            proto.plan.CopyFrom(planner_pb2.PlanMade(step=step, revision=revision, steps=steps))
        case Finished(answer, usage, seconds):
            proto.final_answer.CopyFrom(
                planner_pb2.FinalAnswer(answer=answer, usage=usage_to_proto(usage), duration=duration(seconds))
            )
        case Failed(code, message):
            proto.error.CopyFrom(planner_pb2.RunError(code=code, message=message))
    return proto


def approval_request_proto(
    step: int, call_id: str, tool: str, arguments: dict[str, Any], reason: str
) -> planner_pb2.ApprovalRequested:
    return planner_pb2.ApprovalRequested(
        step=step, call_id=call_id, tool=tool, arguments=json_to_struct(arguments), reason=reason
    )


def run_to_proto(run: RunRecord) -> planner_pb2.Run:
    proto = planner_pb2.Run(
        run_id=run.run_id,
        session_id=run.session_id,
        task=run.task,
        state=_STATES[run.state],
        answer=run.answer,
        usage=usage_to_proto(run.usage),
        create_time=timestamp(run.create_time),
        events=[planner_pb2.RunEvent.FromString(data) for data in run.events],
        agent=run.agent,
        agent_version=run.agent_version,
        last_sequence=run.last_sequence,
    )
    if run.end_time is not None:
        proto.end_time.CopyFrom(timestamp(run.end_time))
    if run.feedback is not None:
        proto.feedback.CopyFrom(feedback_to_proto(run.feedback))
    if run.state is RunState.WAITING_FOR_APPROVAL and run.snapshot:
        snapshot = RunSnapshot.from_json(run.snapshot)
        for step in snapshot.steps[-1:]:
            proto.pending_approvals.extend(
                approval_request_proto(step.step, c.call_id, c.tool, c.arguments, c.approval_reason)
                for c in step.calls
                if c.status is CallStatus.AWAITING_APPROVAL
            )
    return proto


def feedback_to_proto(feedback: Feedback) -> planner_pb2.RunFeedback:
    return planner_pb2.RunFeedback(
        score=feedback.score,
        comment=feedback.comment,
        rater=feedback.rater,
        rate_time=timestamp(feedback.rate_time),
    )


def session_to_proto(session: SessionRecord) -> planner_pb2.Session:
    return planner_pb2.Session(
        session_id=session.session_id,
        create_time=timestamp(session.create_time),
        turns=[planner_pb2.Turn(run_id=t.run_id, task=t.task, answer=t.answer) for t in session.turns],
    )


def validate_task(task: str) -> str:
    """The task, stripped; raises InvalidArgumentError if it is empty or too long."""
    task = task.strip()
    if not task:
        raise InvalidArgumentError("task is empty; put the question or instruction in RunRequest.task")
    if len(task) > MAX_TASK_CHARS:
        raise InvalidArgumentError(f"task has {len(task)} characters; shorten it to at most {MAX_TASK_CHARS}")
    return task


def validate_comment(text: str, field: str) -> str:
    """The approver's words; InvalidArgumentError when longer than MAX_COMMENT_CHARS."""
    if len(text) > MAX_COMMENT_CHARS:
        raise InvalidArgumentError(f"{field} has {len(text)} characters; shorten it to at most {MAX_COMMENT_CHARS}")
    return text


def budget_from_proto(budget: planner_pb2.RunBudget, defaults: Budget) -> Budget:
    """The run's budget: unset (zero) fields take ``defaults`` (the agent's); bad fields raise InvalidArgumentError."""
    for name in ("max_steps", "max_tokens"):
        if getattr(budget, name) < 0:
            raise InvalidArgumentError(
                f"budget.{name} is {getattr(budget, name)}; use a positive number, or 0 for the default "
                f"({getattr(defaults, name)})"
            )
    timeout_s = budget.timeout.ToNanoseconds() / 1e9
    if not 0 <= timeout_s <= MAX_RUN_TIMEOUT_S:
        raise InvalidArgumentError(
            f"budget.timeout is {timeout_s:g}s; use a duration up to {MAX_RUN_TIMEOUT_S:g}s, or leave it unset for "
            f"the default ({defaults.timeout_s:g}s)"
        )
    return Budget(
        max_steps=budget.max_steps or defaults.max_steps,
        max_tokens=budget.max_tokens or defaults.max_tokens,
        timeout_s=timeout_s or defaults.timeout_s,
    )


def definition_from_proto(spec: agents_pb2.AgentSpec) -> AgentDefinition:
    """The domain definition of an AgentSpec (unchecked: AgentCatalog checks it against the mesh)."""
    return AgentDefinition(
        instructions=spec.instructions,
        model=spec.model,
        tools=tuple(spec.tools),
        approval_required=tuple(spec.approval_required),
        policy=spec.policy.name or "guided",
        policy_options=PolicyOptions(
            spec.policy.max_parallel_tool_calls, spec.policy.max_plan_steps, spec.policy.max_replans
        ),
        max_steps=spec.budget.max_steps,
        max_tokens=spec.budget.max_tokens,
        timeout_seconds=spec.budget.timeout.ToNanoseconds() / 1e9,
        sampling=Sampling(
            spec.sampling.temperature,
            spec.sampling.top_p,
            spec.sampling.seed if spec.sampling.HasField("seed") else None,
        ),
        step_max_tokens=spec.sampling.step_max_tokens,
        history_turns=spec.history_turns if spec.HasField("history_turns") else None,
        examples=tuple(
            AgentExample(
                task=example.task,
                tool=example.tool,
                arguments=plain_numbers(json_format.MessageToDict(example.arguments)),
                observation=(
                    plain_numbers(json_format.MessageToDict(example.observation))
                    if example.HasField("observation")
                    else None
                ),
                answer=example.answer,
            )
            for example in spec.examples
        ),
        builtin_examples=spec.builtin_examples if spec.HasField("builtin_examples") else True,
    )


def agent_to_proto(agent: Agent) -> agents_pb2.Agent:
    d = agent.definition
    spec = agents_pb2.AgentSpec(
        instructions=d.instructions,
        model=d.model,
        tools=list(d.tools),
        approval_required=list(d.approval_required),
        policy=agents_pb2.PolicySpec(
            name=d.policy,
            max_parallel_tool_calls=d.policy_options.max_parallel_tool_calls,
            max_plan_steps=d.policy_options.max_plan_steps,
            max_replans=d.policy_options.max_replans,
        ),
        budget=agents_pb2.AgentBudget(
            max_steps=d.max_steps, max_tokens=d.max_tokens, timeout=duration(d.timeout_seconds)
        ),
        sampling=agents_pb2.AgentSampling(
            temperature=d.sampling.temperature, top_p=d.sampling.top_p, step_max_tokens=d.step_max_tokens
        ),
    )
    if d.sampling.seed is not None:
        spec.sampling.seed = d.sampling.seed
    if d.history_turns is not None:
        spec.history_turns = d.history_turns
    if not d.builtin_examples:
        spec.builtin_examples = False
    for example in d.examples:
        item = spec.examples.add(task=example.task, tool=example.tool, answer=example.answer)
        item.arguments.update(example.arguments)
        if example.observation is not None:
            item.observation.CopyFrom(json_to_value(example.observation))
    return agents_pb2.Agent(
        name=agent.name,
        version=agent.version,
        spec=spec,
        create_time=timestamp(agent.create_time),
        builtin=agent.builtin,
    )

"""A2A v1.0 messages from the planner's runs and events, and what a client's message asks for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from a2a.types import a2a_pb2
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from google.protobuf import json_format, struct_pb2

from meshpilot.planner.v1 import planner_pb2
from services.common.errors import quoted
from services.planner.convert import MAX_COMMENT_CHARS, MAX_TASK_CHARS, run_to_proto
from services.planner.store import RunRecord, RunState

TASK_STATES = {
    RunState.RUNNING: a2a_pb2.TASK_STATE_WORKING,
    RunState.WAITING_FOR_APPROVAL: a2a_pb2.TASK_STATE_INPUT_REQUIRED,
    RunState.SUCCEEDED: a2a_pb2.TASK_STATE_COMPLETED,
    RunState.FAILED: a2a_pb2.TASK_STATE_FAILED,
    RunState.CANCELLED: a2a_pb2.TASK_STATE_CANCELED,
}
RUN_STATES = {value: key for key, value in TASK_STATES.items()}
# What a client may name in acceptedOutputModes to read our answers: text and the events' JSON data parts.
OUTPUT_MODES = ("text/plain", "application/json")
INPUT_MODES = ("text/plain", "application/json")
ANSWER_ARTIFACT = "answer"
_APPROVE_WORDS = {"approve": True, "approved": True, "reject": False, "rejected": False}
_REPLY_HELP = (
    "reply on this task with the text 'approve' or 'reject' (a comment may follow), or with a data part "
    '{"approve": true|false, "callId": ..., "arguments": {...}, "comment": ...}'
)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _data_part(value: dict[str, Any]) -> a2a_pb2.Part:
    return a2a_pb2.Part(data=struct_pb2.Value(struct_value=_struct(value)), media_type="application/json")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event_kind(event: planner_pb2.RunEvent) -> str:
    return event.WhichOneof("event") or ""


def event_state(event: planner_pb2.RunEvent) -> a2a_pb2.TaskState:
    """The task's state right after ``event``."""
    kind = event_kind(event)
    if kind == "approval_requested":
        return a2a_pb2.TASK_STATE_INPUT_REQUIRED
    if kind == "final_answer":
        return a2a_pb2.TASK_STATE_COMPLETED
    if kind == "error":
        return a2a_pb2.TASK_STATE_CANCELED if event.error.code == "CANCELLED" else a2a_pb2.TASK_STATE_FAILED
    return a2a_pb2.TASK_STATE_WORKING


def _summary(event: planner_pb2.RunEvent) -> str:
    """One line a person reads for ``event``; the data part next to it carries the whole event."""
    match event_kind(event):
        case "step_started":
            return f"step {event.step_started.step}"
        case "model_output":
            return event.model_output.text
        case "tool_call":
            call = event.tool_call
            return f"calling {call.tool} {_compact(json_format.MessageToDict(call.arguments))}"
        case "tool_result":
            result = event.tool_result
            if result.WhichOneof("outcome") == "error":
                return f"{result.tool} failed: {result.error}"
            return f"{result.tool} returned {_compact(json_format.MessageToDict(result.result))}"
        case "approval_requested":
            return approval_prompt([event.approval_requested])
        case "approval_decision":
            decision = event.approval_decision
            verb = "approved" if decision.approved else "rejected"
            return f"{verb} {decision.tool} ({decision.call_id})" + (
                f": {decision.comment}" if decision.comment else ""
            )
        case "plan":
            return "plan: " + "; ".join(event.plan.steps)
        case "final_answer":
            return event.final_answer.answer
        case "error":
            return f"{event.error.code}: {event.error.message}"
    return ""


def approval_prompt(pending: list[planner_pb2.ApprovalRequested]) -> str:
    """What an INPUT_REQUIRED task says: which tool calls wait, with which arguments, and how to answer."""
    calls = "; ".join(
        f"{p.tool} (callId {p.call_id}) with arguments {_compact(json_format.MessageToDict(p.arguments))}"
        + (f" because {p.reason}" if p.reason else "")
        for p in pending
    )
    return f"waiting for approval of {calls}; {_REPLY_HELP}"


def event_message(event: planner_pb2.RunEvent) -> a2a_pb2.Message:
    """``event`` as a message of its task: a line of text and the event as JSON; metadata.sequence is the run's
    journal sequence."""
    kind = event_kind(event)
    body = json_format.MessageToDict(getattr(event, kind)) if kind else {}
    return a2a_pb2.Message(
        message_id=f"{event.run_id}-{event.sequence}",
        context_id=event.session_id,
        task_id=event.run_id,
        role=a2a_pb2.ROLE_AGENT,
        parts=[a2a_pb2.Part(text=_summary(event)), _data_part({"event": kind, kind: body})],
        metadata=_struct({"sequence": event.sequence, "event": kind}),
    )


def answer_artifact(answer: str, sequence: int) -> a2a_pb2.Artifact:
    return a2a_pb2.Artifact(
        artifact_id=ANSWER_ARTIFACT,
        name=ANSWER_ARTIFACT,
        description="The agent's final answer",
        parts=[a2a_pb2.Part(text=answer, media_type="text/plain")],
        metadata=_struct({"sequence": sequence}),
    )


def stream_responses(event: planner_pb2.RunEvent) -> list[a2a_pb2.StreamResponse]:
    """What a stream sends for one journaled event: a status update (the final answer's artifact first), each
    with metadata.sequence, so a client sees every event once and in journal order."""
    meta = _struct({"sequence": event.sequence, "event": event_kind(event)})
    responses = []
    if event.HasField("final_answer"):
        update = a2a_pb2.TaskArtifactUpdateEvent(
            task_id=event.run_id,
            context_id=event.session_id,
            artifact=answer_artifact(event.final_answer.answer, event.sequence),
            last_chunk=True,
            metadata=meta,
        )
        responses.append(a2a_pb2.StreamResponse(artifact_update=update))
    status = a2a_pb2.TaskStatus(state=event_state(event), message=event_message(event), timestamp=event.time)
    responses.append(
        a2a_pb2.StreamResponse(
            status_update=a2a_pb2.TaskStatusUpdateEvent(
                task_id=event.run_id, context_id=event.session_id, status=status, metadata=meta
            )
        )
    )
    return responses


def task_message(record: RunRecord) -> a2a_pb2.Message:
    """The user's message that started the run (its task)."""
    return a2a_pb2.Message(
        message_id=f"{record.run_id}-0",
        context_id=record.session_id,
        task_id=record.run_id,
        role=a2a_pb2.ROLE_USER,
        parts=[a2a_pb2.Part(text=record.task)],
        metadata=_struct({"sequence": 0, "event": "task"}),
    )


def run_to_task(record: RunRecord) -> a2a_pb2.Task:
    """A run as an A2A task: its state, the latest status message (for INPUT_REQUIRED, every call that waits),
    its history (the task, then one message per journaled event, in order; only the task when ``record`` was read
    without events), the answer as an artifact once it succeeded, and metadata (agent, agentVersion,
    lastSequence: the journal sequence the task reflects, usage)."""
    run = run_to_proto(record)
    history = [task_message(record), *(event_message(event) for event in run.events)]
    status = a2a_pb2.TaskStatus(state=TASK_STATES[record.state])
    if run.pending_approvals:
        prompt = approval_prompt(list(run.pending_approvals))
        status.message.CopyFrom(
            a2a_pb2.Message(
                message_id=f"{record.run_id}-{record.last_sequence}-input",
                context_id=record.session_id,
                task_id=record.run_id,
                role=a2a_pb2.ROLE_AGENT,
                parts=[a2a_pb2.Part(text=prompt)],
                metadata=_struct({"sequence": record.last_sequence, "event": "input_required"}),
            )
        )
    elif run.events:
        status.message.CopyFrom(history[-1])
    # An ended task's status time is its end (what ListTasks' statusTimestampAfter compares), else its last event's.
    if run.HasField("end_time"):
        status.timestamp.CopyFrom(run.end_time)
    else:
        status.timestamp.CopyFrom(run.events[-1].time if run.events else run.create_time)
    task = a2a_pb2.Task(
        id=record.run_id,
        context_id=record.session_id,
        status=status,
        history=history,
        metadata=_struct(
            {
                "agent": record.agent,
                "agentVersion": record.agent_version,
                "lastSequence": record.last_sequence,
                "usage": json_format.MessageToDict(run.usage),
            }
        ),
    )
    if record.state is RunState.SUCCEEDED:
        task.artifacts.append(answer_artifact(record.answer, record.last_sequence))
    return task


@dataclass(frozen=True)
class Decision:
    """A follow-up message's answer to an INPUT_REQUIRED task."""

    approved: bool
    call_id: str = ""
    arguments: dict[str, Any] | None = None
    comment: str = ""


def message_text(message: a2a_pb2.Message) -> str:
    """The text of a message that starts a task; raises the protocol's errors for parts it cannot read."""
    texts = []
    for index, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        else:
            raise ContentTypeNotSupportedError(
                f"message.parts[{index}] is {kind or 'empty'}; a new task reads text parts only (put the question "
                "in a text part; data parts answer a task that is input-required)"
            )
    text = "\n".join(texts).strip()
    if not text:
        raise InvalidParamsError("the message has no text; put the question or instruction in a text part")
    if len(text) > MAX_TASK_CHARS:
        raise InvalidParamsError(f"the message's text has {len(text)} characters; shorten it to {MAX_TASK_CHARS}")
    return text


def decision_of(message: a2a_pb2.Message) -> Decision:
    """The approval or rejection a follow-up message carries: a data part {"approve": bool, "callId"?,
    "arguments"?, "comment"?}, or text starting with approve/reject (the rest is the comment)."""
    for index, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "data":
            return _data_decision(part.data, f"message.parts[{index}].data")
        if kind == "text":
            word, _, rest = part.text.strip().partition(" ")
            approved = _APPROVE_WORDS.get(word.strip(".,:;!").lower())
            if approved is None:
                raise InvalidParamsError(f"message.parts[{index}].text starts with {quoted(word)}; {_REPLY_HELP}")
            return Decision(approved, comment=_comment(rest.strip(" :,-")))
    raise InvalidParamsError(f"the message has no text or data part; {_REPLY_HELP}")


def _data_decision(value: struct_pb2.Value, where: str) -> Decision:
    data = json_format.MessageToDict(value)
    if not isinstance(data, dict) or not isinstance(data.get("approve"), bool):
        raise InvalidParamsError(f"{where} has no boolean 'approve'; {_REPLY_HELP}")
    unknown = sorted(set(data) - {"approve", "callId", "call_id", "arguments", "comment"})
    if unknown:
        raise InvalidParamsError(f"{where} has unknown keys {', '.join(quoted(k) for k in unknown[:5])}; {_REPLY_HELP}")
    call_id = data.get("callId", data.get("call_id", ""))
    arguments = data.get("arguments")
    comment = data.get("comment", "")
    if not isinstance(call_id, str) or not isinstance(comment, str):
        raise InvalidParamsError(f"{where}: callId and comment are strings")
    if arguments is not None and not (isinstance(arguments, dict) and data["approve"]):
        raise InvalidParamsError(f"{where}.arguments must be an object, and only with approve: true")
    return Decision(data["approve"], call_id, arguments, _comment(comment))


def _comment(text: str) -> str:
    if len(text) > MAX_COMMENT_CHARS:
        raise InvalidParamsError(f"the comment has {len(text)} characters; shorten it to {MAX_COMMENT_CHARS}")
    return text

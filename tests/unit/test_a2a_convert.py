"""A2A conversions without a server: events to stream responses, replies to decisions, errors to rich statuses."""

from __future__ import annotations

import grpc
import pytest
from a2a.types import a2a_pb2
from a2a.utils import errors as a2a_errors
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from meshpilot.planner.v1 import planner_pb2
from services.common import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.planner import a2a
from services.planner.a2a.convert import Decision


def event(sequence: int, **kind: object) -> planner_pb2.RunEvent:
    return planner_pb2.RunEvent(run_id="r1", session_id="s1", sequence=sequence, **kind)


def text(value: str) -> a2a_pb2.Message:
    return a2a_pb2.Message(parts=[a2a_pb2.Part(text=value)])


def data(value: dict) -> a2a_pb2.Message:
    part = a2a_pb2.Part(data=struct_pb2.Value())
    part.data.struct_value.update(value)
    return a2a_pb2.Message(parts=[part])


def test_the_package_exports_what_its_modules_define() -> None:
    exported = {name for name in dir(a2a) if not name.startswith("_")}
    assert set(a2a.__all__) == exported - {"card", "convert", "errors", "servicer"}


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        ({"step_started": planner_pb2.StepStarted(step=1)}, a2a_pb2.TASK_STATE_WORKING),
        (
            {"approval_requested": planner_pb2.ApprovalRequested(tool="t", call_id="c")},
            a2a_pb2.TASK_STATE_INPUT_REQUIRED,
        ),
        ({"error": planner_pb2.RunError(code="CANCELLED", message="stop")}, a2a_pb2.TASK_STATE_CANCELED),
        ({"error": planner_pb2.RunError(code="RESOURCE_EXHAUSTED", message="budget")}, a2a_pb2.TASK_STATE_FAILED),
    ],
)
def test_each_event_is_one_status_update_with_its_sequence(kind, state) -> None:
    responses = a2a.stream_responses(event(4, **kind))

    assert len(responses) == 1
    update = responses[0].status_update
    assert (update.task_id, update.context_id, update.status.state) == ("r1", "s1", state)
    assert update.metadata["sequence"] == 4
    assert update.status.message.metadata["sequence"] == 4


def test_the_final_answer_is_an_artifact_then_the_completed_status() -> None:
    responses = a2a.stream_responses(event(9, final_answer=planner_pb2.FinalAnswer(answer="Paris")))

    assert [r.WhichOneof("payload") for r in responses] == ["artifact_update", "status_update"]
    assert responses[0].artifact_update.artifact.parts[0].text == "Paris"
    assert responses[0].artifact_update.last_chunk
    assert responses[1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED


def test_an_approval_request_says_which_call_waits_with_what_arguments_and_how_to_answer() -> None:
    request = planner_pb2.ApprovalRequested(call_id="call-2", tool="append_note", reason="it writes")
    request.arguments.update({"text": "hello"})
    message = a2a.stream_responses(event(3, approval_requested=request))[0].status_update.status.message

    assert message.parts[0].text.startswith(
        'waiting for approval of append_note (callId call-2) with arguments {"text":"hello"} because it writes; '
    )
    assert "'approve' or 'reject'" in message.parts[0].text


@pytest.mark.parametrize(
    ("reply", "decision"),
    [
        (text("approve"), Decision(True)),
        (text("Approve."), Decision(True)),
        (text("reject: too risky"), Decision(False, comment="too risky")),
        (text("  rejected - no"), Decision(False, comment="no")),
        (data({"approve": True}), Decision(True)),
        (
            data({"approve": True, "callId": "call-3", "arguments": {"x": 1}, "comment": "ok"}),
            Decision(True, "call-3", {"x": 1.0}, "ok"),
        ),
        (data({"approve": False, "call_id": "call-1"}), Decision(False, "call-1")),
    ],
)
def test_replies_to_an_input_required_task(reply, decision) -> None:
    assert a2a.decision_of(reply) == decision


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (a2a_pb2.Message(), "no text or data part"),
        (text("yes please"), "starts with 'yes'"),
        (data({"approve": "yes"}), "boolean 'approve'"),
        (data({"approve": True, "extra": 1}), "unknown keys 'extra'"),
        (data({"approve": True, "callId": 3}), "callId and comment are strings"),
        (data({"approve": False, "arguments": {"x": 1}}), "only with approve: true"),
        (text("reject " + "x" * 2000), "2000 characters"),
    ],
)
def test_replies_that_are_not_decisions_say_how_to_answer(reply, words) -> None:
    with pytest.raises(a2a_errors.InvalidParamsError) as error:
        a2a.decision_of(reply)
    assert words in error.value.message


def test_message_text_joins_text_parts_and_refuses_others() -> None:
    assert a2a.message_text(a2a_pb2.Message(parts=[a2a_pb2.Part(text="a"), a2a_pb2.Part(text="b ")])) == "a\nb"
    with pytest.raises(a2a_errors.ContentTypeNotSupportedError, match=r"parts\[1\] is raw"):
        a2a.message_text(a2a_pb2.Message(parts=[a2a_pb2.Part(text="a"), a2a_pb2.Part(raw=b"\x00")]))


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (a2a_errors.TaskNotFoundError("x"), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND"),
        (a2a_errors.TaskNotCancelableError("x"), grpc.StatusCode.FAILED_PRECONDITION, "TASK_NOT_CANCELABLE"),
        (a2a_errors.UnsupportedOperationError("x"), grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED_OPERATION"),
        (a2a_errors.InvalidParamsError("x"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMS"),
        (a2a_errors.ContentTypeNotSupportedError("x"), grpc.StatusCode.INVALID_ARGUMENT, "CONTENT_TYPE_NOT_SUPPORTED"),
        (
            a2a_errors.PushNotificationNotSupportedError("x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PUSH_NOTIFICATION_NOT_SUPPORTED",
        ),
        (NotFoundError("x"), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND"),
        (InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMS"),
        (FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED_OPERATION"),
    ],
)
def test_errors_carry_the_binding_status_and_an_error_info(error, code, reason) -> None:
    status = a2a.rich_status(a2a.protocol_error(error))
    details = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    details.details[0].Unpack(info)

    assert (status.code, status.details) == (code, "x")
    assert (info.reason, info.domain) == (reason, "a2a-protocol.org")


def test_an_error_message_is_bounded() -> None:
    status = a2a.rich_status(a2a_errors.InvalidParamsError("y" * 1_000_000))
    assert len(status.details.encode()) <= 2000

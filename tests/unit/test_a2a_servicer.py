"""The A2A gRPC binding on an in-process planner (fake model and tools): tasks as runs, streams without gaps,
approvals as input-required, the agent card, and the protocol's errors as the a2a-sdk's client reads them."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest
from a2a.client.transports.grpc import GrpcTransport
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.utils import errors as a2a_errors
from a2a.utils.grpc_status import status_from_call
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import load_config
from services.common.approval import ApprovalSigner
from services.common.auth import ApiKeyStore
from services.common.clients import create_channel
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call

SIGNER = ApprovalSigner(b"k" * 64)
FRANCE = [call("country_facts", country="France"), answer("Paris")]


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})


def react(tool: str, **arguments: Any) -> str:
    return json.dumps({"thought": "compute", "tool_calls": [{"tool": tool, "arguments": arguments}]})


def react_answer(text: str) -> str:
    return json.dumps({"thought": "done", "final_answer": text})


def text_message(text: str, *, task_id: str = "", context_id: str = "", **metadata: Any) -> a2a_pb2.Message:
    message = a2a_pb2.Message(
        message_id=uuid.uuid4().hex,
        role=a2a_pb2.ROLE_USER,
        parts=[a2a_pb2.Part(text=text)],
        task_id=task_id,
        context_id=context_id,
    )
    message.metadata.update(metadata)
    return message


def data_message(task_id: str, data: dict[str, Any]) -> a2a_pb2.Message:
    value = struct_pb2.Value()
    value.struct_value.update(data)
    return a2a_pb2.Message(
        message_id=uuid.uuid4().hex, role=a2a_pb2.ROLE_USER, task_id=task_id, parts=[a2a_pb2.Part(data=value)]
    )


def send(message: a2a_pb2.Message, **configuration: Any) -> a2a_pb2.SendMessageRequest:
    return a2a_pb2.SendMessageRequest(message=message, configuration=a2a_pb2.SendMessageConfiguration(**configuration))


def sequence(response: a2a_pb2.StreamResponse) -> int:
    payload = getattr(response, response.WhichOneof("payload"))
    return int(payload.metadata["sequence"])


async def read_all(call: Any) -> list[a2a_pb2.StreamResponse]:
    """What is left of a stream read with ``read()`` (grpc refuses mixing it with iteration)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def a2a(planner: Planner) -> a2a_pb2_grpc.A2AServiceStub:
    return a2a_pb2_grpc.A2AServiceStub(planner.channel)


def sdk(planner: Planner) -> GrpcTransport:
    """The a2a-sdk's own gRPC transport on the planner's channel: errors come back as its error classes."""
    return GrpcTransport(planner.channel, None)


async def create_careful_agent(planner: Planner) -> None:
    from meshpilot.planner.v1 import agents_pb2

    spec = agents_pb2.AgentSpec(
        instructions="You compute.\nCarefully.",
        tools=["calculator"],
        approval_required=["calculator"],
        policy=agents_pb2.PolicySpec(name="react"),
    )
    await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="careful", spec=spec))


async def test_send_message_blocks_until_the_task_completes(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        response = await a2a(planner).SendMessage(send(text_message("What is the capital of France?")))

    task = response.task
    assert task.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert [p.text for p in task.artifacts[0].parts] == ["Paris"]
    assert task.history[0].role == a2a_pb2.ROLE_USER
    assert task.history[0].parts[0].text == "What is the capital of France?"
    assert [int(m.metadata["sequence"]) for m in task.history] == list(range(0, 8))
    assert {m.context_id for m in task.history} == {task.context_id}
    assert task.metadata["agent"] == "default" and task.metadata["lastSequence"] == 7
    tool_call = json_format.MessageToDict(task.history[3].parts[1].data)
    assert tool_call == {"event": "tool_call", "tool_call": {"step": 1, "callId": "call-1", "tool": "country_facts",
                                                               "arguments": {"country": "France"}}}  # fmt: skip


async def test_history_length_keeps_the_newest_messages(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        done = (await a2a(planner).SendMessage(send(text_message("France?"), history_length=2))).task
        none = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=done.id, history_length=0))
        full = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=done.id))

    assert [int(m.metadata["sequence"]) for m in done.history] == [6, 7]
    assert len(none.history) == 0 and len(full.history) == 8


async def test_return_immediately_answers_before_the_run_ends(config) -> None:
    llm = ScriptedLLM(list(FRANCE))
    llm.gate = asyncio.Event()
    async with Planner(config, llm, FakeTools()) as planner:
        task = (await a2a(planner).SendMessage(send(text_message("France?"), return_immediately=True))).task
        llm.gate.set()
        async for _ in planner.stub.WatchRun(_watch(task.id)):
            pass
        done = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=task.id))

    assert task.status.state == a2a_pb2.TASK_STATE_WORKING
    assert done.status.state == a2a_pb2.TASK_STATE_COMPLETED


def _watch(run_id: str) -> Any:
    from meshpilot.planner.v1 import planner_pb2

    return planner_pb2.WatchRunRequest(run_id=run_id)


async def test_a_stream_sends_the_task_then_every_event_once_in_order(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        responses = [r async for r in a2a(planner).SendStreamingMessage(send(text_message("France?")))]

    assert responses[0].WhichOneof("payload") == "task"
    updates = responses[1:]
    assert [r.WhichOneof("payload") for r in updates] == ["status_update"] * 6 + ["artifact_update", "status_update"]
    assert [sequence(r) for r in updates] == [1, 2, 3, 4, 5, 6, 7, 7]
    assert updates[-2].artifact_update.artifact.parts[0].text == "Paris"
    assert updates[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert {r.status_update.task_id for r in updates if r.HasField("status_update")} == {responses[0].task.id}


async def test_subscribe_after_a_broken_stream_misses_nothing_and_repeats_nothing(config) -> None:
    llm = ScriptedLLM(list(FRANCE))
    llm.holds[1] = asyncio.Event()  # the second model call waits: the task is mid-run when the stream breaks
    async with Planner(config, llm, FakeTools()) as planner:
        stream = a2a(planner).SendStreamingMessage(send(text_message("France?")))
        first = [await stream.read() for _ in range(4)]  # the task, then sequences 1..3
        stream.cancel()
        task_id = first[0].task.id
        resubscribed = a2a(planner).SubscribeToTask(a2a_pb2.SubscribeToTaskRequest(id=task_id))
        snapshot = (await resubscribed.read()).task
        llm.holds[1].set()
        rest = await read_all(resubscribed)

    seen = [sequence(r) for r in first[1:]]
    in_snapshot = [int(m.metadata["sequence"]) for m in snapshot.history if int(m.metadata["sequence"]) > seen[-1]]
    streamed = sorted({sequence(r) for r in rest})
    assert seen == [1, 2, 3]
    assert snapshot.status.state == a2a_pb2.TASK_STATE_WORKING
    assert int(snapshot.metadata["lastSequence"]) == seen[-1] + len(in_snapshot)
    assert seen + in_snapshot + streamed == list(range(1, 8))
    assert rest[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED


async def test_an_approval_wait_is_input_required_and_an_approving_message_completes_it(config) -> None:
    llm = ScriptedLLM([react("calculator", expression="17 * 23"), react_answer("391")])
    tools = FakeTools()
    async with Planner(config, llm, tools, signer=SIGNER) as planner:
        await create_careful_agent(planner)
        waiting = (await a2a(planner).SendMessage(send(text_message("17 * 23?", agent="careful")))).task
        streamed = [
            r async for r in a2a(planner).SendStreamingMessage(send(text_message("approve: fine", task_id=waiting.id)))
        ]
        done = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=waiting.id))

    assert waiting.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED
    prompt = waiting.status.message.parts[0].text
    assert "calculator (callId call-1)" in prompt and '{"expression":"17 * 23"}' in prompt and "approve" in prompt
    assert tools.calls[0][1:3] == ("calculator", {"expression": "17 * 23"})
    assert streamed[0].task.status.state == a2a_pb2.TASK_STATE_WORKING
    assert streamed[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert done.artifacts[0].parts[0].text == "391"
    decision = next(m for m in done.history if m.metadata["event"] == "approval_decision")
    assert decision.parts[0].text == "approved calculator (call-1): fine"


async def test_a_decision_that_comes_while_the_parked_run_winds_down_still_drives_it_on(config, monkeypatch) -> None:
    # The race a loaded machine opened: the park is journaled (the client sees input-required and approves) before
    # the task that parked has ended, so decide() finds the run still driven and starts nothing; that task must not
    # leave the decision unread.
    from services.planner.executor import RunExecutor

    drive, decide = RunExecutor.drive, RunExecutor.decide
    decided = asyncio.Event()

    async def slow_to_end(self: RunExecutor):
        state = await drive(self)
        if not decided.is_set():
            await decided.wait()  # the decision arrives while this task still runs
        return state

    async def deciding(self: RunExecutor, *args: Any) -> None:
        await decide(self, *args)
        decided.set()

    monkeypatch.setattr(RunExecutor, "drive", slow_to_end)
    monkeypatch.setattr(RunExecutor, "decide", deciding)
    llm = ScriptedLLM([react("calculator", expression="17 * 23"), react_answer("391")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        sent = a2a(planner).SendMessage(send(text_message("17 * 23?", agent="careful"), return_immediately=True))
        waiting = (await sent).task
        for _ in range(200):  # until the park is journaled (the task that parked is still running: it waits above)
            waiting = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=waiting.id))
            if waiting.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED:
                break
            await asyncio.sleep(0.02)
        assert waiting.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED
        approve = a2a(planner).SendMessage(send(text_message("approve: fine", task_id=waiting.id)))
        done = (await asyncio.wait_for(approve, 20)).task

    assert done.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert done.artifacts[0].parts[0].text == "391"


async def test_a_blocking_send_returns_when_the_park_is_journaled_after_its_approval_request(
    config, monkeypatch
) -> None:
    # The hang a loaded machine found: approval_requested is journaled while the run is still RUNNING, and the park
    # is a commit of its own, without events; a SendMessage that read the state between the two saw a running task
    # and then waited for an event that never comes. The park's commit must wake it (the idle poll is off here).
    from services.planner import runs
    from services.planner.journal import RunJournal
    from services.planner.store import RunState

    commit = RunJournal._commit

    async def late_park(self: RunJournal, events, state, answer):
        if not events and state is RunState.WAITING_FOR_APPROVAL:
            await asyncio.sleep(0.5)  # the follower has read the RUNNING state by now
        await commit(self, events, state, answer)

    monkeypatch.setattr(RunJournal, "_commit", late_park)
    monkeypatch.setattr(runs, "JOURNAL_POLL_SECONDS", 3600.0)
    llm = ScriptedLLM([react("calculator", expression="6 * 7")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        sent = a2a(planner).SendMessage(send(text_message("6 * 7?", agent="careful")))
        waiting = (await asyncio.wait_for(sent, 20)).task

    assert waiting.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED


async def test_a_rejecting_data_part_becomes_the_observation(config) -> None:
    llm = ScriptedLLM([react("calculator", expression="2+2"), react_answer("I may not.")])
    tools = FakeTools()
    async with Planner(config, llm, tools, signer=SIGNER) as planner:
        await create_careful_agent(planner)
        waiting = (await a2a(planner).SendMessage(send(text_message("2+2?", agent="careful")))).task
        reply = data_message(waiting.id, {"approve": False, "callId": "call-1", "comment": "not today"})
        done = (await a2a(planner).SendMessage(send(reply))).task

    assert done.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert tools.calls == []
    assert "not today" in llm.requests[1]["messages"][-1]["content"]


async def test_a_follow_up_in_the_same_context_continues_the_session(config) -> None:
    llm = ScriptedLLM([*FRANCE, answer("Still Paris")])
    async with Planner(config, llm, FakeTools()) as planner:
        first = (await a2a(planner).SendMessage(send(text_message("France?")))).task
        second = (await a2a(planner).SendMessage(send(text_message("And again?", context_id=first.context_id)))).task
        listed = await a2a(planner).ListTasks(a2a_pb2.ListTasksRequest(context_id=first.context_id, page_size=1))
        page2 = await a2a(planner).ListTasks(
            a2a_pb2.ListTasksRequest(context_id=first.context_id, page_size=1, page_token=listed.next_page_token)
        )
        completed = await a2a(planner).ListTasks(
            a2a_pb2.ListTasksRequest(status=a2a_pb2.TASK_STATE_COMPLETED, include_artifacts=True, history_length=1)
        )
        working = await a2a(planner).ListTasks(a2a_pb2.ListTasksRequest(status=a2a_pb2.TASK_STATE_WORKING))

    assert second.context_id == first.context_id and second.id != first.id
    assert any("Paris" in m["content"] for m in llm.requests[-1]["messages"])  # the earlier turn
    assert [t.id for t in listed.tasks] == [second.id] and listed.total_size == 2
    assert [t.id for t in page2.tasks] == [first.id] and page2.next_page_token == ""
    assert [len(t.history) for t in completed.tasks] == [1, 1]
    assert completed.tasks[0].artifacts[0].parts[0].text == "Still Paris"
    assert list(working.tasks) == []


async def test_cancel_task_ends_an_input_required_task_canceled(config) -> None:
    llm = ScriptedLLM([react("calculator", expression="1+1")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        waiting = (await a2a(planner).SendMessage(send(text_message("1+1?", agent="careful")))).task
        canceled = await a2a(planner).CancelTask(a2a_pb2.CancelTaskRequest(id=waiting.id))
        with pytest.raises(a2a_errors.TaskNotCancelableError) as again:
            await sdk(planner).cancel_task(a2a_pb2.CancelTaskRequest(id=waiting.id))

    assert canceled.status.state == a2a_pb2.TASK_STATE_CANCELED
    assert "has ended (TASK_STATE_CANCELED)" in again.value.message


async def test_the_extended_card_lists_agents_as_skills_and_the_grpc_interface(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        card = await a2a(planner).GetExtendedAgentCard(a2a_pb2.GetExtendedAgentCardRequest())
        address = planner.server.address
        reflection = reflection_pb2_grpc.ServerReflectionStub(planner.channel)
        listed = [
            r
            async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]

    assert [s.id for s in card.skills] == ["default", "careful"]
    careful = card.skills[1]
    assert careful.description == "You compute." and "tool:calculator" in careful.tags
    assert [(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces] == [
        (address, "GRPC", "1.0")
    ]
    assert card.capabilities.streaming and not card.capabilities.push_notifications
    assert not card.security_schemes
    services = [s.name for s in listed[0].list_services_response.service]
    assert "lf.a2a.v1.A2AService" in services


async def test_with_authentication_the_card_names_the_bearer_scheme_and_tenants_do_not_see_each_other(
    tmp_path,
) -> None:
    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        keys = ApiKeyStore(config.auth.keys_path)
        alice = create_channel(planner.server.address, api_key=keys.create("alice")[1])
        bob = create_channel(planner.server.address, api_key=keys.create("bob")[1])
        try:
            card = await a2a_pb2_grpc.A2AServiceStub(alice).GetExtendedAgentCard(a2a_pb2.GetExtendedAgentCardRequest())
            task = (await a2a_pb2_grpc.A2AServiceStub(alice).SendMessage(send(text_message("France?")))).task
            bobs_client = GrpcTransport(bob, None)
            not_found = {
                "get": bobs_client.get_task(a2a_pb2.GetTaskRequest(id=task.id)),
                "cancel": bobs_client.cancel_task(a2a_pb2.CancelTaskRequest(id=task.id)),
                "follow-up": bobs_client.send_message(send(text_message("approve", task_id=task.id))),
            }
            for coroutine in not_found.values():
                with pytest.raises(a2a_errors.TaskNotFoundError):
                    await coroutine
            with pytest.raises(a2a_errors.TaskNotFoundError):
                async for _ in bobs_client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task.id)):
                    pass
            bobs = await a2a_pb2_grpc.A2AServiceStub(bob).ListTasks(a2a_pb2.ListTasksRequest())
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=task.id))
        finally:
            await alice.close()
            await bob.close()
            keys.close()

    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert list(card.security_requirements[0].schemes) == ["bearer"]
    assert task.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert list(bobs.tasks) == []
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# Each bad request, the error class the a2a-sdk's client raises for it, and words its message must contain.
BAD_SENDS = {
    "no message": (a2a_pb2.SendMessageRequest(), a2a_errors.InvalidParamsError, "message is required"),
    "no message id": (
        a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(parts=[a2a_pb2.Part(text="hi")])),
        a2a_errors.InvalidParamsError,
        "messageId",
    ),
    "agent role": (
        send(a2a_pb2.Message(message_id="m", role=a2a_pb2.ROLE_AGENT, parts=[a2a_pb2.Part(text="hi")])),
        a2a_errors.InvalidParamsError,
        "ROLE_USER",
    ),
    "empty text": (send(text_message("   ")), a2a_errors.InvalidParamsError, "has no text"),
    "too long": (send(text_message("x" * 100_000)), a2a_errors.InvalidParamsError, "100000 characters"),
    "file part": (
        send(a2a_pb2.Message(message_id="m", parts=[a2a_pb2.Part(url="https://example.com/a.pdf")])),
        a2a_errors.ContentTypeNotSupportedError,
        "text parts only",
    ),
    "unknown agent": (send(text_message("hi", agent="nobody")), a2a_errors.InvalidParamsError, "GetExtendedAgentCard"),
    "bad agent version": (
        send(text_message("hi", agent="default", agentVersion=1.5)),
        a2a_errors.InvalidParamsError,
        "agentVersion",
    ),
    "unknown context": (send(text_message("hi", context_id="nope")), a2a_errors.InvalidParamsError, "contextId"),
    "unknown task": (send(text_message("approve", task_id="nope")), a2a_errors.TaskNotFoundError, "nope"),
    "negative history": (send(text_message("hi"), history_length=-1), a2a_errors.InvalidParamsError, "history"),
    "image only": (
        send(text_message("hi"), accepted_output_modes=["image/png"]),
        a2a_errors.ContentTypeNotSupportedError,
        "text/plain",
    ),
    "push config": (
        send(text_message("hi"), task_push_notification_config=a2a_pb2.TaskPushNotificationConfig(url="http://x")),
        a2a_errors.PushNotificationNotSupportedError,
        "SubscribeToTask",
    ),
    "other tenant": (
        a2a_pb2.SendMessageRequest(tenant="other", message=text_message("hi")),
        a2a_errors.InvalidParamsError,
        "tenant",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SENDS))
async def test_bad_messages_get_the_protocol_error_that_says_what_to_change(config, case) -> None:
    request, error, words = BAD_SENDS[case]
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        with pytest.raises(error) as unary:
            await sdk(planner).send_message(request)
        with pytest.raises(error) as streamed:
            async for _ in sdk(planner).send_message_streaming(request):
                pass

    assert words in unary.value.message and unary.value.message == streamed.value.message
    assert len(unary.value.message.encode()) <= 2000


async def test_task_calls_on_unknown_or_ended_tasks_get_the_protocol_errors(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        client = sdk(planner)
        done = (await a2a(planner).SendMessage(send(text_message("France?")))).task
        checks = {
            "get unknown": (client.get_task(a2a_pb2.GetTaskRequest(id="nope")), a2a_errors.TaskNotFoundError),
            "get negative history": (
                client.get_task(a2a_pb2.GetTaskRequest(id=done.id, history_length=-2)),
                a2a_errors.InvalidParamsError,
            ),
            "cancel unknown": (client.cancel_task(a2a_pb2.CancelTaskRequest(id="nope")), a2a_errors.TaskNotFoundError),
            "cancel ended": (
                client.cancel_task(a2a_pb2.CancelTaskRequest(id=done.id)),
                a2a_errors.TaskNotCancelableError,
            ),
            "follow-up to ended": (
                client.send_message(send(text_message("approve", task_id=done.id))),
                a2a_errors.UnsupportedOperationError,
            ),
            "page size": (client.list_tasks(a2a_pb2.ListTasksRequest(page_size=0)), a2a_errors.InvalidParamsError),
            "page token": (
                client.list_tasks(a2a_pb2.ListTasksRequest(page_token="garbage")),
                a2a_errors.InvalidParamsError,
            ),
            "push get": (
                client.get_task_push_notification_config(a2a_pb2.GetTaskPushNotificationConfigRequest(task_id="t")),
                a2a_errors.PushNotificationNotSupportedError,
            ),
            "push create": (
                client.create_task_push_notification_config(a2a_pb2.TaskPushNotificationConfig(task_id="t")),
                a2a_errors.PushNotificationNotSupportedError,
            ),
            "push list": (
                client.list_task_push_notification_configs(a2a_pb2.ListTaskPushNotificationConfigsRequest(task_id="t")),
                a2a_errors.PushNotificationNotSupportedError,
            ),
            "push delete": (
                client.delete_task_push_notification_config(
                    a2a_pb2.DeleteTaskPushNotificationConfigRequest(task_id="t")
                ),
                a2a_errors.PushNotificationNotSupportedError,
            ),
        }
        raised = {}
        for name, (coroutine, _) in checks.items():
            try:
                await coroutine
            except a2a_errors.A2AError as error:
                raised[name] = type(error)
        with pytest.raises(a2a_errors.UnsupportedOperationError) as ended:
            async for _ in client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=done.id)):
                pass
        with pytest.raises(a2a_errors.TaskNotFoundError):
            async for _ in client.subscribe(a2a_pb2.SubscribeToTaskRequest(id="nope")):
                pass

    assert raised == {name: error for name, (_, error) in checks.items()}
    assert "read it with GetTask" in ended.value.message


async def test_bad_replies_to_an_input_required_task_say_how_to_answer(config) -> None:
    llm = ScriptedLLM([react("calculator", expression="1+1")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        waiting = (await a2a(planner).SendMessage(send(text_message("1+1?", agent="careful")))).task
        replies = {
            "maybe": send(text_message("maybe later", task_id=waiting.id)),
            "no approve key": send(data_message(waiting.id, {"yes": True})),
            "unknown call": send(data_message(waiting.id, {"approve": True, "callId": "call-9"})),
            "other context": send(text_message("approve", task_id=waiting.id, context_id="elsewhere")),
            "long comment": send(text_message("reject " + "x" * 5000, task_id=waiting.id)),
        }
        messages = {}
        for name, request in replies.items():
            with pytest.raises(a2a_errors.InvalidParamsError) as error:
                await sdk(planner).send_message(request)
            messages[name] = error.value.message
        still = await a2a(planner).GetTask(a2a_pb2.GetTaskRequest(id=waiting.id))

    assert "'approve' or 'reject'" in messages["maybe"] and "'maybe'" in messages["maybe"]
    assert "boolean 'approve'" in messages["no approve key"]
    assert "call-9" in messages["unknown call"] and "call-1" in messages["unknown call"]
    assert "contextId" in messages["other context"]
    assert "5000 characters" in messages["long comment"]
    assert still.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED


async def test_a_call_for_another_protocol_version_is_version_not_supported(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        request = a2a_pb2.GetExtendedAgentCardRequest()
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await a2a(planner).GetExtendedAgentCard(request, metadata=(("a2a-version", "0.3"),))
        patch = await a2a(planner).GetExtendedAgentCard(request, metadata=(("a2a-version", "1.0.2"),))
        bare = await a2a(planner).GetExtendedAgentCard(request)

    status = status_from_call(old.value)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert old.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == "VERSION_NOT_SUPPORTED" and "speaks A2A 1.0" in status.message
    assert patch.name == bare.name == "MeshPilot"


async def test_a_subscription_follows_an_input_required_task_through_its_approval_to_the_end(config) -> None:
    llm = ScriptedLLM([react("calculator", expression="6*7"), react_answer("42")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_careful_agent(planner)
        waiting = (await a2a(planner).SendMessage(send(text_message("6*7?", agent="careful")))).task
        subscription = a2a(planner).SubscribeToTask(a2a_pb2.SubscribeToTaskRequest(id=waiting.id))
        snapshot = (await subscription.read()).task
        await a2a(planner).SendMessage(send(data_message(waiting.id, {"approve": True})))
        rest = await read_all(subscription)

    assert snapshot.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED
    assert rest[0].status_update.status.message.metadata["event"] == "approval_decision"
    assert [sequence(r) for r in rest if r.HasField("status_update")] == list(
        range(int(snapshot.metadata["lastSequence"]) + 1, sequence(rest[-1]) + 1)
    )
    assert rest[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED


async def test_cancel_task_ends_a_working_task_and_its_subscribers_see_canceled(config) -> None:
    llm = ScriptedLLM(list(FRANCE))
    llm.gate = asyncio.Event()  # the model never answers: the task stays working
    async with Planner(config, llm, FakeTools()) as planner:
        task = (await a2a(planner).SendMessage(send(text_message("France?"), return_immediately=True))).task
        subscription = a2a(planner).SubscribeToTask(a2a_pb2.SubscribeToTaskRequest(id=task.id))
        await subscription.read()
        canceled = await a2a(planner).CancelTask(a2a_pb2.CancelTaskRequest(id=task.id))
        rest = await read_all(subscription)
        later = await a2a(planner).ListTasks(a2a_pb2.ListTasksRequest(status_timestamp_after=canceled.status.timestamp))
        earlier = await a2a(planner).ListTasks(a2a_pb2.ListTasksRequest(status_timestamp_after=task.status.timestamp))

    assert canceled.status.state == a2a_pb2.TASK_STATE_CANCELED
    assert rest[-1].status_update.status.state == a2a_pb2.TASK_STATE_CANCELED
    assert "canceled by A2A CancelTask" in rest[-1].status_update.status.message.parts[0].text
    assert list(later.tasks) == [] and [t.id for t in earlier.tasks] == [task.id]

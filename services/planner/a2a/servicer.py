"""A2AService (lf.a2a.v1, the a2a-sdk's definitions) over the planner's runs: a task is a run, its context the
run's session, a skill an agent."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    UnsupportedOperationError,
)
from a2a.utils.task import apply_history_length, validate_history_length
from google.protobuf import empty_pb2, json_format

from meshpilot.planner.v1 import planner_pb2
from services.common.auth import current_principal
from services.common.errors import NotFoundError, quoted
from services.planner.a2a.card import agent_card
from services.planner.a2a.convert import (
    OUTPUT_MODES,
    RUN_STATES,
    TASK_STATES,
    decision_of,
    message_text,
    run_to_task,
    stream_responses,
)
from services.planner.a2a.errors import a2a_errors
from services.planner.convert import run_to_proto
from services.planner.runs import RunManager
from services.planner.store import RunRecord, RunState

SERVICE_NAME = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# ListTasks pages through this many of the newest matching tasks (its totalSize counts at most these).
MAX_LISTED_TASKS = 1000
_PUSH_NOT_SUPPORTED = "this agent sends no push notifications; follow a task with SubscribeToTask instead"
_ACCEPTED_OUTPUTS = (*OUTPUT_MODES, "text", "*/*")


def _shown_state(state: RunState) -> str:
    return a2a_pb2.TaskState.Name(TASK_STATES[state])


class A2AServicer(a2a_pb2_grpc.A2AServiceServicer):
    """The A2A v1.0 gRPC binding over RunManager. Each call sees the caller's tenant's tasks only (another tenant's
    are TaskNotFound). Streams send only journaled events, each once, in journal order, with metadata.sequence.

    ``url`` is the gRPC target the agent card advertises (create_server sets it once the port is bound)."""

    def __init__(self, runs: RunManager, *, url: str = "", authenticated: bool = False) -> None:
        self.runs = runs
        self.store = runs.store
        self.url = url
        self.authenticated = authenticated

    @a2a_errors
    async def SendMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.SendMessageResponse:
        tenant = _tenant(request.tenant)
        _check_configuration(request.configuration)
        run_id = await self._begin(request, tenant)
        if not request.configuration.return_immediately:
            async for _ in self._follow(run_id, await self._resume_point(run_id, tenant), tenant, until_input=True):
                pass
        task = run_to_task(await self.store.get_run(run_id, tenant=tenant))
        return a2a_pb2.SendMessageResponse(task=apply_history_length(task, request.configuration))

    @a2a_errors
    async def SendStreamingMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_pb2.StreamResponse]:
        tenant = _tenant(request.tenant)
        _check_configuration(request.configuration)
        run_id = await self._begin(request, tenant)
        record = await self.store.get_run(run_id, tenant=tenant)
        yield a2a_pb2.StreamResponse(task=apply_history_length(run_to_task(record), request.configuration))
        # The stream ends where the task stops for the client: at its end, or when it waits for input.
        if record.state.ended or record.state is RunState.WAITING_FOR_APPROVAL:
            return
        async for event in self._follow(run_id, record.last_sequence, tenant, until_input=True):
            for response in stream_responses(event):
                yield response

    @a2a_errors
    async def SubscribeToTask(
        self, request: a2a_pb2.SubscribeToTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_pb2.StreamResponse]:
        """The task as it is (every event so far in its history, metadata.lastSequence), then each later event
        until the task ends: a client that lost a stream misses nothing and sees nothing twice."""
        tenant = _tenant(request.tenant)
        record = await self.store.get_run(request.id, tenant=tenant)
        if record.state.ended:
            raise UnsupportedOperationError(
                f"task {quoted(request.id)} has ended ({_shown_state(record.state)}); read it with GetTask"
            )
        yield a2a_pb2.StreamResponse(task=run_to_task(record))
        async for event in self._follow(record.run_id, record.last_sequence, tenant, until_input=False):
            for response in stream_responses(event):
                yield response

    @a2a_errors
    async def GetTask(self, request: a2a_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> a2a_pb2.Task:
        tenant = _tenant(request.tenant)
        validate_history_length(request)
        return apply_history_length(run_to_task(await self.store.get_run(request.id, tenant=tenant)), request)

    @a2a_errors
    async def ListTasks(
        self, request: a2a_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.ListTasksResponse:
        """The tenant's tasks newest first; without historyLength a listed task carries no history, and its
        artifacts only with includeArtifacts. A task's status time is its end, or its start while it runs."""
        tenant = _tenant(request.tenant)
        validate_history_length(request)
        size = request.page_size if request.HasField("page_size") else DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidParamsError(f"pageSize is {size}; use 1 to {MAX_PAGE_SIZE} (unset for {DEFAULT_PAGE_SIZE})")
        offset = _offset(request.page_token)
        records = await self._listed(request, tenant)
        page = records[offset : offset + size]
        history = request.history_length if request.HasField("history_length") else 0
        tasks = []
        for record in page:
            if history:
                record = await self.store.get_run(record.run_id, tenant=tenant)
            task = run_to_task(record)
            del task.history[: max(len(task.history) - history, 0)]
            if not request.include_artifacts:
                task.ClearField("artifacts")
            tasks.append(task)
        more = offset + size < len(records)
        return a2a_pb2.ListTasksResponse(
            tasks=tasks,
            next_page_token=_token(offset + size) if more else "",
            page_size=size,
            total_size=len(records),
        )

    async def _listed(self, request: a2a_pb2.ListTasksRequest, tenant: str) -> list[RunRecord]:
        if request.status == a2a_pb2.TASK_STATE_UNSPECIFIED:
            state = None
        elif request.status in RUN_STATES:
            state = RUN_STATES[request.status]
        else:
            return []  # submitted, rejected, auth-required: no run is ever in these states
        records = await self.store.list_runs(
            state=state, session_id=request.context_id, limit=MAX_LISTED_TASKS, tenant=tenant
        )
        if request.HasField("status_timestamp_after"):
            after = request.status_timestamp_after.ToNanoseconds() / 1e9
            records = [r for r in records if (r.end_time or r.create_time) > after]
        return records

    @a2a_errors
    async def CancelTask(self, request: a2a_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext) -> a2a_pb2.Task:
        tenant = _tenant(request.tenant)
        record = await self.store.get_run(request.id, with_events=False, tenant=tenant)
        if record.state.ended:
            raise TaskNotCancelableError(
                f"task {quoted(request.id)} has ended ({_shown_state(record.state)}); only a working or "
                "input-required task can be canceled"
            )
        await self.runs.cancel(request.id, "the task was canceled by A2A CancelTask", tenant=tenant)
        return run_to_task(await self.store.get_run(request.id, tenant=tenant))

    @a2a_errors
    async def GetExtendedAgentCard(
        self, request: a2a_pb2.GetExtendedAgentCardRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.AgentCard:
        """The card with the caller's tenant's agents as skills."""
        tenant = _tenant(request.tenant)
        agents = await self.runs.catalog.list(tenant=tenant)
        return agent_card(agents, url=self.url, authenticated=self.authenticated)

    @a2a_errors
    async def CreateTaskPushNotificationConfig(
        self, request: a2a_pb2.TaskPushNotificationConfig, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError(_PUSH_NOT_SUPPORTED)

    @a2a_errors
    async def GetTaskPushNotificationConfig(
        self, request: a2a_pb2.GetTaskPushNotificationConfigRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError(_PUSH_NOT_SUPPORTED)

    @a2a_errors
    async def ListTaskPushNotificationConfigs(
        self, request: a2a_pb2.ListTaskPushNotificationConfigsRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError(_PUSH_NOT_SUPPORTED)

    @a2a_errors
    async def DeleteTaskPushNotificationConfig(
        self, request: a2a_pb2.DeleteTaskPushNotificationConfigRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        raise PushNotificationNotSupportedError(_PUSH_NOT_SUPPORTED)

    async def _begin(self, request: a2a_pb2.SendMessageRequest, tenant: str) -> str:
        """Starts the task the message asks for, or hands a follow-up's decision to the task it answers; the run id."""
        if not request.HasField("message"):
            raise InvalidParamsError("message is required: the user's message with a text part")
        message = request.message
        if not message.message_id:
            raise InvalidParamsError("message.messageId is empty; give each message a unique id (a UUID)")
        if message.role == a2a_pb2.ROLE_AGENT:
            raise InvalidParamsError("message.role is ROLE_AGENT; a client sends ROLE_USER messages")
        if message.task_id:
            return await self._answer(message, tenant)
        name, version = _agent_of(request)
        text = message_text(message)
        try:
            agent = await self.runs.catalog.get(name, version, tenant=tenant)
        except NotFoundError as error:
            raise InvalidParamsError(f"{error}; GetExtendedAgentCard lists the agents (skills) you may name") from None
        if message.context_id:
            try:
                await self.store.get_session(message.context_id, last_turns=0, tenant=tenant)
            except NotFoundError:
                raise InvalidParamsError(
                    f"contextId {quoted(message.context_id)} is not one of your contexts; leave it empty to start "
                    "a new one, or use the contextId of one of your tasks"
                ) from None
        return await self.runs.start(
            message.context_id, text, agent=agent.name, agent_version=agent.version, tenant=tenant
        )

    async def _answer(self, message: a2a_pb2.Message, tenant: str) -> str:
        """Approves or rejects the tool call an input-required task waits for, as the message says."""
        record = await self.store.get_run(message.task_id, with_events=False, tenant=tenant)
        if message.context_id and message.context_id != record.session_id:
            raise InvalidParamsError(
                f"contextId {quoted(message.context_id)} is not task {quoted(record.run_id)}'s; leave it empty"
            )
        if record.state is not RunState.WAITING_FOR_APPROVAL:
            raise UnsupportedOperationError(
                f"task {quoted(record.run_id)} is {_shown_state(record.state)}; only an input-required task takes "
                "a follow-up message (send a new message with this contextId to continue the conversation)"
            )
        pending = [p.call_id for p in run_to_proto(record).pending_approvals]
        decision = decision_of(message)
        call_id = decision.call_id
        if call_id and call_id not in pending:
            raise InvalidParamsError(f"callId {quoted(call_id)} does not wait for approval; waiting: {pending}")
        if not call_id:
            if len(pending) != 1:
                raise InvalidParamsError(f"{len(pending)} calls wait for approval ({pending}); name one as callId")
            call_id = pending[0]
        await self.runs.decide(
            record.run_id,
            call_id,
            approved=decision.approved,
            arguments=decision.arguments,
            comment=decision.comment,
            tenant=tenant,
        )
        return record.run_id

    async def _resume_point(self, run_id: str, tenant: str) -> int:
        """Where a blocking SendMessage starts waiting: the journal as it is now (all earlier events happened
        before the message took effect), unless the task already waits for input."""
        record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
        if record.state.ended or record.state is RunState.WAITING_FOR_APPROVAL:
            return -1
        return record.last_sequence

    async def _follow(
        self, run_id: str, after: int, tenant: str, *, until_input: bool
    ) -> AsyncIterator[planner_pb2.RunEvent]:
        """The run's events after ``after`` (-1: none) until its last one, or, ``until_input``, until it parks
        waiting for approval."""
        if after < 0:
            return
        async for event in self.runs.watch(run_id, after, tenant=tenant, until_parked=until_input):
            yield event


def _tenant(requested: str) -> str:
    """The caller's tenant (its credentials'); a request naming another one is refused."""
    tenant = current_principal().tenant
    if requested and requested != tenant:
        raise InvalidParamsError(
            f"tenant {quoted(requested)} is not your credentials' tenant; leave the tenant field empty"
        )
    return tenant


def _check_configuration(configuration: a2a_pb2.SendMessageConfiguration) -> None:
    validate_history_length(configuration)
    if configuration.HasField("task_push_notification_config"):
        raise PushNotificationNotSupportedError(_PUSH_NOT_SUPPORTED)
    modes = list(configuration.accepted_output_modes)
    if modes and not any(mode.lower() in _ACCEPTED_OUTPUTS for mode in modes):
        raise ContentTypeNotSupportedError(
            f"acceptedOutputModes {[m[:64] for m in modes[:5]]} has none of {list(OUTPUT_MODES)}, which this agent "
            "answers in; accept one of them"
        )


def _agent_of(request: a2a_pb2.SendMessageRequest) -> tuple[str, int]:
    """The agent (skill id) and version a message names in its metadata or the request's: "agent", "agentVersion"."""
    metadata = {
        **json_format.MessageToDict(request.metadata),
        **json_format.MessageToDict(request.message.metadata),
    }
    name = metadata.get("agent", "")
    version = metadata.get("agentVersion", 0)
    if not isinstance(name, str):
        raise InvalidParamsError("metadata.agent must be a string: the id of one of the agent card's skills")
    if isinstance(version, bool) or not isinstance(version, (int, float)) or version != int(version) or version < 0:
        raise InvalidParamsError("metadata.agentVersion must be a whole number: 1, 2, ... or 0 for the latest")
    return name, int(version)


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, number = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "offset" and number.isdigit():
            return int(number)
    except (ValueError, UnicodeError):
        pass
    raise InvalidParamsError(f"pageToken {quoted(token)} is not one this agent gave; use a nextPageToken or none")

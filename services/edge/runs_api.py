"""Agent runs over HTTP: start a run and follow its events as server-sent events, list and read runs, approve or
reject a waiting tool call, and the mesh's health. Every call goes to the planner with the caller's credentials.

Bodies and answers are the planner's messages in protobuf's JSON mapping (snake_case field names, so ``run_id``,
``session_id``); a list is ``{"object": "list", "data": [...]}``. Each server-sent event carries one RunEvent as its
``data`` and the event's sequence number as its ``id``, so a client that lost its connection asks
``GET /v1/runs/{id}/events`` with ``Last-Event-ID`` (or ``?after=``) and gets every later event once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sse_starlette import EventSourceResponse, ServerSentEvent

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc
from services.common import MeshConfig, load_config
from services.common.errors import bounded, quoted
from services.common.tls import CLIENT_IDENTITY, TlsIdentity, tls_identity
from services.edge.deps import call_metadata, planner_channel, request_timeout
from services.edge.errors import OpenAIError, bad_request, from_rpc_error

router = APIRouter(prefix="/v1", tags=["runs"])

# A request body is a task and a few settings: a megabyte is far more than any of them needs.
MAX_BODY_BYTES = 1 << 20
HEALTH_TIMEOUT_S = 2.0
# ListRuns returns the newest runs up to its page_size limit, without a cursor: paging with ?offset= reaches this far.
MAX_LISTED_RUNS = 500
DEFAULT_PAGE = 50
# The events after which a run is over; approval_requested pauses it (the stream stays open, the run waits).
END_EVENTS = ("final_answer", "error")
PAUSE_EVENTS = ("approval_requested",)
MESH_SERVICES = ("planner", "tools", "knowledge", "inference")
_STATE_NAMES: dict[str, planner_pb2.RunState] = {
    name.removeprefix("RUN_STATE_").lower(): value
    for name, value in planner_pb2.RunState.items()
    if value != planner_pb2.RUN_STATE_UNSPECIFIED
}
_ENDED = {planner_pb2.RUN_STATE_SUCCEEDED, planner_pb2.RUN_STATE_FAILED, planner_pb2.RUN_STATE_CANCELLED}


def to_json(message: Message) -> dict[str, Any]:
    """A message in protobuf's JSON mapping with proto field names; int64 fields (sequences) as numbers."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True, unquote_int64_if_possible=True)


def _planner(request: Request) -> planner_pb2_grpc.PlannerServiceStub:
    return planner_pb2_grpc.PlannerServiceStub(planner_channel(request))


async def _body(request: Request, path_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``); OpenAIError for anything else or for a field the path
    already names."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise OpenAIError(413, f"the request body is over {MAX_BODY_BYTES} bytes; send a smaller one")
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not JSON ({bounded(str(e), 200)}); send a JSON object") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body is a JSON {type(body).__name__}; send a JSON object")
    for field in path_fields:
        if field in body:
            raise bad_request(f"{field} comes from the URL path; leave it out of the body", param=field)
    return body


def _parse(body: dict[str, Any], message: Message) -> Message:
    """``body`` parsed into ``message`` (protobuf's JSON mapping); OpenAIError naming the field on a mismatch."""
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as e:
        # ParseError quotes the offending value: bounded, so a megabyte string is not echoed back.
        raise bad_request(f"{bounded(str(e), 300)}; see {message.DESCRIPTOR.full_name} for the fields") from None


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.pop(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, not {quoted(json.dumps(value))}", param=name)
    return value


def _non_negative(value: str | None, name: str, default: int = 0, maximum: int | None = None) -> int:
    if value is None or value == "":
        return default
    if not value.isascii() or not value.isdigit():
        raise bad_request(f"{name} is {quoted(value)}; use a whole number 0 or more", param=name)
    number = int(value)
    if maximum is not None and number > maximum:
        raise bad_request(f"{name} is {number}; use at most {maximum}", param=name)
    return number


async def _answer(call: Awaitable[Message]) -> JSONResponse:
    """The unary call's reply as JSON, or the planner's error as an HTTP error."""
    try:
        return JSONResponse(to_json(await call))
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "planner") from None


@router.get("/agents")
async def list_agents(request: Request) -> Response:
    """The caller's agents, latest version of each, the built-in ``default`` first."""
    stub = agents_pb2_grpc.AgentServiceStub(planner_channel(request))
    try:
        reply = await stub.ListAgents(
            agents_pb2.ListAgentsRequest(), metadata=call_metadata(request), timeout=request_timeout(request)
        )
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "planner") from None
    return JSONResponse({"object": "list", "data": [to_json(agent) for agent in reply.agents]})


@router.post("/agents/{agent}/runs")
async def start_run(agent: str, request: Request) -> Response:
    """Starts a run of ``agent`` with the body's ``task`` (and optionally ``session_id``, ``agent_version``,
    ``budget``). ``stream: true`` answers with the run's events as server-sent events until it ends; otherwise the
    answer is the Run once it has ended or waits for an approval, or at once with ``wait: false`` (202)."""
    body = await _body(request, ("agent",))
    stream, wait = _flag(body, "stream", False), _flag(body, "wait", True)
    run_request = _parse(body, planner_pb2.RunRequest(agent=agent))
    planner = _planner(request)
    call = planner.Run(run_request, metadata=call_metadata(request))
    streaming = False
    try:
        # The first event (or the planner's refusal: unknown agent, bad task, a quota) decides the HTTP status.
        first = await call.read()
        if first is grpc.aio.EOF:
            raise OpenAIError(502, "the planner ended the run's stream before its first event; try again")
        if stream:
            streaming = True
            return _event_stream(call, first)
        last = first
        while wait and last.WhichOneof("event") not in END_EVENTS + PAUSE_EVENTS:
            if (event := await call.read()) is grpc.aio.EOF:
                break
            last = event
        run = await planner.GetRun(
            planner_pb2.GetRunRequest(run_id=first.run_id),
            metadata=call_metadata(request),
            timeout=request_timeout(request),
        )
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "planner") from None
    finally:
        # The run goes on without this stream (the planner journals it); the client follows it with /events.
        if not streaming:
            call.cancel()
    return JSONResponse(to_json(run), status_code=200 if wait else 202)


@router.get("/runs")
async def list_runs(request: Request) -> Response:
    """The caller's runs, newest first: ``?state=`` (running, waiting_for_approval, succeeded, failed, cancelled),
    ``agent``, ``session_id``, ``limit`` (default 50) and ``offset`` for the next page (``has_more`` says whether
    there is one). Without events: read one run for those."""
    query = request.query_params
    state = _state(query.get("state"))
    limit = _non_negative(query.get("limit"), "limit", DEFAULT_PAGE, MAX_LISTED_RUNS) or DEFAULT_PAGE
    offset = _non_negative(query.get("offset"), "offset", 0, MAX_LISTED_RUNS - limit)
    # One more than the page, to know whether another page follows.
    page_size = min(offset + limit + 1, MAX_LISTED_RUNS)
    try:
        reply = await _planner(request).ListRuns(
            planner_pb2.ListRunsRequest(
                state=state,
                agent=query.get("agent", ""),
                session_id=query.get("session_id", ""),
                page_size=page_size,
            ),
            metadata=call_metadata(request),
            timeout=request_timeout(request),
        )
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "planner") from None
    runs = reply.runs[offset : offset + limit]
    return JSONResponse(
        {
            "object": "list",
            "data": [to_json(run) for run in runs],
            "has_more": len(reply.runs) > offset + limit,
            "offset": offset,
        }
    )


def _state(value: str | None) -> planner_pb2.RunState:
    if not value:
        return planner_pb2.RUN_STATE_UNSPECIFIED
    name = value.lower().removeprefix("run_state_")
    if name == "waiting":
        name = "waiting_for_approval"
    if name not in _STATE_NAMES:
        raise bad_request(
            f"state is {quoted(value)}; use one of {', '.join(_STATE_NAMES)}, or leave it out for every state",
            param="state",
        )
    return _STATE_NAMES[name]


@router.get("/runs/{run_id}")
async def get_run(run_id: str, request: Request) -> Response:
    """One run with all its events and the tool calls waiting for approval."""
    return await _answer(
        _planner(request).GetRun(
            planner_pb2.GetRunRequest(run_id=run_id), metadata=call_metadata(request), timeout=request_timeout(request)
        )
    )


@router.get("/runs/{run_id}/events")
async def run_events(run_id: str, request: Request) -> Response:
    """The run's events after ``Last-Event-ID`` (or ``?after=``; neither: from its first) as server-sent events, then
    its live ones until it ends. Asked again after the run's last event of an ended run: 204, which tells an
    EventSource to stop reconnecting."""
    header = request.headers.get("last-event-id")
    if header is not None:
        after = _non_negative(header.strip(), "Last-Event-ID")
    else:
        after = _non_negative(request.query_params.get("after"), "after")
    planner = _planner(request)
    try:
        # The run's state first: an unknown run or a sequence beyond its end is an HTTP error, not an empty stream.
        run = await planner.GetRun(
            planner_pb2.GetRunRequest(run_id=run_id), metadata=call_metadata(request), timeout=request_timeout(request)
        )
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "planner") from None
    if after > run.last_sequence:
        param = "Last-Event-ID" if header is not None else "after"
        raise bad_request(
            f"{param} {after} is beyond the run's last event ({run.last_sequence}); use a sequence you received",
            param=param, code="out_of_range",
        )  # fmt: skip
    if run.state in _ENDED and after == run.last_sequence:
        return Response(status_code=204)
    call = planner.WatchRun(
        planner_pb2.WatchRunRequest(run_id=run_id, after_sequence=after), metadata=call_metadata(request)
    )
    return _event_stream(call, None)


def _event_stream(call: Any, first: planner_pb2.RunEvent | None) -> EventSourceResponse:
    """The call's RunEvents as server-sent events (``id`` = sequence); a failure of the stream itself ends it with a
    ``stream_error`` event holding the error body."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            if first is not None:
                yield _sse(first)
            while (event := await call.read()) is not grpc.aio.EOF:
                yield _sse(event)
        except grpc.aio.AioRpcError as e:
            yield ServerSentEvent(data=json.dumps(from_rpc_error(e, "planner").body()), event="stream_error")
        finally:
            call.cancel()

    # Proxies must not buffer the stream; pings every 15 s keep idle connections (a run waiting for a human) open.
    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(event: planner_pb2.RunEvent) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(to_json(event), ensure_ascii=False), id=str(event.sequence))


@router.post("/runs/{run_id}/cancel")
async def cancel_run(run_id: str, request: Request) -> Response:
    """Stops a run that has not ended; it ends with an error event CANCELLED."""
    return await _answer(
        _planner(request).CancelRun(
            planner_pb2.CancelRunRequest(run_id=run_id),
            metadata=call_metadata(request),
            timeout=request_timeout(request),
        )
    )


@router.post("/runs/{run_id}/tool-calls/{call_id}/approve")
async def approve_tool_call(run_id: str, call_id: str, request: Request) -> Response:
    """Lets a waiting tool call run; the optional body holds edited ``arguments`` (an object) and a ``comment``."""
    body = await _body(request, ("run_id", "call_id"))
    approval = _parse(body, planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id=call_id))
    return await _answer(
        _planner(request).ApproveToolCall(approval, metadata=call_metadata(request), timeout=request_timeout(request))
    )


@router.post("/runs/{run_id}/tool-calls/{call_id}/reject")
async def reject_tool_call(run_id: str, call_id: str, request: Request) -> Response:
    """Refuses a waiting tool call; the optional body's ``reason`` becomes the call's error observation."""
    body = await _body(request, ("run_id", "call_id"))
    rejection = _parse(body, planner_pb2.RejectToolCallRequest(run_id=run_id, call_id=call_id))
    return await _answer(
        _planner(request).RejectToolCall(rejection, metadata=call_metadata(request), timeout=request_timeout(request))
    )


@router.get("/health")
async def health(request: Request) -> Response:
    """Each service's gRPC health (SERVING, NOT_SERVING, or UNREACHABLE with why): 200 when all serve, else 503."""
    config = _mesh_config(request)
    tls = tls_identity(config, CLIENT_IDENTITY)
    targets = [(name, getattr(config, name).server.target()) for name in MESH_SERVICES if name != "inference"]
    targets += [("inference", target) for target in config.inference.replica_targets()]
    services = await asyncio.gather(*(_probe(name, target, tls) for name, target in targets))
    healthy = all(service["status"] == "SERVING" for service in services)
    return JSONResponse(
        {"status": "serving" if healthy else "degraded", "services": services}, status_code=200 if healthy else 503
    )


def _mesh_config(request: Request) -> MeshConfig:
    """The mesh's config from the app; an app made without one gets the config this process starts with (the
    same file and environment ``meshpilot serve edge`` read)."""
    config: MeshConfig | None = getattr(request.app.state, "config", None)
    if config is None:
        config = request.app.state.config = load_config()
    return config


async def _probe(name: str, target: str, tls: TlsIdentity | None) -> dict[str, str]:
    # A channel of its own, without the mesh's retry policy: a service that is down is reported at once, not retried.
    if tls is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(
            target, tls.channel_credentials(), options=[("grpc.ssl_target_name_override", name)]
        )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            detail = bounded(e.details() or e.code().name, 300)
            return {"name": name, "target": target, "status": "UNREACHABLE", "detail": detail}
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return {"name": name, "target": target, "status": status, "detail": ""}

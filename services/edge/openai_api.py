"""The OpenAI-compatible API over the inference service: ``POST /v1/chat/completions`` (streamed as server-sent
events or whole) and ``GET /v1/models``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.auth import TENANT_METADATA
from services.edge import deps
from services.edge.errors import OpenAIError, from_rpc_error
from services.edge.openai_convert import (
    AnswerStream,
    ToolMode,
    chunk,
    completion_response,
    finish_reason,
    new_completion_id,
    read_output,
    to_generate_request,
    tool_call_deltas,
    usage_of,
)
from services.edge.openai_models import ChatCompletionRequest

router = APIRouter()

OWNER = "meshpilot"
# Proxies (nginx) would otherwise buffer the stream and hold back every token until the end.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _stub(channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)


def _routing_key(request: inference_pb2.GenerateRequest, metadata: tuple[tuple[str, str], ...]) -> str:
    """Tenant, model and system prompt: the prefix one client's calls share (the planner routes by the same)."""
    messages = request.chat.messages
    system = messages[0].content if messages and messages[0].role == "system" else ""
    tenant = next((value for key, value in metadata if key == TENANT_METADATA), "")
    return f"{tenant}\x00{request.model}\x00{system}"


class _RoutedCall:
    """The Generate call on whichever replica took it (a refused one is handed to the next): cancel() cancels it."""

    def __init__(self) -> None:
        self.calls: list[grpc.aio.UnaryStreamCall] = []

    def cancel(self) -> None:
        if self.calls:
            self.calls[-1].cancel()


def _chat_error(error: grpc.aio.AioRpcError) -> OpenAIError:
    """An inference failure of a chat completion; an unknown model is OpenAI's model_not_found on ``model``."""
    mapped = from_rpc_error(error, "inference")
    if error.code() is grpc.StatusCode.NOT_FOUND:
        mapped.param, mapped.code = "model", "model_not_found"
    return mapped


def _model_object(model: inference_pb2.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": OWNER}


async def _list_models(request: Request) -> list[inference_pb2.Model]:
    try:
        timeout = deps.request_timeout(request)
        response = await deps.inference_replicas(request).unary(
            "", lambda channel: _stub(channel).ListModels(inference_pb2.ListModelsRequest(), timeout=timeout)
        )
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, "inference") from None
    return list(response.models)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models the inference service serves, as OpenAI model objects."""
    return {"object": "list", "data": [_model_object(m) for m in await _list_models(request)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    for model in await _list_models(request):
        if model.id == model_id:
            return _model_object(model)
    raise OpenAIError(
        404, f"model {model_id[:64]!r} is not served; GET /v1/models lists them", param="model", code="model_not_found"
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    """A chat completion from the inference service, for the caller's tenant (fair share and per-tenant token
    metrics apply). Tool calls and JSON responses are decoded under a JSON Schema constraint, so they always parse
    and match their schema (unless cut by max_tokens: finish_reason length)."""
    generate, mode = to_generate_request(body)
    metadata, timeout = deps.inference_metadata(request), deps.request_timeout(request)
    call = _RoutedCall()

    def start(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall:
        call.calls.append(_stub(channel).Generate(generate, metadata=metadata, timeout=timeout))
        return call.calls[-1]

    responses = deps.inference_replicas(request).stream(_routing_key(generate, metadata), start).__aiter__()
    try:
        # The first response is awaited before answering, so a refused request is a 4xx, not a broken stream.
        first = await anext(responses, None)
    except grpc.aio.AioRpcError as e:
        raise _chat_error(e) from None
    except BaseException:
        call.cancel()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(call, first, responses, mode, model=body.model, include_usage=include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    parts: list[str] = []
    last = first or inference_pb2.GenerateResponse()
    try:
        if first is not None:
            parts.append(first.text)
            async for response in responses:
                parts.append(response.text)
                last = response
    except grpc.aio.AioRpcError as e:
        raise _chat_error(e) from None
    finally:
        call.cancel()
    completion = read_output("".join(parts), last.finish_reason, mode)
    return JSONResponse(completion_response(new_completion_id(), last.model or body.model, completion, last.usage))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(
    call: Any,
    first: inference_pb2.GenerateResponse | None,
    responses: AsyncIterator[inference_pb2.GenerateResponse],
    mode: ToolMode,
    *,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's chunks: the role, content deltas as the model writes them (in tool mode, an answer's text as it is
    decoded, a tool call once whole: it is read from the finished action), the finish reason, the usage chunk when
    asked for, then ``data: [DONE]``. A failure after the first chunk is an ``error`` event (the HTTP status is sent
    already)."""
    completion_id, created = new_completion_id(), int(time.time())
    model = first.model if first is not None and first.model else model

    def event(delta: dict[str, Any] | None, **kwargs: Any) -> str:
        return _event(chunk(completion_id, model, created, delta, include_usage=include_usage, **kwargs))

    try:
        yield event({"role": "assistant", "content": ""})
        last = first or inference_pb2.GenerateResponse()
        answer = AnswerStream() if mode.active and not mode.answer_is_json else None
        parts: list[str] = []
        pending = [first] if first is not None else []
        try:
            async for response in _chain(pending, responses):
                last = response
                delta = response.text
                if mode.active:
                    parts.append(delta)
                    delta = answer.feed(delta) if answer is not None else ""
                if delta:
                    yield event({"content": delta})
        except grpc.aio.AioRpcError as e:
            yield _event(_chat_error(e).body())
            return
        if mode.active:
            completion = read_output("".join(parts), last.finish_reason, mode)
            sent = answer.sent if answer is not None else ""
            if completion.tool_calls:
                yield event({"tool_calls": tool_call_deltas(completion.tool_calls)})
            elif completion.content and completion.content.startswith(sent) and completion.content != sent:
                yield event({"content": completion.content[len(sent) :]})
            finish = completion.finish_reason
        else:
            finish = finish_reason(last.finish_reason)
        yield event({}, finish=finish)
        if include_usage:
            yield event(None, usage=usage_of(last.usage))
        yield "data: [DONE]\n\n"
    finally:
        # Reached when the client disconnects too: cancelling the call aborts the generation in the engine.
        call.cancel()


async def _chain(
    pending: list[inference_pb2.GenerateResponse], responses: AsyncIterator[inference_pb2.GenerateResponse]
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    for response in pending:
        yield response
    async for response in responses:
        yield response

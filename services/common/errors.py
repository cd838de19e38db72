"""Domain errors and their one mapping to gRPC status codes (an interceptor applied to every service)."""

from __future__ import annotations

import inspect
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

# A status message travels in a header (grpc-message, percent-encoded): clients refuse one over 16 KiB, so an error
# quoting megabytes of input reached its caller as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit".
# 2000 UTF-8 bytes stay under gRPC's 8 KiB soft limit even when every byte is percent-encoded.
MAX_STATUS_MESSAGE_BYTES = 2000
# An echoed id, name or label longer than this is cut: enough to recognise it, never a document.
MAX_QUOTED_CHARS = 64


def quoted(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` quoted for an error message (``repr``), cut to ``limit`` characters with its length said."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` cut in the middle to at most ``limit`` UTF-8 bytes: its start says what failed and its end what
    to change, so both are kept."""
    data = message.encode()
    if len(data) <= limit:
        return message
    gap = " [...] "
    keep = limit - len(gap)
    head = data[: keep * 2 // 3].decode(errors="ignore")
    tail = data[len(data) - (keep - keep * 2 // 3) :].decode(errors="ignore")
    return head + gap + tail


class MeshError(Exception):
    """An error with a gRPC status; its message is shown to the client, so it says what to change."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRangeError(MeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class RefusedRequest:
    """What a request deserializer hands on instead of a request it refuses: bytes that are not the method's request
    message, or JSON (Struct/Value) holding NaN or Infinity, which no JSON consumer downstream can take.

    gRPC answers UNKNOWN when a deserializer raises, and a deserializer has no context to set a status with, so it
    returns this and the handler's wrapper refuses the call with INVALID_ARGUMENT and ``reason``.
    """

    reason: str

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(self.reason)


def checked_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning a RefusedRequest instead of raising (corrupt bytes, bad UTF-8, nesting beyond the
    parser's limit) or instead of a request whose JSON holds a non-finite number."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            request = deserializer(data)
        except Exception as e:  # DecodeError mostly; whatever the parser raises, the bytes are the client's
            return RefusedRequest(
                f"the request could not be decoded ({e or type(e).__name__}); send the method's request message "
                "serialized by a protobuf library"
            )
        if isinstance(request, Message) and _may_hold_json(request.DESCRIPTOR):
            where = _non_finite_number(request, "")
            if where is not None:
                path, number = where
                shown = "NaN" if math.isnan(number) else f"{'-' if number < 0 else ''}Infinity"
                return RefusedRequest(
                    f"{path.lstrip('.')} is {shown}: JSON has no NaN or Infinity; send a finite number, or the "
                    "value as a string"
                )
        return request

    return deserialize


_JSON_MESSAGES = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")
_holds_json: dict[str, bool] = {}


def _may_hold_json(descriptor: Descriptor) -> bool:
    """Whether a message of this type can carry a Struct, Value or ListValue at any depth (cached per type)."""
    known = _holds_json.get(descriptor.full_name)
    if known is None:
        known = _holds_json[descriptor.full_name] = _reaches_json(descriptor, set())
    return known


def _reaches_json(descriptor: Descriptor, seen: set[str]) -> bool:
    if descriptor.full_name in _JSON_MESSAGES:
        return True
    seen.add(descriptor.full_name)
    return any(
        field.message_type is not None
        and field.message_type.full_name not in seen
        and _reaches_json(field.message_type, seen)
        for field in descriptor.fields
    )


def _non_finite_number(message: Message, path: str) -> tuple[str, float] | None:
    """(path, number) of the first NaN or ±Infinity in a JSON value inside ``message``, or None."""
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Value":
        kind = message.WhichOneof("kind")  # type: ignore[attr-defined]
        if kind == "number_value":
            number = message.number_value  # type: ignore[attr-defined]
            return None if math.isfinite(number) else (path, number)
        if kind in ("struct_value", "list_value"):
            return _non_finite_number(getattr(message, kind), path)
        return None
    if name == "google.protobuf.Struct":
        items: Iterable[tuple[str, Message]] = (
            (f"{path}.{_key(key)}", value)
            for key, value in message.fields.items()  # type: ignore[attr-defined]
        )
    elif name == "google.protobuf.ListValue":
        items = ((f"{path}[{i}]", value) for i, value in enumerate(message.values))  # type: ignore[attr-defined]
    else:
        items = _message_items(message, path)
    for item_path, item in items:
        if (found := _non_finite_number(item, item_path)) is not None:
            return found
    return None


def _message_items(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    """The set message-typed fields of ``message`` that may hold JSON, with their paths (maps and lists expanded)."""
    for field, value in message.ListFields():
        if field.message_type is None or not _may_hold_json(field.message_type):
            continue
        field_path = f"{path}.{field.name}"
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                yield from ((f"{field_path}[{_key(key)}]", item) for key, item in value.items())
        elif field.is_repeated:
            yield from ((f"{field_path}[{i}]", item) for i, item in enumerate(value))
        else:
            yield field_path, value


def _key(key: object) -> str:
    return key if isinstance(key, str) and key.isidentifier() and len(key) <= MAX_QUOTED_CHARS else quoted(str(key))


def _retry_info(exc: MeshError, seconds: float) -> tuple[tuple[str, bytes], ...]:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=exc.code.value[0], message=bounded(str(exc)), details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, MeshError):
        retry_after = getattr(exc, "retry_after_seconds", None)
        if retry_after is not None:
            # google.rpc.RetryInfo in the status details: when the call would pass (quotas, overload).
            await context.abort(exc.code, bounded(str(exc)), trailing_metadata=_retry_info(exc, retry_after))
        await context.abort(exc.code, bounded(str(exc)))
    chosen = context.code()
    if isinstance(chosen, grpc.StatusCode) and chosen is not grpc.StatusCode.OK:
        # The handler set its status before raising, as generated base servicers do for UNIMPLEMENTED.
        await context.abort(chosen, bounded(context.details() or str(exc)))
    # Anything else is our bug: log it with its trace, give the client an id to quote, never the trace itself.
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in {method} (incident {incident}); see the server log"
    )


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, RefusedRequest):
                raise request.error()
            return await behavior(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, RefusedRequest):
                raise request.error()
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns MeshError into its status code, anything unexpected into INTERNAL with an incident id, and a request
    it refuses (``checked_deserializer``) into INVALID_ARGUMENT; every message is bounded (``bounded``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None and handler.request_streaming:
            return _with_checked_requests(handler)
        return rewrap_handler(
            handler,
            lambda b: _wrap_unary(b, method),
            lambda b: _wrap_stream(b, method),
            request_deserializer=checked_deserializer(handler.request_deserializer) if handler else None,
        )


def _with_checked_requests(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A client-streaming handler (reflection's) whose undecodable request messages end the call with
    INVALID_ARGUMENT; behaviours that are not async generators pass through unchanged."""
    behavior = handler.stream_stream
    if behavior is None or not inspect.isasyncgenfunction(behavior):
        return handler

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, RefusedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(request.error())))
            yield request

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(checked(requests, context), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        stream_stream,
        request_deserializer=checked_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _as_async_generator(behavior: Callable[[Any, grpc.aio.ServicerContext], Any]) -> Callable[..., Any]:
    """A streaming behaviour as an async generator: one written as a coroutine that sends with ``context.write``
    (the stock health Watch) runs to its end and yields nothing itself."""
    if inspect.isasyncgenfunction(behavior):
        return behavior

    async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await behavior(request, context)
        return
        yield

    return generator


def rewrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap_unary: Callable[[Any], Any],
    wrap_stream: Callable[[Any], Any],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler | None:
    """The same handler with its unary-unary or unary-stream behaviour wrapped (and its request deserializer
    replaced, when given); other kinds pass through."""
    if handler is None:
        return None
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(_as_async_generator(handler.unary_stream)),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler

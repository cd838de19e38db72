"""Domain errors and their one mapping to gRPC status codes (an interceptor applied to every service)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)


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


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, MeshError):
        await context.abort(exc.code, str(exc))
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
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns MeshError into its status code and anything unexpected into INTERNAL with an incident id."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        return rewrap_handler(handler, lambda b: _wrap_unary(b, method), lambda b: _wrap_stream(b, method))


def rewrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap_unary: Callable[[Any], Any],
    wrap_stream: Callable[[Any], Any],
) -> grpc.RpcMethodHandler | None:
    """The same handler with its unary-unary or unary-stream behaviour wrapped; other kinds pass through."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler

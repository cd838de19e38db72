"""The A2A protocol's errors over gRPC: the status code and google.rpc.ErrorInfo (domain a2a-protocol.org) that
the a2a-sdk's binding maps each error to, raised from the planner's own errors where their meaning is clear."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from a2a.utils.errors import (
    A2A_ERROR_MAPPING,
    A2AError,
    InvalidParamsError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, bounded, quoted

A2A_ERROR_DOMAIN = "a2a-protocol.org"
F = TypeVar("F", bound=Callable[..., Any])


# The planner errors that have an A2A meaning; others (quotas, a dependency down) keep the mesh's own status.
TRANSLATED = (A2AError, NotFoundError, InvalidArgumentError, FailedPreconditionError)


def protocol_error(error: A2AError | NotFoundError | InvalidArgumentError | FailedPreconditionError) -> A2AError:
    """The A2A error a planner error means on a task: an unknown (or another tenant's) run is TaskNotFound, a bad
    value InvalidParams, a state that forbids the call UnsupportedOperation."""
    if isinstance(error, A2AError):
        return error
    if isinstance(error, NotFoundError):
        return TaskNotFoundError(str(error))
    if isinstance(error, InvalidArgumentError):
        return InvalidParamsError(str(error))
    return UnsupportedOperationError(str(error))


def rich_status(error: A2AError) -> grpc.Status:
    """The status an A2A error ends a call with: its code, its bounded message and an ErrorInfo with its reason,
    which the a2a-sdk's client turns back into the same error class."""
    mapping = A2A_ERROR_MAPPING.get(type(error), A2A_ERROR_MAPPING[InvalidParamsError])
    code = grpc.StatusCode[mapping.grpc_status]
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=mapping.reason, domain=A2A_ERROR_DOMAIN))
    message = bounded(error.message)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


def check_version(context: grpc.aio.ServicerContext) -> None:
    """Refuses a call whose A2A-Version header names another major.minor than 1.0 (patch ignored). A call without
    the header is taken as 1.0: the service name lf.a2a.v1 is already 1.x only (0.3 clients call a2a.v1)."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() != VERSION_HEADER.lower():
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if text.strip() and text.strip().split(".")[:2] != PROTOCOL_VERSION_CURRENT.split("."):
            raise VersionNotSupportedError(
                f"{VERSION_HEADER} {quoted(text.strip())} is not supported; this agent speaks A2A "
                f"{PROTOCOL_VERSION_CURRENT}"
            )


async def _abort(error: Any, context: grpc.aio.ServicerContext) -> None:
    status = rich_status(protocol_error(error))
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


def a2a_errors(method: F) -> F:
    """Checks the call's A2A-Version, and ends a servicer method's call with the protocol's error for what it raises
    (see ``protocol_error``)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                check_version(context)
                async for response in method(self, request, context):
                    yield response
            except TRANSLATED as error:
                await _abort(error, context)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check_version(context)
            return await method(self, request, context)
        except TRANSLATED as error:
            await _abort(error, context)

    return unary  # type: ignore[return-value]

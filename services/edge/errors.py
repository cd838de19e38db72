"""OpenAI-style HTTP errors for every edge route: one exception type, its handlers, and the gRPC status mapping."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2, status_pb2
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import bounded

log = logging.getLogger(__name__)

# OpenAI clients show the message to a person: a few hundred characters say what to change, never a document.
MAX_MESSAGE_BYTES = 1000
# Retry-After when a RESOURCE_EXHAUSTED carries no google.rpc.RetryInfo (the inference queue is full: a second is
# about one decode step of every queued request on the default model).
DEFAULT_RETRY_AFTER_SECONDS = 1
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

# The gRPC status of a downstream failure -> the HTTP status the edge answers with. Anything else (INTERNAL, UNKNOWN,
# ...) is the service's fault, not the caller's: 502, the gateway got no usable answer.
HTTP_STATUS_OF: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's error types by HTTP status (its Python client maps the status to an exception class; the type is for
# people and logs).
_TYPE_OF: dict[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status: invalid_request_error for other 4xx, server_error for 5xx."""
    return _TYPE_OF.get(status, "invalid_request_error" if status < 500 else "server_error")


class OpenAIError(HTTPException):
    """An error the edge answers with ``status`` and ``{"error": {"message", "type", "param", "code"}}``.

    ``message`` says what to change (bounded to MAX_MESSAGE_BYTES); ``param`` names the request field at fault;
    ``retry_after`` (seconds) becomes a Retry-After header. An HTTPException, so FastAPI lets it through when it is
    raised while the body is read (by the edge's size limit) instead of making it a generic 400.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = bounded(message, MAX_MESSAGE_BYTES)
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
        super().__init__(status_code=status, detail=self.message, headers=headers)
        self.status = status
        self.param = param
        self.code = code
        self.type = type or error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=dict(self.headers or {}))


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    """A 400 about the request field ``param``."""
    return OpenAIError(400, message, param=param, code=code)


def from_rpc_error(error: grpc.aio.AioRpcError, dependency: str) -> OpenAIError:
    """A downstream gRPC failure as the edge's answer: its status mapped (HTTP_STATUS_OF), its message kept (the
    services' messages say what to change and never carry traces), and the delay of a google.rpc.RetryInfo detail as
    Retry-After on 429."""
    code = error.code()
    status = HTTP_STATUS_OF.get(code, 502)
    details = error.details() or ""
    message = details if status < 500 else f"{dependency}: {details or code.name}"
    retry_after: float | None = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = retry_delay(error.trailing_metadata() or ()) or DEFAULT_RETRY_AFTER_SECONDS
    return OpenAIError(status, message, code=code.name.lower(), retry_after=retry_after)


def retry_delay(metadata: Iterable[tuple[str, Any]]) -> float | None:
    """Seconds of the google.rpc.RetryInfo in a call's status details, or None when it has none."""
    for key, value in metadata:
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a peer's malformed details: no delay rather than no answer
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToTimedelta().total_seconds()
    return None


def _location(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a request field path: ("body", "messages", 0, "role") -> messages[0].role."""
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


async def _on_openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "the request body is not valid"}
    if first.get("type") == "json_invalid":
        return bad_request(
            "the request body is not valid JSON; send a JSON object (Content-Type: application/json)",
            code="invalid_json",
        ).response()
    param = _location(first.get("loc", ())) or None
    # Each problem by its field and pydantic's words; the input itself is never echoed (it may be megabytes).
    problems = "; ".join(f"{_location(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return bad_request(f"invalid request: {problems}{more}", param=param).response()


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path[:100]}; see /v1/models and /v1/chat/completions"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path[:100]}"
    else:
        message = str(exc.detail)
    error = OpenAIError(exc.status_code, message, code=None)
    response = error.response()
    response.headers.update(dict(exc.headers or {}))
    return response


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Our bug: logged with its trace, the caller gets an incident id to quote and never the trace itself.
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s %s (incident %s)", request.method, request.url.path, incident, exc_info=exc)
    return OpenAIError(
        500, f"internal error (incident {incident}); see the edge's log", code="internal_error"
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error of ``app`` an OpenAI-style body: OpenAIError, request validation (400 naming the field),
    unknown routes and methods, and anything unexpected (500 with an incident id, the trace only in the log)."""
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

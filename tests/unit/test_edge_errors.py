"""The edge's OpenAI-style errors: bodies, the gRPC status mapping with Retry-After, and the handlers of an app."""

from __future__ import annotations

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from pydantic import BaseModel

from services.edge.errors import OpenAIError, from_rpc_error, install_error_handlers, retry_delay


def rpc_error(code: grpc.StatusCode, details: str, trailing: tuple = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


def retry_info_metadata(seconds: float) -> tuple[tuple[str, bytes], ...]:
    detail = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=8, message="slow down", details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
        (grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
        (grpc.StatusCode.INTERNAL, 502, "server_error"),
    ],
)
def test_grpc_statuses_map_to_http_statuses_with_openai_bodies(code: grpc.StatusCode, status: int, kind: str) -> None:
    error = from_rpc_error(rpc_error(code, "what to change"), "inference")
    assert error.status == status
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == kind
    assert body["code"] == code.name.lower()
    assert "what to change" in body["message"]


def test_resource_exhausted_carries_the_retry_info_delay_as_retry_after() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", retry_info_metadata(2.2)), "x")
    assert error.headers == {"Retry-After": "3"}
    plain = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), "x")
    assert plain.headers == {"Retry-After": "1"}


def test_malformed_status_details_give_no_delay() -> None:
    assert retry_delay([("grpc-status-details-bin", b"\xff\xff not a status")]) is None
    assert retry_delay([("other", b"")]) is None


def test_messages_are_bounded() -> None:
    error = OpenAIError(400, "x" * 1_000_000 + " set max_tokens lower")
    assert len(error.message.encode()) <= 1000
    assert error.message.endswith("set max_tokens lower")


class Body(BaseModel):
    count: int


def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/count")
    async def count(body: Body) -> dict[str, int]:
        return {"count": body.count}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @app.get("/busy")
    async def busy() -> None:
        raise OpenAIError(429, "busy", retry_after=5)

    return TestClient(app, raise_server_exceptions=False)


def test_validation_errors_are_400_naming_the_field_without_echoing_input() -> None:
    response = client().post("/count", json={"count": "A" * 100_000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "count"
    assert error["type"] == "invalid_request_error"
    assert "AAAA" not in error["message"]


def test_invalid_json_is_400() -> None:
    response = client().post("/count", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_routes_and_methods_are_openai_errors() -> None:
    assert client().get("/nowhere").json()["error"]["type"] == "not_found_error"
    response = client().get("/count")
    assert response.status_code == 405
    assert "GET" in response.json()["error"]["message"]


def test_an_unexpected_exception_is_a_500_with_an_incident_id_and_no_trace(caplog: pytest.LogCaptureFixture) -> None:
    response = client().get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    assert "incident" in error["message"]
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text


def test_openai_errors_raised_by_routes_keep_status_and_headers() -> None:
    response = client().get("/busy")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "5"

"""Client channels with the mesh's call policy: retries on UNAVAILABLE in the service config, round-robin balancing,
mutual TLS when the mesh runs with it."""

from __future__ import annotations

import json

import grpc

from services.common import tracing
from services.common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.server import MAX_MESSAGE_BYTES
from services.common.tls import TlsIdentity

# Retrying only UNAVAILABLE is safe: the call never reached a handler. Streaming calls are retried only until the
# first response arrives (gRPC's rule), so a retried Generate never duplicates text.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


class _Bearer:
    """Sends ``authorization: Bearer <token>`` with every call (an API key or a JWT for the planner)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


# Two classes: grpc.aio files an interceptor under the first kind it is an instance of, never both.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(client_call_details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(client_call_details), request)


def create_channel(
    target: str, *, api_key: str | None = None, tls: TlsIdentity | None = None, server: str | None = None
) -> grpc.aio.Channel:
    """An aio channel to ``target`` (host:port or dns:///name:port) with the mesh's retry policy; with ``api_key``
    every call carries it as a bearer token (what the planner asks for when authentication is on).

    Plaintext without ``tls``. With it the channel presents ``tls``'s certificate and trusts only the mesh CA; the
    server's certificate must name ``server`` (a service: every mesh certificate has its name as a DNS SAN, so the
    planner reaching 127.0.0.1 checks that it is inference it reached), else the target's host as usual.
    """
    options = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # A restarted peer is dialled again within a second or two (gRPC's default backoff grows to 120 s, so a
        # service back after a long outage would stay unreached, and every call fail fast, for minutes).
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    interceptors: list[grpc.aio.ClientInterceptor] = [_BearerUnary(api_key), _BearerStream(api_key)] if api_key else []
    # The trace context (when this process traces) goes into the metadata of every call, the bearer token's included.
    interceptors += tracing.client_interceptors()
    if tls is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors or None, options=options)
    if server is not None:
        options.append(("grpc.ssl_target_name_override", server))
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(), interceptors=interceptors or None, options=options
    )


_CODE_TO_ERROR: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def rpc_error_to_mesh_error(error: grpc.aio.AioRpcError, dependency: str) -> MeshError:
    """Re-raises a downstream failure as ours, keeping its code where it means the same to our caller."""
    error_type = _CODE_TO_ERROR.get(error.code(), UnavailableError)
    return error_type(f"{dependency}: {error.details()}")

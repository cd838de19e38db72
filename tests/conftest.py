"""Shared test helpers: free ports and gRPC health."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(target: str, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Whether the gRPC health service at ``target`` answers SERVING (within 2 s); over TLS with ``credentials``."""
    with grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

"""Shared test helpers: free ports, gRPC health, and the environment of the services a test starts."""

from __future__ import annotations

import os
import random
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The inference backend of every service a test starts as a process, unless the test names one: torch. The shipped
# default, auto, picks openvino on a machine where `make install-openvino` ran, and each test's fresh data directory
# would export the model again (a minute each); tests of the openvino backend set it themselves. CI has no exporter:
# torch either way.
TEST_ENV = {"MESHPILOT_INFERENCE__BACKEND": "torch"}


def clean_env() -> dict[str, str]:
    """This process's environment without its MESHPILOT_* settings, but with the tests' own (``TEST_ENV``): for
    services started from scratch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_")}
    return {**env, **TEST_ENV}


# Ports for services the tests start: below the kernel's ephemeral range (32768-60999 here), so no outgoing
# connection takes one between free_port() and the service's bind, and above Ray's worker ports (10002-19999 by
# default: a Ray node refuses to start when one of its components was given a port in that range, and its workers bind
# them later); split evenly among the xdist workers.
_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a service to bind soon, never handed out before in this process. Under pytest-xdist each
    worker draws from its own slice of ``_PORTS``, so two workers' meshes never race for one. (Not bind(0): the kernel
    hands bind(0) ports of one parity only, odd on Linux 6.18, so no rule on the port number can split those.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    span = len(_PORTS) // workers
    mine = range(_PORTS.start + worker * span, _PORTS.start + (worker + 1) * span)
    for _ in range(1000):
        port = random.choice(mine)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {mine.start}-{mine.stop - 1} after 1000 tries")


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

"""What every edge route shares: the gRPC channels the app holds and the caller's credentials to forward.

The app (``services/edge/app.py``) opens the channels (to inference, one per replica) at start-up and keeps them on ``app.state``; routes reach
them through these functions, never through module globals, so tests mount a router on their own app with channels to
in-process fakes.
"""

from __future__ import annotations

import grpc
from fastapi import Request

from services.common.auth import ANONYMOUS, TENANT_METADATA, Principal
from services.common.routing import ReplicaSet


def planner_channel(request: Request) -> grpc.aio.Channel:
    """The channel to the planner (agents, sessions, runs, approvals). The planner authenticates each call itself."""
    channel: grpc.aio.Channel = request.app.state.planner_channel
    return channel


def inference_replicas(request: Request) -> ReplicaSet:
    """The inference replicas (chat completions, models), routed as the planner routes them: by affinity of tenant,
    model and system prompt, health-watched, a refused call handed to the next (``inference.replicas`` or
    ``inference.discover``; one replica by default)."""
    replicas: ReplicaSet = request.app.state.inference_replicas
    return replicas


def call_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries the HTTP caller's bearer token to the planner, so the planner's authentication and
    tenant checks apply to HTTP callers exactly as to gRPC ones."""
    authorization = request.headers.get("authorization")
    return (("authorization", authorization),) if authorization else ()


def principal(request: Request) -> Principal:
    """The HTTP caller, as the app's authentication resolved it (the default tenant when authentication is off)."""
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else ANONYMOUS


def inference_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """gRPC metadata naming the HTTP caller's tenant to the inference service, which shares its capacity between
    tenants and counts their tokens by it (as it does for the planner's calls on a run's behalf)."""
    return ((TENANT_METADATA, principal(request).tenant),)


def request_timeout(request: Request) -> float:
    """The deadline, in seconds, of the gRPC calls one HTTP request makes (edge.request_timeout_seconds)."""
    timeout: float = request.app.state.request_timeout
    return timeout

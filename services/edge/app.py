"""The edge's FastAPI app: channels to the planner and the inference service, authentication, bounded request bodies,
OpenAI-style errors, /healthz, and the routers it mounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import (
    ANONYMOUS,
    Authenticator,
    Principal,
    auth_required,
    bearer_token,
    is_loopback,
    key_store,
)
from services.common.clients import create_channel
from services.common.config import MeshConfig
from services.common.routing import ReplicaSet
from services.common.tls import TlsIdentity, tls_identity
from services.edge import agent_card, console, openai_api, runs_api
from services.edge.errors import OpenAIError, install_error_handlers

audit = logging.getLogger("meshpilot.audit")

EDGE_IDENTITY = "edge"
"""The edge's identity (certificate <cert_dir>/edge.crt) toward the planner and the inference service under TLS."""
# Answered without a token: the supervisor and load balancers probe health without credentials, and a browser loads the
# console's page and files (static, no data) before the page's own API calls send the key typed into it.
OPEN_PATHS = frozenset({"/healthz", "/", "/console"})
OPEN_PREFIXES = ("/console/",)


def is_open(path: str) -> bool:
    """Whether ``path`` is answered without a bearer token."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def edge_auth_required(config: MeshConfig) -> bool:
    """Whether every route needs a bearer token: the mesh's auth setting, and always when the edge itself listens
    beyond loopback (the planner's rule for its own port, applied to the edge's)."""
    if config.auth.enabled is not None:
        return config.auth.enabled
    return auth_required(config) or not is_loopback(config.edge.host)


def inference_replicas(config: MeshConfig, tls: TlsIdentity | None) -> ReplicaSet:
    """The inference replicas the planner routes over (``inference.discover`` or ``inference.replicas``), for the
    edge's OpenAI API: one agent's or client's prompts keep landing on the replica that has them cached."""
    inference, server = config.inference, "inference" if tls else None
    if (address := inference.discover_address()) is not None:
        return ReplicaSet.discover(
            *address, every=inference.discover_seconds, tls=tls, server=server, policy=inference.routing
        )
    return ReplicaSet.connect(inference.replica_targets(), tls=tls, server=server, policy=inference.routing)


def create_app(
    config: MeshConfig,
    *,
    planner_channel: grpc.aio.Channel | None = None,
    inference_channel: grpc.aio.Channel | None = None,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The edge app. Channels not given are opened at start-up (with the edge's TLS identity when tls is enabled)
    and closed at shutdown; given ones (tests: in-process fakes), like a given authenticator, are the caller's to
    close. With authentication required (``edge_auth_required``) every route needs ``Authorization: Bearer <key or
    JWT>``, checked by ``authenticator`` (default: the planner's key store and config.auth), but /healthz and the
    console's static page and files (``is_open``)."""
    owned = authenticator is None and edge_auth_required(config)
    if owned:
        authenticator = Authenticator(config.auth, key_store(config))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tls = tls_identity(config, EDGE_IDENTITY)
        opened: list[grpc.aio.Channel | ReplicaSet] = []

        def channel(given: grpc.aio.Channel | None, target: str, server: str) -> grpc.aio.Channel:
            if given is not None:
                return given
            opened.append(create_channel(target, tls=tls, server=server if tls else None))
            return opened[-1]

        app.state.planner_channel = channel(planner_channel, config.planner.server.target(), "planner")
        if inference_channel is not None:
            app.state.inference_replicas = ReplicaSet({"inference": inference_channel}, watch_health=False)
        else:
            app.state.inference_replicas = inference_replicas(config, tls)
            opened.append(app.state.inference_replicas)
        # The mesh's config, for routes that read other sections (the console's health of every service).
        app.state.config = config
        app.state.request_timeout = config.edge.request_timeout_seconds
        app.state.draining = False
        try:
            yield
        finally:
            for each in opened:
                await each.close()
            if owned and authenticator is not None:
                authenticator.keys.close()

    app = FastAPI(
        title="MeshPilot edge",
        summary="OpenAI-compatible API, agent runs over server-sent events, and the web console",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(EdgeGuard, authenticator=authenticator, max_request_bytes=config.edge.max_request_bytes)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        """200 while serving, 503 once draining (SIGTERM), so balancers stop sending first."""
        if getattr(request.app.state, "draining", False):
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    app.include_router(openai_api.router)
    app.include_router(runs_api.router)
    app.include_router(console.router)
    app.include_router(agent_card.router)
    return app


def _refused(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    response = OpenAIError(status, message, code=code).response()
    response.headers.update(headers or {})
    return response


class EdgeGuard:
    """ASGI middleware in front of every route: refuses bodies over ``max_request_bytes`` (413, by Content-Length
    before reading, or while reading a body sent without one), authenticates the caller when ``authenticator`` is
    set (401 otherwise) and puts its Principal on ``request.state.principal``, and writes one audit line per request
    (tenant, key id, method, path, status)."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None, max_request_bytes: int) -> None:
        self.app = app
        self.authenticator = authenticator
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            await self._too_large(length)(scope, receive, send)
            return
        principal: Principal | None = ANONYMOUS
        if self.authenticator is not None and not is_open(path):
            principal = await self._authenticate(headers.get("authorization"))
            if principal is None:
                refusal = _refused(
                    401,
                    "send a valid API key as 'Authorization: Bearer mpk_...' (create one with `meshpilot keys create "
                    "--tenant NAME`) or a JWT this mesh accepts",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
                self._audit(Principal("-", "-"), scope, 401)
                await refusal(scope, receive, send)
                return
        assert principal is not None
        scope.setdefault("state", {})["principal"] = principal
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, self._bounded(receive), sending)
        finally:
            if not is_open(path):
                self._audit(principal, scope, status)

    async def _authenticate(self, authorization: str | None) -> Principal | None:
        assert self.authenticator is not None
        token = bearer_token([("authorization", authorization)] if authorization else None)
        if not token:
            return None
        # A cache miss reads the key store (SQLite or PostgreSQL): off the event loop.
        return self.authenticator.cached(token) or await asyncio.to_thread(self.authenticator.authenticate, token)

    def _too_large(self, length: str) -> JSONResponse:
        return _refused(
            413,
            f"the request body has {length} bytes; send at most {self.max_request_bytes} (edge.max_request_bytes)",
            "request_too_large",
        )

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that raises OpenAIError(413) once the body passes the limit (a body without Content-Length)."""
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise OpenAIError(
                        413,
                        f"the request body is over {self.max_request_bytes} bytes; send less (edge.max_request_bytes)",
                        code="request_too_large",
                    )
            return message

        return bounded

    @staticmethod
    def _audit(principal: Principal, scope: Scope, status: int) -> None:
        audit.info(
            "tenant=%s key=%s method=%s resource=%s code=%d",
            principal.tenant,
            principal.key_id or "-",
            scope.get("method", "-"),
            str(scope.get("path", "-"))[:80],
            status,
        )

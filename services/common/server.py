"""Server bootstrap shared by every service: health, reflection, error mapping and a SIGTERM drain."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common import tracing
from services.common.config import ServerConfig
from services.common.errors import ErrorMappingInterceptor, rewrap_handler
from services.common.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics
from services.common.tls import ServerTls

log = logging.getLogger(__name__)

# 64 MiB: tool results and knowledge-graph answers can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# glibc keeps what a call freed (gRPC's buffers, a tokenizer's work on a long prompt) in its arenas: twelve CountTokens
# calls with 1M-character prompts left the inference service's RSS 300 MB higher for good. After a request this large
# the heap is trimmed, which hands that memory back.
TRIM_AFTER_REQUEST_BYTES = 256 * 1024


def _find_malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return None
    return lambda: trim(0)


MALLOC_TRIM = _find_malloc_trim()


class HeapTrimInterceptor(grpc.aio.ServerInterceptor):
    """Trims the C heap (``trim``, glibc's malloc_trim by default) after each call whose request had at least
    ``threshold`` bytes, off the event loop."""

    def __init__(
        self, threshold: int = TRIM_AFTER_REQUEST_BYTES, trim: Callable[[], object] | None = MALLOC_TRIM
    ) -> None:
        self.threshold = threshold
        self.trim = trim
        # Set by the request deserializer, which gRPC runs in the call's own task before the handler.
        self._request_bytes: ContextVar[int] = ContextVar("request_bytes", default=0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if self.trim is None or handler is None or handler.request_deserializer is None:
            return handler
        deserializer = handler.request_deserializer

        def measured(data: bytes) -> Any:
            self._request_bytes.set(len(data))
            return deserializer(data)

        def wrap_unary(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Any:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                finally:
                    await self._after_call()

            return wrapper

        def wrap_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Any:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    await self._after_call()

            return wrapper

        return rewrap_handler(handler, wrap_unary, wrap_stream, request_deserializer=measured)

    async def _after_call(self) -> None:
        if self._request_bytes.get() >= self.threshold and self.trim is not None:
            await asyncio.to_thread(self.trim)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host: its full name (from the descriptor), servicer and generated add_*_to_server."""

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class MeshServer:
    """A grpc.aio server with the standard health and reflection services, error mapping and Prometheus metrics.

    Health starts NOT_SERVING and turns SERVING only when ``set_serving()`` is called (after the model or store has
    loaded); ``stop()`` turns it NOT_SERVING before draining. Services add their own collectors to ``registry``; it is
    served at /metrics from ``start()`` on (``metrics_port`` tells where). ``max_request_bytes`` refuses larger
    requests with RESOURCE_EXHAUSTED before they are read (responses may always be up to MAX_MESSAGE_BYTES).

    With ``tls`` the port serves TLS only (a plaintext call fails in the handshake) and, for an internal service,
    only callers whose certificate ``tls`` allows; with ``tls.health_port_offset`` health alone is also served in
    plaintext on port + offset (``health_port``). With ``metrics_authorize`` a scrape of /metrics needs a bearer
    token it accepts.
    """

    def __init__(
        self,
        config: ServerConfig,
        bindings: Sequence[ServiceBinding],
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        registry: CollectorRegistry | None = None,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
        tls: ServerTls | None = None,
        metrics_authorize: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.bindings = list(bindings)
        self.registry = registry or CollectorRegistry()
        self.rpc_metrics = RpcMetrics(self.registry)
        self.metrics_port: int | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._metrics_authorize = metrics_authorize
        caller_check = tls.interceptor() if tls is not None else None
        self.server = grpc.aio.server(
            # Metrics outermost, so they count the status codes the error mapping chose; the call's span next, so it
            # records them too (the error mapping aborts through the context the span's interceptor hands down).
            interceptors=[
                MetricsInterceptor(self.rpc_metrics),
                *tracing.server_interceptors(),
                HeapTrimInterceptor(),
                ErrorMappingInterceptor(),
                *([caller_check] if caller_check is not None else []),
                *interceptors,
            ],
            options=[
                ("grpc.max_receive_message_length", max_request_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for binding in self.bindings:
            binding.add_to_server(binding.servicer, self.server)
        reflection.enable_server_reflection(
            [*(b.full_name for b in self.bindings), health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        bind = f"{config.host}:{config.port}"
        self.port = (
            self.server.add_secure_port(bind, tls.server_credentials())
            if tls is not None
            else self.server.add_insecure_port(bind)
        )
        if self.port == 0:
            raise OSError(f"could not bind {bind}; is another process using the port?")
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        if tls is not None and tls.health_port_offset is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_bind = f"{config.host}:{config.port + tls.health_port_offset if config.port else 0}"
            self.health_port = self._health_server.add_insecure_port(health_bind)
            if self.health_port == 0:
                raise OSError(f"could not bind {health_bind} (health); is another process using the port?")

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "[::]", "::") else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self.config.metrics:
            self._metrics_endpoint = MetricsEndpoint(
                self.config.host, self.config.resolved_metrics_port(), self.registry, authorize=self._metrics_authorize
            )
            self.metrics_port = self._metrics_endpoint.port

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_all(status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so balancers stop sending), then let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        if self._health_server is not None:
            # After the drain: probes read NOT_SERVING until the service is gone.
            await self._health_server.stop(0)
        if self._metrics_endpoint is not None:
            # shutdown() waits for the HTTP server's next poll (up to 0.5 s): not on the event loop.
            await asyncio.to_thread(self._metrics_endpoint.close)
            self._metrics_endpoint = None

    async def _set_all(self, status: int) -> None:
        await self.health.set("", status)
        for binding in self.bindings:
            await self.health.set(binding.full_name, status)


async def serve(
    server: MeshServer,
    *,
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Runs ``server`` until SIGTERM/SIGINT (or ``stop_event``): start, ``startup()``, SERVING, wait, drain, ``shutdown()``."""
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        log.info("listening on %s (NOT_SERVING until ready)", server.address)
        if startup is not None:
            await startup()
        await server.set_serving()
        log.info("SERVING on %s", server.address)
        await stop.wait()
        log.info("draining (grace %.1fs)", server.config.grace_seconds)
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if shutdown is not None:
            await shutdown()
        log.info("stopped")

"""Prometheus metrics: an HTTP endpoint per service and per-RPC counters and latency histograms for every method."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.common.errors import rewrap_handler

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RpcMetrics:
    """``meshpilot_rpc_requests_total{method,code}``, ``meshpilot_rpc_duration_seconds{method}`` and, for
    server-streaming methods, ``meshpilot_rpc_stream_messages_total{method}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshpilot_rpc_requests", "Finished RPCs by method and status code.", ["method", "code"], registry=registry
        )
        self.duration = Histogram(
            "meshpilot_rpc_duration_seconds",
            "Wall time of an RPC, from the handler's start to its last message.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.messages = Counter(
            "meshpilot_rpc_stream_messages", "Messages sent by server-streaming RPCs.", ["method"], registry=registry
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.duration.labels(method).observe(seconds)


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.INTERNAL


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records every unary and server-streaming call in :class:`RpcMetrics` (outermost, so it sees mapped codes)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        metrics = self.metrics

        def wrap_unary(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Any:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                began, error = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    metrics.observe(method, _code(context, error), time.perf_counter() - began)

            return wrapper

        def wrap_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Any:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                began, error = time.perf_counter(), None
                sent = metrics.messages.labels(method)
                try:
                    async for response in behavior(request, context):
                        sent.inc()
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    metrics.observe(method, _code(context, error), time.perf_counter() - began)

            return wrapper

        return rewrap_handler(await continuation(handler_call_details), wrap_unary, wrap_stream)


class MetricsEndpoint:
    """Serves a registry at http://host:port/metrics on a daemon thread (port 0 picks a free one).

    With ``authorize`` a scrape must send ``Authorization: Bearer <token>`` that it accepts (Prometheus:
    ``authorization: {credentials: ...}`` in the scrape config), else 401 with nothing of the metrics.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, authorize: Callable[[str], bool] | None = None
    ) -> None:
        app = make_wsgi_app(registry)
        if authorize is not None:
            app = _bearer_only(app, authorize)
        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bearer_only(app: Any, authorize: Callable[[str], bool]) -> Any:
    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() == "bearer" and token.strip() and authorize(token.strip()):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"send Authorization: Bearer <API key> to read the metrics\n"]

    return guarded

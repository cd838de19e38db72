"""Serving the edge app with uvicorn: the port bound before start (a clear error when taken), SIGTERM drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

from services.common.config import ConfigError, EdgeConfig, MeshConfig
from services.edge.app import create_app

log = logging.getLogger(__name__)


class _HostSignalsServer(uvicorn.Server):
    """uvicorn without its own SIGTERM/SIGINT handlers: ``EdgeServer`` marks the app draining before it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class EdgeServer:
    """The edge app on ``config.host:config.port`` (0: a free port, read ``port`` after ``start()``)."""

    def __init__(self, config: EdgeConfig, app: FastAPI) -> None:
        self.config = config
        self.app = app
        self.port: int | None = None
        self._server: _HostSignalsServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Binds the port and serves in a task; returns once requests are answered (the lifespan has run)."""
        host = self.config.host.strip("[]")
        # Bound here, not by uvicorn, which exits the process when it cannot bind.
        try:
            listener = socket.create_server(
                (host, self.config.port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
            )
        except OSError as e:
            raise ConfigError(
                f"the edge cannot listen on {host}:{self.config.port} ({e.strerror or e}); change edge.host or "
                "edge.port, or set edge.enabled to false"
            ) from e
        self.port = listener.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            # The process configures logging (`meshpilot serve`); uvicorn's records propagate to it.
            log_config=None,
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=max(1, math.ceil(self.config.grace_seconds)),
        )
        self._server = _HostSignalsServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]), name="edge-http")
        while not self._server.started:
            if self._task.done():
                listener.close()
                self._task.result()
                raise RuntimeError("the edge stopped while starting; see the log above")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """/healthz turns 503, then uvicorn stops accepting, lets requests in flight (streams) finish within
        grace_seconds, and runs the app's shutdown (channels closed)."""
        if self._server is None or self._task is None:
            return
        self.app.state.draining = True
        self._server.should_exit = True
        await self._task


def create_server(config: MeshConfig) -> EdgeServer:
    return EdgeServer(config.edge, create_app(config))


async def main(config: MeshConfig) -> None:
    """Serves the edge until SIGTERM/SIGINT, then drains."""
    server = create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        log.info("SERVING HTTP on %s:%s", config.edge.host, server.port)
        await stop.wait()
        log.info("draining (grace %.1fs)", config.edge.grace_seconds)
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")

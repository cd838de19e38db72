"""`meshpilot up`: the four services as local processes, started together, health-checked, kept up, stopped in order;
then the HTTP edge (edge.enabled), health-checked over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from meshpilot.cli.supervisor import (
    ChildProcess,
    MeshSupervisor,
    RestartPolicy,
    ServiceProcess,
    Spawn,
    tail,
)
from services.common import ConfigError, MeshConfig
from services.common.tls import CLIENT_IDENTITY, TlsIdentity, tls_identity

# Start order does not matter (clients connect lazily); stop order does: front door first, so no new work arrives.
GRPC_SERVICES = ("knowledge", "inference", "tools", "planner")
# The HTTP edge starts once the planner serves (its first callers are then answered), and stops first.
EDGE = "edge"
SERVICES = (*GRPC_SERVICES, EDGE)
STOP_ORDER = (EDGE, "planner", "tools", "inference", "knowledge")
STATUS_FILE = "mesh.json"
"""Written in the data dir while `up` runs: each service's pid, state and restarts (see meshpilot.cli.supervisor)."""

console = Console(stderr=True)


async def wait_serving(
    target: str, *, timeout: float, process: ChildProcess | None = None, tls: TlsIdentity | None = None
) -> bool:
    """Polls the gRPC health service at ``target`` until SERVING; False on timeout or if ``process`` exits. With
    ``tls`` it calls over mutual TLS (health answers any certificate of the mesh). An http:// target (the edge) is
    polled at /healthz until it answers 200."""
    if target.startswith("http://"):
        return await wait_http_healthy(target, timeout=timeout, process=process)
    deadline = time.monotonic() + timeout
    channel = grpc.aio.secure_channel(target, tls.channel_credentials()) if tls else grpc.aio.insecure_channel(target)
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.returncode is not None:
                return False
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.25)
    return False


async def wait_http_healthy(url: str, *, timeout: float, process: ChildProcess | None = None) -> bool:
    """Polls ``url``/healthz until it answers 200; False on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    while time.monotonic() < deadline:
        if process is not None and process.returncode is not None:
            return False
        if await asyncio.to_thread(healthy):
            return True
        await asyncio.sleep(0.25)
    return False


def _target(cfg: MeshConfig, name: str) -> str:
    return cfg.edge.url() if name == EDGE else str(getattr(cfg, name).server.target())


def _grace(cfg: MeshConfig, name: str) -> float:
    return cfg.edge.grace_seconds if name == EDGE else float(getattr(cfg, name).server.grace_seconds)


def _launcher(cfg: MeshConfig, config_path: Path | None) -> Spawn:
    """A Spawn that runs `meshpilot serve NAME` with its output appended to <data_dir>/logs/NAME.log."""
    env = dict(os.environ)
    if config_path is not None:
        env["MESHPILOT_CONFIG"] = str(config_path.resolve())

    async def spawn(name: str) -> ChildProcess:
        with open(_log_path(cfg, name), "ab") as log_file:
            # A session of its own: Ctrl-C reaches only `up`, which then stops the services in order.
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshpilot", "serve", name,
                stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    return spawn


def _log_path(cfg: MeshConfig, name: str) -> Path:
    return cfg.data_dir / "logs" / f"{name}.log"


async def _start(cfg: MeshConfig, spawn: Spawn) -> list[ServiceProcess]:
    (cfg.data_dir / "logs").mkdir(parents=True, exist_ok=True)
    return [ServiceProcess(name, _target(cfg, name), _log_path(cfg, name), await spawn(name)) for name in GRPC_SERVICES]


async def run_mesh(
    cfg: MeshConfig, config_path: Path | None, *, startup_timeout: float, policy: RestartPolicy | None = None
) -> int:
    """Starts the mesh, restarts services that exit (``policy``), and blocks until SIGINT/SIGTERM (0; 130 while still
    starting) or until a service does not start or fails for good (1); all are stopped in STOP_ORDER before it returns.
    With tls.enabled it probes health with the CLI's `client` certificate (2 when that cannot be read).

    ``startup_timeout`` bounds the first start of the mesh and each restart of a service.
    """
    try:
        probe = functools.partial(wait_serving, tls=tls_identity(cfg, CLIENT_IDENTITY))
    except ConfigError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    began = time.monotonic()
    spawn = _launcher(cfg, config_path)
    supervisor = MeshSupervisor(
        await _start(cfg, spawn),
        spawn=spawn,
        probe=probe,
        startup_timeout=startup_timeout,
        policy=policy or RestartPolicy(),
        console=console,
        status_path=cfg.data_dir / STATUS_FILE,
    )
    processes = supervisor.services
    supervisor.write_status()
    grace = max(_grace(cfg, name) for name in SERVICES)
    try:
        with console.status("starting knowledge, inference, tools and planner ..."):
            checks = [probe(p.target, timeout=startup_timeout, process=p.process) for p in processes]
            waiting = asyncio.ensure_future(asyncio.gather(*checks))
            stopped = asyncio.ensure_future(stop.wait())
            pending: set[asyncio.Future[Any]] = {waiting, stopped}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            waiting.cancel()
            return 130
        stopped.cancel()
        # A service that fails its very first start is not restarted: nothing has worked yet, so the cause is most
        # likely the config or the machine, and retrying would only delay the error.
        failed = [p for p, ok in zip(processes, waiting.result(), strict=True) if not ok]
        if failed:
            for p in failed:
                console.print(f"[red]{p.name} did not become SERVING[/] (log {p.log_path}):\n{tail(p.log_path)}")
            return 1
        edge = await _spawn_edge(cfg, spawn, supervisor) if cfg.edge.enabled else None
        if edge is not None:
            with console.status(f"starting the edge at {edge.target} ..."):
                healthy = await _unless_stopped(probe(edge.target, timeout=startup_timeout, process=edge.process), stop)
            if healthy is None:
                return 130
            if not healthy:
                console.print(
                    f"[red]edge did not answer {edge.target}/healthz[/] (log {edge.log_path}):\n{tail(edge.log_path)}"
                )
                return 1
        supervisor.mark_serving()
        _print_endpoints(processes, time.monotonic() - began, cfg.data_dir / STATUS_FILE)
        return await supervisor.run_until(stop)
    finally:
        console.print("stopping the mesh ...")
        await supervisor.stop(STOP_ORDER, grace)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _spawn_edge(cfg: MeshConfig, spawn: Spawn, supervisor: MeshSupervisor) -> ServiceProcess | None:
    """Starts the edge among the supervised services. None, and the mesh runs without it (said, with what to do),
    when its port is taken (another mesh's edge on 8080 would otherwise answer the probe for it) or TLS is on and the
    edge has no certificate."""
    try:
        tls_identity(cfg, EDGE)
        _check_port_free(cfg.edge.host, cfg.edge.port)
    except (ConfigError, OSError) as e:
        console.print(f"[yellow]the edge is not started[/]: {e}; or set edge.enabled to false", soft_wrap=True)
        return None
    edge = ServiceProcess(EDGE, _target(cfg, EDGE), _log_path(cfg, EDGE), await spawn(EDGE))
    supervisor.services.append(edge)
    supervisor.write_status()
    return edge


async def _unless_stopped(check: Awaitable[bool], stop: asyncio.Event) -> bool | None:
    """``check``'s answer, or None (``check`` cancelled) when ``stop`` is set first (Ctrl-C while starting)."""
    checking = asyncio.ensure_future(check)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({checking, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not checking.done():
        checking.cancel()
        await asyncio.gather(checking, return_exceptions=True)
        return None
    return checking.result()


def _check_port_free(host: str, port: int) -> None:
    """OSError naming edge.port when ``host:port`` cannot be bound now."""
    if port == 0:
        return
    host = host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # As uvicorn binds: a port whose last connections linger in TIME_WAIT is free, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise OSError(
            f"{host}:{port} is in use ({e.strerror}); set edge.port (MESHPILOT_EDGE__PORT) to a free port"
        ) from e


def _print_endpoints(processes: list[ServiceProcess], seconds: float, status_path: Path) -> None:
    table = Table(title=f"MeshPilot is up ({seconds:.1f}s)")
    for column in ("service", "endpoint", "pid", "log"):
        table.add_column(column)
    for p in processes:
        table.add_row(p.name, p.target, str(p.process.pid), str(p.log_path))
    console.print(table)
    console.print(f"Services that exit are restarted; current pids: {status_path}", soft_wrap=True)
    console.print('Try: [bold]meshpilot ask "What is the capital of France?"[/]   (Ctrl-C stops the mesh)')

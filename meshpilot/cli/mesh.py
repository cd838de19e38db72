"""`meshpilot up`: the four services as local processes, started together, health-checked, stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from services.common import MeshConfig

# Start order does not matter (clients connect lazily); stop order does: front door first, so no new work arrives.
SERVICES = ("knowledge", "inference", "tools", "planner")
STOP_ORDER = ("planner", "tools", "inference", "knowledge")

console = Console(stderr=True)


@dataclass
class ServiceProcess:
    name: str
    target: str
    log_path: Path
    process: asyncio.subprocess.Process


async def wait_serving(target: str, *, timeout: float, process: asyncio.subprocess.Process | None = None) -> bool:
    """Polls the gRPC health service at ``target`` until SERVING; False on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _start(cfg: MeshConfig, config_path: Path | None) -> list[ServiceProcess]:
    log_dir = cfg.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if config_path is not None:
        env["MESHPILOT_CONFIG"] = str(config_path.resolve())
    started = []
    for name in SERVICES:
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            # A session of its own: Ctrl-C reaches only `up`, which then stops the services in order.
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshpilot", "serve", name,
                stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        started.append(ServiceProcess(name, getattr(cfg, name).server.target(), log_path, process))
    return started


async def _stop(processes: list[ServiceProcess], grace: float) -> None:
    by_name = {p.name: p for p in processes}
    for name in STOP_ORDER:
        proc = by_name.get(name)
        if proc is None or proc.process.returncode is not None:
            continue
        proc.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.process.wait(), timeout=grace + 5)
        except TimeoutError:
            console.print(f"[yellow]{name} did not stop within {grace + 5:.0f}s; killing it[/]")
            proc.process.kill()
            await proc.process.wait()
        console.print(f"stopped {name} (exit {proc.process.returncode})")


async def run_mesh(cfg: MeshConfig, config_path: Path | None, *, startup_timeout: float) -> int:
    """Starts the mesh and blocks until SIGINT/SIGTERM or a service dies; returns the exit code for `up`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    began = time.monotonic()
    processes = await _start(cfg, config_path)
    grace = max(getattr(cfg, p.name).server.grace_seconds for p in processes)
    try:
        with console.status("starting knowledge, inference, tools and planner ..."):
            checks = [wait_serving(p.target, timeout=startup_timeout, process=p.process) for p in processes]
            waiting = asyncio.ensure_future(asyncio.gather(*checks))
            stopped = asyncio.ensure_future(stop.wait())
            pending: set[asyncio.Future[Any]] = {waiting, stopped}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            waiting.cancel()
            return 130
        stopped.cancel()
        failed = [p for p, ok in zip(processes, waiting.result(), strict=True) if not ok]
        if failed:
            for p in failed:
                console.print(f"[red]{p.name} did not become SERVING[/] (log {p.log_path}):\n{_tail(p.log_path)}")
            return 1
        _print_endpoints(processes, time.monotonic() - began)
        exits = [asyncio.ensure_future(p.process.wait()) for p in processes]
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopped, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for future in exits:
            future.cancel()
        if stopped not in done:
            dead = [p for p in processes if p.process.returncode is not None]
            for p in dead:
                console.print(
                    f"[red]{p.name} exited with {p.process.returncode}[/] (log {p.log_path}):\n{_tail(p.log_path)}"
                )
            return 1
        return 0
    finally:
        console.print("stopping the mesh ...")
        await _stop(processes, grace)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_endpoints(processes: list[ServiceProcess], seconds: float) -> None:
    table = Table(title=f"MeshPilot is up ({seconds:.1f}s)")
    for column in ("service", "endpoint", "pid", "log"):
        table.add_column(column)
    for p in processes:
        table.add_row(p.name, p.target, str(p.process.pid), str(p.log_path))
    console.print(table)
    console.print('Try: [bold]meshpilot ask "What is the capital of France?"[/]   (Ctrl-C stops the mesh)')

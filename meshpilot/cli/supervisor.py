"""Keeps `meshpilot up`'s services running: restarts one that exits, with backoff, and gives up on one that keeps failing.

While the mesh is up, ``<data_dir>/mesh.json`` says what runs where; it is rewritten whenever a service exits, is
restarted or becomes SERVING, and removed when `up` stops::

    {"up_pid": 4242, "services": {"tools": {"pid": 4250, "state": "serving", "restarts": 1,
                                            "target": "127.0.0.1:50052", "log": ".meshpilot/logs/tools.log"}, ...}}

``state`` is ``starting`` (spawned, not yet SERVING), ``serving`` or ``restarting`` (exited, waiting out its backoff).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from rich.console import Console


class ChildProcess(Protocol):
    """What the supervisor needs of a service process; ``asyncio.subprocess.Process`` is one."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class HealthProbe(Protocol):
    """True once ``target`` reports SERVING; False after ``timeout`` seconds or as soon as ``process`` exits."""

    def __call__(self, target: str, *, timeout: float, process: ChildProcess | None) -> Awaitable[bool]: ...


Spawn = Callable[[str], Awaitable[ChildProcess]]
"""Starts the named service as a new process (its output appended to its log) and returns it."""

ServiceState = Literal["starting", "serving", "restarting"]


@dataclass(frozen=True)
class RestartPolicy:
    """When a service that exited is restarted, and when `up` stops trying and shuts the mesh down."""

    initial_backoff: float = 0.5
    """Seconds before the first restart; each further restart waits twice as long as the one before."""
    max_backoff: float = 30.0
    """The longest wait before a restart, however many came before."""
    stable_after: float = 60.0
    """A service SERVING at least this long has recovered: its next restart waits ``initial_backoff`` again."""
    max_restarts: int = 5
    """More restarts than this of one service within ``restart_window`` seconds: `up` gives up."""
    restart_window: float = 300.0
    """Seconds over which restarts are counted against ``max_restarts``."""

    def __post_init__(self) -> None:
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("RestartPolicy: need 0 < initial_backoff <= max_backoff; raise max_backoff or lower both")
        if self.max_restarts < 1 or self.restart_window <= 0 or self.stable_after < 0:
            raise ValueError("RestartPolicy: max_restarts must be >= 1, restart_window > 0 and stable_after >= 0")

    def backoff(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1 = the first since the service last stayed up)."""
        # The exponent is capped so a long streak cannot overflow the float before min() applies.
        return min(self.initial_backoff * 2.0 ** min(restart - 1, 64), self.max_backoff)


@dataclass
class ServiceProcess:
    """One service of the mesh and its current process; the restart bookkeeping belongs to the supervisor."""

    name: str
    target: str
    log_path: Path
    process: ChildProcess
    state: ServiceState = "starting"
    streak: int = 0
    """Restarts since the service last stayed SERVING for ``stable_after``: picks the backoff."""
    restarts: int = 0
    """Restarts since `up` started, for people reading mesh.json."""
    restart_times: list[float] = field(default_factory=list)
    serving_since: float | None = None


@dataclass(frozen=True)
class ServiceFailure:
    """A service `up` gave up on, and why (a phrase: "restarted 5 times within 300s")."""

    service: ServiceProcess
    reason: str


def describe_exit(code: int) -> str:
    """``-9`` -> ``-9 (SIGKILL)``: asyncio reports death by signal N as exit code -N."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


class MeshSupervisor:
    """Restarts services that exit while the mesh is up, until stopped or until one fails for good.

    ``spawn``, ``probe``, ``clock`` and ``sleep`` are injected so tests run restarts without processes or real time.
    A restarted service counts as recovered only once ``probe`` reports it SERVING within ``startup_timeout``.
    """

    def __init__(
        self,
        services: Sequence[ServiceProcess],
        *,
        spawn: Spawn,
        probe: HealthProbe,
        startup_timeout: float,
        policy: RestartPolicy,
        console: Console,
        status_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.services = list(services)
        self._spawn = spawn
        self._probe = probe
        self._startup_timeout = startup_timeout
        self._policy = policy
        self._console = console
        self._status_path = status_path
        self._clock = clock
        self._sleep = sleep

    def mark_serving(self) -> None:
        """Records that every service is SERVING now (after the mesh's first start)."""
        now = self._clock()
        for service in self.services:
            service.state, service.serving_since = "serving", now
        self.write_status()

    async def run_until(self, stop: asyncio.Event) -> int:
        """Supervises until ``stop`` is set (returns 0) or a service fails for good (prints why, returns 1).

        Supervision has ended when this returns, even mid-backoff, so the caller can stop the services in order.
        """
        supervising = asyncio.ensure_future(self.supervise())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({supervising, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (supervising, stopped):
                task.cancel()
            await asyncio.gather(supervising, stopped, return_exceptions=True)
        if stop.is_set() or supervising.cancelled():
            return 0
        failure = supervising.result()
        s = failure.service
        self._console.print(f"[red]{s.name} {failure.reason}; giving up[/] (log {s.log_path}):\n{tail(s.log_path)}")
        return 1

    async def supervise(self) -> ServiceFailure:
        """Keeps every service up; returns the first one that fails for good. Cancel it to stop supervising."""
        tasks = [asyncio.ensure_future(self._keep_up(s)) for s in self.services]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for task in tasks:
                task.cancel()
            # Waiting lets a spawn that was under way finish and be recorded, so stop() terminates it too.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_up(self, service: ServiceProcess) -> ServiceFailure:
        while True:
            code = await service.process.wait()
            failure = self._count_restart(service)
            if failure is not None:
                return failure
            delay = self._policy.backoff(service.streak)
            self._console.print(
                f"[yellow]{service.name} exited with {describe_exit(code)}[/]; "
                f"restarting in {delay:g}s (restart {service.restarts})",
                soft_wrap=True,  # one line per event, so people and tests can grep the output
            )
            self._set_state(service, "restarting")
            await self._sleep(delay)
            try:
                await self._respawn(service)
            except OSError as e:
                return ServiceFailure(service, f"could not be restarted ({e})")
            if await self._probe(service.target, timeout=self._startup_timeout, process=service.process):
                service.serving_since = self._clock()
                self._set_state(service, "serving")
                self._console.print(
                    f"[green]{service.name} is SERVING again[/] (pid {service.process.pid})", soft_wrap=True
                )
            elif service.process.returncode is None:
                return ServiceFailure(service, f"did not become SERVING within {self._startup_timeout:g}s of a restart")
            # Otherwise it exited before SERVING: the next turn counts that as another restart.

    def _count_restart(self, service: ServiceProcess) -> ServiceFailure | None:
        """Books one more restart of ``service``; a ServiceFailure if that is more than the policy allows."""
        now, policy = self._clock(), self._policy
        if service.serving_since is not None and now - service.serving_since >= policy.stable_after:
            service.streak = 0
        service.serving_since = None
        service.restart_times = [t for t in service.restart_times if now - t < policy.restart_window]
        if len(service.restart_times) >= policy.max_restarts:
            return ServiceFailure(
                service, f"exited again after {policy.max_restarts} restarts within {policy.restart_window:g}s"
            )
        service.restart_times.append(now)
        service.streak += 1
        service.restarts += 1
        return None

    async def _respawn(self, service: ServiceProcess) -> None:
        spawning = asyncio.ensure_future(self._spawn(service.name))
        try:
            service.process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # Cancelled mid-spawn (the mesh is stopping): keep the child, so that stop() terminates it.
            service.process = await spawning
            raise
        finally:
            self._set_state(service, "starting")

    def _set_state(self, service: ServiceProcess, state: ServiceState) -> None:
        service.state = state
        self.write_status()

    def write_status(self) -> None:
        """Rewrites mesh.json (see the module docstring) atomically, so readers never see half a file."""
        if self._status_path is None:
            return
        status: dict[str, Any] = {"up_pid": os.getpid(), "services": {}}
        for s in self.services:
            status["services"][s.name] = {
                "pid": s.process.pid,
                "state": s.state,
                "restarts": s.restarts,
                "target": s.target,
                "log": str(s.log_path),
            }
        partial = self._status_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(status, indent=2) + "\n")
        partial.replace(self._status_path)

    async def stop(self, order: Sequence[str], grace: float) -> None:
        """SIGTERMs the running services in ``order``, each given ``grace`` + 5 s before SIGKILL; removes mesh.json.

        Call it after supervision has ended, or a stopped service would be restarted.
        """
        by_name = {s.name: s for s in self.services}
        for name in order:
            service = by_name.get(name)
            if service is None or service.process.returncode is not None:
                continue
            process = service.process
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=grace + 5)
            except TimeoutError:
                self._console.print(f"[yellow]{name} did not stop within {grace + 5:.0f}s; killing it[/]")
                process.kill()
                await process.wait()
            self._console.print(f"stopped {name} (exit {process.returncode})")
        if self._status_path is not None:
            self._status_path.unlink(missing_ok=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or "(no log)"."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

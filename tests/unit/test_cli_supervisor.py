"""The supervisor behind `meshpilot up`: restarts, backoff, give-up and stopping, on fake time and fake processes."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from rich.console import Console

from meshpilot.cli.mesh import STOP_ORDER
from meshpilot.cli.supervisor import (
    ChildProcess,
    MeshSupervisor,
    RestartPolicy,
    ServiceProcess,
    Spawn,
    describe_exit,
)


class FakeProcess:
    """A service process that exits when told to, or on a signal; records the signals it got."""

    def __init__(self, pid: int, signals: list[tuple[int, int]]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._signals = signals

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self._signals.append((self.pid, sig))
        self.exit(-sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class FakeTime:
    """A clock that only moves when the supervisor sleeps (or a test calls advance)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A supervisor over fake services. Each spawn's fate comes from ``starts``: "serve" (the default once the
    script is used up), "crash" (exits with 1 before SERVING) or "hang" (runs, never SERVING)."""

    def __init__(
        self,
        tmp_path: Path,
        policy: RestartPolicy,
        names: tuple[str, ...] = ("tools",),
        *,
        spawn: Spawn | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.time = FakeTime()
        self.signals: list[tuple[int, int]] = []
        self.starts: list[str] = []
        self.spawned: list[FakeProcess] = []
        self.output = io.StringIO()
        self.status_path = tmp_path / "mesh.json"
        services = [
            ServiceProcess(name, f"127.0.0.1:{5000 + i}", tmp_path / f"{name}.log", self._new_process())
            for i, name in enumerate(names)
        ]
        self.supervisor = MeshSupervisor(
            services,
            spawn=spawn or self.spawn,
            probe=self.probe,
            startup_timeout=30.0,
            policy=policy,
            console=Console(file=self.output, width=200),
            status_path=self.status_path,
            clock=self.time.clock,
            sleep=sleep or self.time.sleep,
        )
        self.supervisor.mark_serving()

    def _new_process(self) -> FakeProcess:
        process = FakeProcess(100 + len(self.spawned), self.signals)
        self.spawned.append(process)
        return process

    def service(self, name: str = "tools") -> ServiceProcess:
        return next(s for s in self.supervisor.services if s.name == name)

    def process(self, name: str = "tools") -> FakeProcess:
        process = self.service(name).process
        assert isinstance(process, FakeProcess)
        return process

    async def spawn(self, name: str) -> ChildProcess:
        return self._new_process()

    async def probe(self, target: str, *, timeout: float, process: ChildProcess | None) -> bool:
        assert isinstance(process, FakeProcess)
        fate = self.starts.pop(0) if self.starts else "serve"
        if fate == "crash":
            process.exit(1)
        return fate == "serve"

    def status(self) -> dict:
        return json.loads(self.status_path.read_text())

    def restarted(self, times: int) -> Callable[[], bool]:
        return lambda: self.text.count("SERVING again") == times

    @property
    def text(self) -> str:
        return self.output.getvalue()


async def until(condition: Callable[[], bool]) -> None:
    """Lets the supervisor's tasks run until ``condition`` holds (they never wait on real time here)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


POLICY = RestartPolicy(initial_backoff=0.5, max_backoff=4.0, stable_after=60.0, max_restarts=5, restart_window=300.0)


async def test_a_killed_service_is_restarted_and_reported(tmp_path: Path) -> None:
    h = Harness(tmp_path, POLICY)
    supervising = asyncio.ensure_future(h.supervisor.supervise())
    h.process().send_signal(signal.SIGKILL)
    await until(h.restarted(1))
    assert "tools exited with -9 (SIGKILL); restarting in 0.5s (restart 1)" in h.text
    assert "tools is SERVING again (pid 101)" in h.text
    assert h.service().process is h.spawned[1]
    assert h.status()["services"]["tools"] == {
        "pid": 101,
        "state": "serving",
        "restarts": 1,
        "target": "127.0.0.1:5000",
        "log": str(tmp_path / "tools.log"),
    }
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)


async def test_a_clean_exit_while_the_mesh_is_up_is_restarted_too(tmp_path: Path) -> None:
    h = Harness(tmp_path, POLICY)
    supervising = asyncio.ensure_future(h.supervisor.supervise())
    h.process().exit(0)
    await until(h.restarted(1))
    assert "tools exited with 0; restarting in 0.5s (restart 1)" in h.text
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)


async def test_backoff_doubles_while_restarts_fail_up_to_the_cap(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_backoff=0.5, max_backoff=4.0, max_restarts=10, restart_window=300.0)
    h = Harness(tmp_path, policy)
    h.starts = ["crash"] * 5
    supervising = asyncio.ensure_future(h.supervisor.supervise())
    h.process().exit(1)
    await until(h.restarted(1))
    assert h.time.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert "restarting in 4s (restart 6)" in h.text
    assert h.status()["services"]["tools"]["restarts"] == 6
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)


@pytest.mark.parametrize(("uptime", "expected_backoff"), [(59.0, 1.0), (60.0, 0.5)])
async def test_backoff_resets_only_after_the_service_stayed_up(
    tmp_path: Path, uptime: float, expected_backoff: float
) -> None:
    h = Harness(tmp_path, POLICY)
    supervising = asyncio.ensure_future(h.supervisor.supervise())
    h.process().exit(1)
    await until(h.restarted(1))
    h.time.advance(uptime)
    h.process().exit(1)
    await until(h.restarted(2))
    assert h.time.sleeps == [0.5, expected_backoff]
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)


async def test_gives_up_on_a_service_that_keeps_crashing_at_start(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_backoff=0.5, max_backoff=4.0, max_restarts=3, restart_window=300.0)
    h = Harness(tmp_path, policy)
    h.starts = ["crash"] * 10
    (tmp_path / "tools.log").write_text("starting\nTraceback: boom\n")
    h.process().exit(1)
    code = await h.supervisor.run_until(asyncio.Event())
    assert code == 1
    assert h.time.sleeps == [0.5, 1.0, 2.0]
    assert "tools exited again after 3 restarts within 300s; giving up" in h.text
    assert "Traceback: boom" in h.text


async def test_restarts_spread_wider_than_the_window_never_give_up(tmp_path: Path) -> None:
    policy = RestartPolicy(max_restarts=2, restart_window=100.0)
    h = Harness(tmp_path, policy)
    supervising = asyncio.ensure_future(h.supervisor.supervise())
    for restart in range(1, 6):
        h.time.advance(101.0)
        h.process().exit(1)
        await until(h.restarted(restart))
    assert not supervising.done()
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)


async def test_gives_up_on_a_restart_that_never_becomes_serving(tmp_path: Path) -> None:
    h = Harness(tmp_path, POLICY)
    h.starts = ["hang"]
    h.process().exit(1)
    assert await h.supervisor.run_until(asyncio.Event()) == 1
    assert "tools did not become SERVING within 30s of a restart; giving up" in h.text
    assert h.service().process.returncode is None  # still running: stop() is what terminates it


async def test_gives_up_when_a_service_cannot_be_spawned(tmp_path: Path) -> None:
    async def broken_spawn(name: str) -> ChildProcess:
        raise OSError("no such file")

    h = Harness(tmp_path, POLICY, spawn=broken_spawn)
    h.process().exit(1)
    assert await h.supervisor.run_until(asyncio.Event()) == 1
    assert "tools could not be restarted (no such file); giving up" in h.text


async def test_stop_during_a_pending_backoff_restarts_nothing_and_stops_the_rest_in_order(tmp_path: Path) -> None:
    sleeps: list[float] = []

    async def endless_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.Event().wait()

    h = Harness(tmp_path, POLICY, names=("knowledge", "inference", "tools", "planner"), sleep=endless_sleep)
    stop = asyncio.Event()
    running = asyncio.ensure_future(h.supervisor.run_until(stop))
    h.process("inference").send_signal(signal.SIGKILL)
    await until(lambda: sleeps == [0.5])
    assert h.status()["services"]["inference"]["state"] == "restarting"
    stop.set()
    assert await running == 0
    await h.supervisor.stop(STOP_ORDER, grace=1.0)
    assert len(h.spawned) == 4, "nothing may be restarted once the mesh is stopping"
    pids = {s.name: s.process.pid for s in h.supervisor.services}
    terminated = [pid for pid, sig in h.signals if sig == signal.SIGTERM]
    assert terminated == [pids["planner"], pids["tools"], pids["knowledge"]]
    assert "stopped planner (exit -15)" in h.text
    assert not h.status_path.exists()


async def test_real_child_processes_are_restarted_and_stopped(tmp_path: Path) -> None:
    async def spawn(name: str) -> ChildProcess:
        return await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")

    async def alive(target: str, *, timeout: float, process: ChildProcess | None) -> bool:
        return process is not None and process.returncode is None

    first = await spawn("tools")
    supervisor = MeshSupervisor(
        [ServiceProcess("tools", "127.0.0.1:1", tmp_path / "tools.log", first)],
        spawn=spawn,
        probe=alive,
        startup_timeout=5.0,
        policy=RestartPolicy(initial_backoff=0.01, max_backoff=0.01),
        console=Console(file=io.StringIO()),
    )
    supervisor.mark_serving()
    supervising = asyncio.ensure_future(supervisor.supervise())
    first.kill()
    await asyncio.wait_for(_until_replaced(supervisor.services[0], first), timeout=10)
    supervising.cancel()
    await asyncio.gather(supervising, return_exceptions=True)
    second = supervisor.services[0].process
    assert second.pid != first.pid and second.returncode is None
    await supervisor.stop(["tools"], grace=1.0)
    assert second.returncode == -signal.SIGTERM


async def _until_replaced(service: ServiceProcess, old: ChildProcess) -> None:
    while service.process is old or service.state != "serving":
        await asyncio.sleep(0.01)


def test_policy_backoff_and_validation() -> None:
    policy = RestartPolicy(initial_backoff=0.5, max_backoff=30.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 7, 8, 1000)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]
    with pytest.raises(ValueError, match="max_backoff"):
        RestartPolicy(initial_backoff=5.0, max_backoff=1.0)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=0)


def test_exit_codes_name_their_signal() -> None:
    assert describe_exit(-9) == "-9 (SIGKILL)"
    assert describe_exit(-15) == "-15 (SIGTERM)"
    assert describe_exit(3) == "3"
    assert describe_exit(-999) == "-999"

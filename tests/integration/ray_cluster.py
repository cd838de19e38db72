"""A local Ray cluster for tests: a head and a worker node (`ray start --block`, each a process of the test)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

RAY = Path(sys.executable).with_name("ray")
# Ray turns 127.0.0.1 into the machine's outward address (it expects other machines to dial its nodes); another
# loopback address is kept as given, so the whole cluster stays on this machine's loopback.
HOST = "127.0.0.2"
READY = "This command will now block forever"


class LocalRayCluster:
    """A head and one worker node of 1 CPU each, as `ray start --block` processes, each the leader of a session of
    its own that every process of its node stays in, so that stopping the cluster ends exactly its processes (`ray
    stop` would end every Ray process of the machine, other people's included). Every port is chosen free: two
    clusters on one machine do not collide."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it (108 bytes at most for a path).
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.nodes: list[subprocess.Popen[bytes]] = []
        self._starting: concurrent.futures.Future[None] | None = None

    def _start(self, name: str, *args: str) -> None:
        common = ["--node-ip-address", HOST, "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", str(self.temp)]
        common += ["--dashboard-agent-listen-port", str(free_port()), "--block"]
        with (self.temp / f"{name}.log").open("ab") as log:
            self.nodes.append(
                subprocess.Popen([str(RAY), "start", *args, *common], stdout=log, stderr=log, start_new_session=True)
            )

    def start(self, timeout: float = 180.0) -> None:
        self._start(
            "head", "--head", "--port", str(self.port), "--include-dashboard=false",
            "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        )  # fmt: skip
        self._wait_ready("head", timeout)
        self._start("worker", "--address", self.address)
        self._wait_ready("worker", timeout)

    def start_in_background(self) -> None:
        self._starting = concurrent.futures.ThreadPoolExecutor(1).submit(self.start)

    def ready(self) -> None:
        """Waits for ``start_in_background`` to finish; its failure raised here."""
        assert self._starting is not None
        self._starting.result()

    def _wait_ready(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = self.temp / f"{name}.log"
        while READY not in log.read_text(errors="replace"):
            assert self.nodes[-1].poll() is None, f"ray start ({name}) exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"ray start ({name}) not ready in {timeout:g}s; log in {log}"
            time.sleep(0.5)

    def processes(self) -> dict[int, str]:
        """Every live process of the cluster (pid: command line), by the nodes' sessions (Ray's workers make process
        groups of their own, but stay in the session); exited ones not yet reaped are not counted."""
        sessions = {node.pid for node in self.nodes}
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z" and os.getsid(int(entry.name)) in sessions:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
        return found

    def node_ids(self) -> set[str]:
        """The node ids of the head's and the worker's raylets (from their command lines)."""
        raylets = [line for line in self.processes().values() if "/raylet/raylet " in line]
        return {arg.split("=", 1)[1] for line in raylets for arg in line.split() if arg.startswith("--node_id=")}

    def stop(self, grace: float = 15.0) -> dict[int, str]:
        """SIGTERM to each node's `ray start` and its process group (the worker first); what is still alive after
        ``grace`` seconds is killed (Ray's processes take up to a minute to end on their own on a busy machine).
        Returns what is left after that: nothing, unless a process escaped. The temp dir is removed."""
        if self._starting is not None:  # a start still under way would add a node after this
            with contextlib.suppress(Exception):
                self._starting.result()
        for node in reversed(self.nodes):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.temp, ignore_errors=True)
        return left


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)

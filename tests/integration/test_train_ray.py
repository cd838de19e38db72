"""`meshpilot train --ray` on a real local Ray cluster: a head and a worker node (`ray start`, each a process of the
test) and the four services; the tiny job's rollouts and evaluation runs are made by Ray tasks on both nodes, its
training runs under Ray Train's TorchTrainer in a cluster worker, and the model comes back registered. The cluster is
stopped at the end, even on failure, and leaves no process behind."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.processes import ROOT, ServiceProcesses
from tests.integration.tiny_train import assert_round_trained, four_services, read_lines, train_command

pytestmark = [pytest.mark.slow, pytest.mark.integration]

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

    def stop(self, grace: float = 60.0) -> dict[int, str]:
        """SIGTERM to each node's `ray start` and its process group (the worker first); returns what is still alive
        after ``grace`` seconds, which is then killed. The temp dir is removed."""
        if self._starting is not None:  # a start still under way would add a node after this
            with contextlib.suppress(Exception):
                self._starting.result()
        for node in reversed(self.nodes):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)
        return left


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """Started in the background while the mesh starts (both mostly wait); the test waits for it with ``ready``."""
    ray_cluster = LocalRayCluster()
    try:
        ray_cluster.start_in_background()
        yield ray_cluster
    finally:
        left = ray_cluster.stop()
    assert not left, f"processes of the Ray cluster still alive after SIGTERM: {left}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    yield from four_services(tmp_path_factory)


def test_a_tiny_loop_runs_its_rollouts_evaluation_and_training_on_the_cluster(
    cluster: LocalRayCluster, mesh: ServiceProcesses
) -> None:
    cluster.ready()
    nodes = cluster.node_ids()
    assert len(nodes) == 2, cluster.processes()
    driver = subprocess.Popen(
        train_command(mesh, "--ray", cluster.address, "--ray-workers", "1"),
        cwd=ROOT, env=mesh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, stderr[-3000:]

    (result,) = json.loads(stdout)
    assert_round_trained(mesh, result)
    folder = mesh.data_dir / "train" / "e2e" / "round-1"
    runs = read_lines(folder / "rollouts.jsonl") + read_lines(folder / "eval.results.jsonl")
    workers = [run["worker"].split("/") for run in runs]
    # Made by Ray tasks (never the CLI's process), spread over both nodes of the cluster.
    assert {node for node, _ in workers} == nodes, workers
    assert all(int(pid) != driver.pid for _, pid in workers)

    record = json.loads((folder / "ray-train.json").read_text())
    assert record["trainer"].startswith("ray.train.") and record["trainer"].endswith(".TorchTrainer")
    assert (record["workers"], record["world_size"]) == (1, 1)
    node, pid = record["rank0"].split("/")
    assert node in nodes and int(pid) != driver.pid
    assert (record["steps"], record["examples"]) == (result["steps"], result["examples"])
    assert not (folder / "ray-model").exists()  # loaded back and exported into <data_dir>/models

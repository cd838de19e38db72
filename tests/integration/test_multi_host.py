"""Planner and inference replicas on separate hosts (network namespaces with their own addresses on one bridge), a
load of concurrent runs, then one planner host cut off and one inference host dropping 5% of its packets: every run
completes, once, and every tool effect happens once.

The hosts: planner-a, planner-b, inference-1, inference-2. The tools service and PostgreSQL stay on the test's side
of the bridge (PostgreSQL through a forwarder: the machine's listens on loopback only). The planners share the journal
and balance model calls over both inference hosts; clients start runs on both planners.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.conftest import clean_env, free_port, serving
from tests.integration import netns
from tests.integration.processes import ROOT
from tests.integration.test_planner_durability import NOTES_AGENT, create_agent, finished_run, note_lines, start_run
from tests.postgres import fresh_schema, needs_postgres

UNAVAILABLE = netns.unavailable()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    needs_postgres,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"multi-host lab: {UNAVAILABLE}"),
]

# `make multi-host` runs a larger load; `make test` this one.
RUNS = int(os.environ.get("MESHPILOT_MULTI_HOST_RUNS", "6"))
LOSS_PERCENT = 5
LEASE_SECONDS = 3
PLANNER_PORT = 50051
INFERENCE_PORT = 50054


class Mesh:
    """The lab's hosts, the services on them (real processes) and their logs under ``data_dir``."""

    def __init__(self, data_dir: Path, lab: netns.Lab, dsn: str) -> None:
        self.data_dir = data_dir
        self.lab = lab
        self.hosts = {name: lab.add_host(name) for name in ("planner-a", "planner-b", "inference-1", "inference-2")}
        self.tools_port = free_port()
        self.env = clean_env()
        self.env.update(
            {
                # A lab on addresses of its own: authentication (on for non-loopback binds) is tested elsewhere.
                "MESHPILOT_AUTH__ENABLED": "false",
                "MESHPILOT_PLANNER__DATABASE_URL": dsn,
                "MESHPILOT_PLANNER__LEASE_SECONDS": str(LEASE_SECONDS),
                "MESHPILOT_PLANNER__SERVER__PORT": str(PLANNER_PORT),
                "MESHPILOT_INFERENCE__SERVER__PORT": str(INFERENCE_PORT),
                "MESHPILOT_INFERENCE__REPLICAS": json.dumps(
                    [f"{self.hosts[name].address}:{INFERENCE_PORT}" for name in ("inference-1", "inference-2")]
                ),
                "MESHPILOT_TOOLS__SERVER__HOST": lab.gateway,
                "MESHPILOT_TOOLS__SERVER__PORT": str(self.tools_port),
                "MESHPILOT_TOOLS__MCP_ENDPOINT__PORT": str(free_port()),
                "MESHPILOT_APPROVALS__KEY_FILE": str(data_dir / "approval.key"),
                # What is left in flight at the end is the test's own load: no need to wait for it.
                **{f"MESHPILOT_{name}__SERVER__GRACE_SECONDS": "1" for name in ("PLANNER", "INFERENCE", "TOOLS")},
            }
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def target(self, host: str) -> str:
        port = PLANNER_PORT if host.startswith("planner") else INFERENCE_PORT
        return f"{self.hosts[host].address}:{port}"

    def start(self, key: str, service: str, host: netns.Host | None, **env: str) -> None:
        data_dir = self.data_dir / key
        data_dir.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "meshpilot", "serve", service]
        with (self.data_dir / f"{key}.log").open("ab") as log:
            self.processes[key] = subprocess.Popen(
                host.command(argv) if host else argv,
                cwd=ROOT,
                env={**self.env, "MESHPILOT_DATA_DIR": str(data_dir), **env},
                stdout=log,
                stderr=log,
            )

    def start_all(self, timeout: float = 600.0) -> None:
        self.start("tools", "tools", None)
        for name in ("inference-1", "inference-2"):
            self.start(name, "inference", self.hosts[name], MESHPILOT_INFERENCE__SERVER__HOST=self.hosts[name].address)
        for name in ("planner-a", "planner-b"):
            self.start(name, "planner", self.hosts[name], MESHPILOT_PLANNER__SERVER__HOST=self.hosts[name].address)
        targets = [f"{self.lab.gateway}:{self.tools_port}"] + [self.target(name) for name in self.hosts]
        deadline = time.monotonic() + timeout
        while not all(serving(target) for target in targets):
            exited = [key for key, process in self.processes.items() if process.poll() is not None]
            assert not exited, f"{exited} exited early; logs in {self.data_dir}"
            assert time.monotonic() < deadline, f"not all SERVING within {timeout:g}s; logs in {self.data_dir}"
            time.sleep(0.2)

    def notes(self) -> list[str]:
        return note_lines(self.data_dir / "tools")

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _through(dsn: str, host: str, port: int) -> str:
    """``dsn`` with its host and port replaced (the lab reaches PostgreSQL through the forwarder)."""
    parts = urlsplit(dsn)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    lab = netns.Lab()
    forwarder = None
    try:
        with fresh_schema() as dsn:
            upstream = urlsplit(dsn)
            forward_port = free_port()
            forwarder = netns.TcpForwarder(
                (lab.gateway, forward_port), (upstream.hostname or "127.0.0.1", upstream.port or 5432)
            )
            mesh = Mesh(tmp_path_factory.mktemp("multi-host"), lab, _through(dsn, lab.gateway, forward_port))
            try:
                mesh.start_all()
                asyncio.run(create_agent(mesh.target("planner-a"), "notes", NOTES_AGENT))
                yield mesh
            finally:
                mesh.stop_all()
    finally:
        if forwarder is not None:
            forwarder.close()
        lab.close()


async def test_runs_complete_once_with_a_planner_host_cut_off_and_an_inference_host_losing_packets(mesh) -> None:
    lossy, cut = mesh.hosts["inference-2"], mesh.hosts["planner-a"]
    lossy.drop_packets(LOSS_PERCENT)
    began = time.monotonic()
    planners = ["planner-a", "planner-b"]
    run_ids = await asyncio.gather(
        *(
            start_run(mesh.target(planners[i % 2]), f"Add the line 'entry {i + 1}' to the notebook.", "notes")
            for i in range(RUNS)
        )
    )
    # Cut planner-a off while its runs are under way (the model's first step takes a second or more here).
    await asyncio.sleep(1.5)
    cut.cut()
    cut_at = time.monotonic()
    survivor = mesh.target("planner-b")
    in_flight_on_cut = [
        run_id for run_id in run_ids[0::2] if (await _get_run(survivor, run_id)).state == planner_pb2.RUN_STATE_RUNNING
    ]
    runs = await asyncio.gather(*(finished_run(survivor, run_id, timeout=600) for run_id in run_ids))
    finished_at = time.monotonic()

    # planner-a comes back: whatever it still had in hand must not take effect again or reach the journal.
    cut.restore()
    await asyncio.sleep(3 * LEASE_SECONDS)
    after = [await _get_run(survivor, run_id) for run_id in run_ids]
    lines = mesh.notes()
    calls = {(run.run_id, e.tool_call.call_id) for run in after for e in run.events if e.HasField("tool_call")}
    print(
        f"\n{RUNS} runs over 2 planner hosts and 2 inference hosts ({LOSS_PERCENT}% packet loss on inference-2, "
        f"{lossy.dropped_packets()} packets dropped); planner-a cut off {cut_at - began:.1f} s in with "
        f"{len(in_flight_on_cut)} of its runs in flight; all ended {finished_at - began:.1f} s after the start: "
        f"{sum(r.state == planner_pb2.RUN_STATE_SUCCEEDED for r in runs)} succeeded; {len(calls)} journaled tool "
        f"calls, {len(lines)} notebook lines"
    )
    assert all(run.state == planner_pb2.RUN_STATE_SUCCEEDED for run in runs), [
        (run.run_id, run.events[-1]) for run in runs if run.state != planner_pb2.RUN_STATE_SUCCEEDED
    ]
    assert len(lines) == len(calls), f"{len(calls)} journaled calls took effect {len(lines)} times"
    for before, run in zip(runs, after, strict=True):
        sequences = [e.sequence for e in run.events]
        assert sequences == list(range(1, len(sequences) + 1)), f"run {run.run_id}: gap or duplicate in the journal"
        assert len(run.events) == len(before.events), f"run {run.run_id} changed after it ended"


async def _get_run(target: str, run_id: str) -> planner_pb2.Run:
    async with grpc.aio.insecure_channel(target) as channel:
        return await planner_pb2_grpc.PlannerServiceStub(channel).GetRun(
            planner_pb2.GetRunRequest(run_id=run_id), timeout=60, wait_for_ready=True
        )

"""The knowledge service as a real process (`meshpilot serve knowledge`): first start, reopen, drain, no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from tests.conftest import clean_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ENDLESS = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"


class KnowledgeProcess:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        env = clean_env()
        env["MESHPILOT_DATA_DIR"] = str(data_dir)
        env["MESHPILOT_KNOWLEDGE__SERVER__PORT"] = str(self.port)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshpilot", "serve", "knowledge"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = knowledge_pb2_grpc.KnowledgeServiceStub(self.channel)

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def wait_serving(self, timeout: float = 300) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"knowledge exited with {self.process.returncode}:\n{''.join(self.log)}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        pytest.fail(f"knowledge did not become SERVING within {timeout}s:\n{''.join(self.log)}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(60)
        self._reader.join(5)
        self.channel.close()
        return code


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_until_gone(text: str, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_first_start_loads_second_start_reopens(tmp_path: Path) -> None:
    first = KnowledgeProcess(tmp_path)
    first.wait_serving()
    reply = first.stub.Query(knowledge_pb2.QueryRequest(sparql="SELECT ?c WHERE { country:FR mp:capital ?c }"))
    assert [row.bindings["c"].value for row in reply.rows] == ["Paris"]
    assert first.stop() == 0
    assert any("knowledge store loaded at first start" in line for line in first.log), "".join(first.log)
    assert _wait_until_gone(str(tmp_path)) == [], "query workers outlived the service"

    second = KnowledgeProcess(tmp_path)
    second.wait_serving()
    matches = second.stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="日本"))
    assert matches.matches[0].iri == "https://meshpilot.dev/kg/country/JP"
    assert second.stop() == 0
    assert any("knowledge store reopened" in line for line in second.log), "".join(second.log)
    assert not any("loaded at first start" in line for line in second.log)


def test_workers_busy_in_a_runaway_query_die_with_a_killed_service(tmp_path: Path) -> None:
    service = KnowledgeProcess(tmp_path)
    service.wait_serving()
    pending = service.stub.Query.future(
        knowledge_pb2.QueryRequest(sparql=ENDLESS, timeout=Duration(seconds=30)), timeout=60
    )
    time.sleep(1)
    assert len(_processes_mentioning(str(tmp_path))) == 2, "both query workers are running"
    service.stop(signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        pending.result()
    assert _wait_until_gone(str(tmp_path)) == [], "a worker kept running its query after the service was killed"

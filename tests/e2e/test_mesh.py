"""End to end: the mesh started the way a user starts it (`meshpilot up`), real questions, real answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.conftest import clean_env, free_port, serving

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
KG_TOOLS = {"country_facts", "entity_facts", "sparql_query"}
SERVICES = ("planner", "tools", "knowledge", "inference")


class Mesh:
    def __init__(self, ports: dict[str, int], env: dict[str, str], data_dir: Path, output_path: Path) -> None:
        self.ports = ports
        self.env = env
        self.data_dir = data_dir
        self.output_path = output_path

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def output(self) -> str:
        """What `meshpilot up` has printed so far (stdout and stderr)."""
        return self.output_path.read_text()

    def status(self, service: str) -> dict:
        """The service's entry in <data_dir>/mesh.json, which `up` keeps current."""
        return json.loads((self.data_dir / "mesh.json").read_text())["services"][service]

    def kill_and_wait_restarted(self, service: str, timeout: float = 300) -> int:
        """SIGKILLs the service's process; returns the pid of the process `up` replaced it with, once SERVING."""
        old_pid = self.status(service)["pid"]
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.status(service)
            if entry["pid"] != old_pid and entry["state"] == "serving" and serving(self.target(service)):
                return entry["pid"]
            time.sleep(0.5)
        pytest.fail(f"{service} was not restarted within {timeout:.0f}s:\n{self.output()}")

    def ask(self, question: str, *extra: str) -> tuple[int, dict]:
        done = subprocess.run(
            [sys.executable, "-m", "meshpilot", "ask", "--json", "--planner", self.target("planner"), *extra, question],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
        )
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, f"ask --json must print exactly one line, got: {done.stdout!r} {done.stderr!r}"
        return done.returncode, json.loads(lines[0])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("mesh")
    ports = {name: free_port() for name in SERVICES}
    env = clean_env()
    env["MESHPILOT_DATA_DIR"] = str(data_dir)
    for name, port in ports.items():
        env[f"MESHPILOT_{name.upper()}__SERVER__PORT"] = str(port)
    env["MESHPILOT_TOOLS__MCP_ENDPOINT__PORT"] = str(free_port())
    env["MESHPILOT_EDGE__PORT"] = str(free_port())
    # A file, not a pipe: tests read what `up` printed while it still runs (restart messages).
    output_path = data_dir / "up.out"
    with open(output_path, "w") as output_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "meshpilot", "up"], env=env, stdout=output_file, stderr=subprocess.STDOUT
        )
    mesh = Mesh(ports, env, data_dir, output_path)
    deadline = time.monotonic() + 600
    while not all(serving(f"127.0.0.1:{p}") for p in ports.values()):
        if up.poll() is not None:
            pytest.fail(f"meshpilot up exited with {up.returncode}:\n{mesh.output()}")
        if time.monotonic() > deadline:
            up.kill()
            pytest.fail("the mesh did not become SERVING within 600s")
        time.sleep(1)
    yield mesh
    up.send_signal(signal.SIGTERM)
    up.wait(timeout=120)
    output = mesh.output()
    assert up.returncode == 0, output
    assert "stopped planner" in output and "stopped knowledge" in output
    assert not any(serving(f"127.0.0.1:{p}") for p in ports.values())
    assert not (data_dir / "mesh.json").exists()


def _tool_calls(answer: dict) -> list[dict]:
    return [step for step in answer["steps"] if step["type"] == "tool_call"]


def test_capital_of_france_is_grounded_in_the_knowledge_graph(mesh: Mesh) -> None:
    code, out = mesh.ask("What is the capital of France?")
    assert code == 0, out
    assert "Paris" in out["answer"]
    assert any(call["tool"] in KG_TOOLS for call in _tool_calls(out)), out["steps"]
    assert out["usage"]["total_tokens"] > 0
    assert out["timings"]["total_ms"] > 0


def test_currency_of_japan(mesh: Mesh) -> None:
    code, out = mesh.ask("What currency is used in Japan?")
    assert code == 0, out
    assert "yen" in out["answer"].lower()


def test_follow_up_in_a_session_refers_to_the_earlier_turn(mesh: Mesh) -> None:
    code, first = mesh.ask("What is the capital of France?")
    assert code == 0 and "Paris" in first["answer"], first
    code, second = mesh.ask("Which currency does that country use?", "--session", first["session_id"])
    assert code == 0, second
    assert second["session_id"] == first["session_id"]
    assert "euro" in second["answer"].lower()


def test_a_users_agent_from_a_yaml_file_answers_and_its_runs_are_listed(mesh: Mesh) -> None:
    def meshpilot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshpilot", *args, "--planner", mesh.target("planner")],
            capture_output=True, text=True, env=mesh.env, timeout=300, cwd=ROOT,
        )  # fmt: skip

    created = meshpilot("agents", "create", "-f", "deploy/agents/geo-guided.yaml")
    assert created.returncode == 0, created.stderr
    again = meshpilot("agents", "create", "-f", "deploy/agents/geo-guided.yaml")
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr + again.stdout

    code, out = mesh.ask("What is the capital of Peru?", "--agent", "geo-guided")
    assert code == 0, out
    assert "Lima" in out["answer"]
    assert [call["tool"] for call in _tool_calls(out)] == ["country_facts"]

    listed = meshpilot("runs", "list", "--agent", "geo-guided", "--json")
    assert listed.returncode == 0, listed.stderr
    assert out["run_id"] in listed.stdout


def test_unknown_session_is_not_found(mesh: Mesh) -> None:
    code, out = mesh.ask("What is the capital of Spain?", "--session", "no-such-session")
    assert code == 1
    assert out["error"]["code"] == "NOT_FOUND"


def test_bad_input_gets_clear_errors_and_every_service_staysserving(mesh: Mesh) -> None:
    cases = []
    with grpc.insecure_channel(mesh.target("planner")) as channel:
        stream = planner_pb2_grpc.PlannerServiceStub(channel).Run(planner_pb2.RunRequest(task="   "))
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        cases.append((caught.value, grpc.StatusCode.INVALID_ARGUMENT, "task"))
    with grpc.insecure_channel(mesh.target("tools")) as channel:
        stub = tools_pb2_grpc.ToolsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExecuteTool(tools_pb2.ExecuteToolRequest(call_id="1", name="no_such_tool"))
        cases.append((caught.value, grpc.StatusCode.NOT_FOUND, "no_such_tool"))
        request = tools_pb2.ExecuteToolRequest(call_id="2", name="calculator")
        request.arguments.update({"expression": 42})
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExecuteTool(request)
        cases.append((caught.value, grpc.StatusCode.INVALID_ARGUMENT, "expression"))
    with grpc.insecure_channel(mesh.target("knowledge")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            knowledge_pb2_grpc.KnowledgeServiceStub(channel).Query(
                knowledge_pb2.QueryRequest(sparql="SELEC ?x WHERE {")
            )
        cases.append((caught.value, grpc.StatusCode.INVALID_ARGUMENT, ""))
    with grpc.insecure_channel(mesh.target("inference")) as channel:
        stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(prompt="word " * 20_000, max_tokens=8)
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        cases.append((caught.value, grpc.StatusCode.INVALID_ARGUMENT, "context"))
    for error, code, needle in cases:
        assert error.code() == code, error
        assert needle in error.details()
    assert all(serving(mesh.target(name)) for name in SERVICES)


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_buf_curl_lists_and_calls_through_reflection(mesh: Mesh) -> None:
    assert BUF.exists(), "buf is installed by `make buf` (npm); make test depends on it"
    expected = {
        "planner": "meshpilot.planner.v1.PlannerService/Run",
        "tools": "meshpilot.tools.v1.ToolsService/ExecuteTool",
        "knowledge": "meshpilot.knowledge.v1.KnowledgeService/LookupEntities",
        "inference": "meshpilot.inference.v1.InferenceService/Generate",
    }
    for service, method in expected.items():
        listed = _buf("--list-methods", f"http://{mesh.target(service)}")
        assert listed.returncode == 0, listed.stderr
        assert method in listed.stdout.split()
    called = _buf(
        "-d",
        '{"label": "japan", "type": "Country"}',
        f"http://{mesh.target('knowledge')}/meshpilot.knowledge.v1.KnowledgeService/LookupEntities",
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["matches"][0]["label"] == "Japan"


# The tests below kill services: they come last, and each leaves the mesh SERVING for the next.


def test_killed_services_are_restarted_and_the_mesh_answers_again(mesh: Mesh) -> None:
    for service in ("tools", "inference"):
        old_pid = mesh.status(service)["pid"]
        new_pid = mesh.kill_and_wait_restarted(service)
        assert new_pid != old_pid
        output = mesh.output()
        assert f"{service} exited with -9 (SIGKILL); restarting in" in output
        assert f"{service} is SERVING again (pid {new_pid})" in output
    code, out = mesh.ask("What is the capital of France?")
    assert code == 0, out
    assert "Paris" in out["answer"]


@pytest.mark.parametrize(("service", "when"), [("inference", "step_started"), ("tools", "tool_call")])
def test_runs_in_flight_survive_a_killed_service(mesh: Mesh, service: str, when: str) -> None:
    """SIGKILL a dependency mid-run (inference as the model is asked, tools as the call goes out): `up` restarts it and
    the planner retries within the run's deadline, so the run still answers."""
    request = planner_pb2.RunRequest(task="What is the capital of France?")
    events = []
    with grpc.insecure_channel(mesh.target("planner")) as channel:
        stream = planner_pb2_grpc.PlannerServiceStub(channel).Run(request, timeout=600)
        for event in stream:
            events.append(event)
            if event.WhichOneof("event") == when and sum(e.WhichOneof("event") == when for e in events) == 1:
                mesh.kill_and_wait_restarted(service)
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "final_answer", f"{kinds}: {events[-1]}"
    assert "Paris" in events[-1].final_answer.answer


async def test_the_tools_service_serves_its_tools_over_mcp(mesh: Mesh) -> None:
    """Any MCP client reaches MeshPilot's tools: the SDK's client against the tools service that `up` started."""
    url = f"http://127.0.0.1:{mesh.env['MESHPILOT_TOOLS__MCP_ENDPOINT__PORT']}/mcp"
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        listed = await session.list_tools()
        result = await session.call_tool("calculator", {"expression": "6 * 7"})
    assert {"calculator", "country_facts", "current_time"} <= {tool.name for tool in listed.tools}
    assert not result.is_error and result.structured_content == {"result": 42}

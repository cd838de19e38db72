"""`meshpilot train` end to end on the real mesh, in a tiny configuration: 3 one-hop train tasks x 2 sampled attempts
through the four services as processes on the default model, 2 LoRA steps on the verified rollouts, the model exported
and registered (ListModels shows it), 3 test tasks scored on it, and an agent on it answering once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc
from tests.integration.processes import ROOT, ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICES = ("knowledge", "inference", "tools", "planner")
TINY = ["--name", "e2e", "--category", "one_hop", "--limit", "3", "--eval-limit", "3", "--attempts", "2"]
TINY += ["--max-steps", "2", "--grad-accumulation", "1", "--save-steps", "1", "--no-baseline", "--json"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    processes = ServiceProcesses(tmp_path_factory.mktemp("mesh"), SERVICES)
    try:
        processes.start_all()
        yield processes
    finally:
        processes.stop_all()


def test_a_tiny_loop_trains_registers_and_serves_a_model(mesh: ServiceProcesses) -> None:
    command = [sys.executable, "-m", "meshpilot", "train", *TINY, "--planner", mesh.target("planner")]
    done = subprocess.run(command, cwd=ROOT, env=mesh.env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    (result,) = json.loads(done.stdout)
    assert result["model"] == "e2e-r1" and result["rollouts"] == 6
    assert result["selected"] >= 1 and result["examples"] >= 2 and result["steps"] == 2  # a lookup and an answer
    assert result["eval"]["overall"]["tasks"] == 3 and result["eval"]["agent"] == "e2e-r1"
    folder = mesh.data_dir / "train" / "e2e"
    assert len((folder / "round-1" / "rollouts.jsonl").read_text().splitlines()) == 6
    assert (mesh.data_dir / "models" / "e2e-r1" / "config.json").is_file()

    with grpc.insecure_channel(mesh.target("inference")) as channel:
        models = inference_pb2_grpc.InferenceServiceStub(channel).ListModels(inference_pb2.ListModelsRequest())
    assert {m.id for m in models.models} == {"smollm2-135m-instruct", "e2e-r1"}

    with grpc.insecure_channel(mesh.target("planner")) as channel:
        agent = agents_pb2_grpc.AgentServiceStub(channel).GetAgent(agents_pb2.GetAgentRequest(name="default-on-e2e-r1"))
        assert agent.spec.model == "e2e-r1"
        request = planner_pb2.RunRequest(task="What is the capital of France?", agent="default-on-e2e-r1")
        events = list(planner_pb2_grpc.PlannerServiceStub(channel).Run(request, timeout=300))
    assert events[-1].WhichOneof("event") == "final_answer", events[-1]
    assert any(e.WhichOneof("event") == "model_output" for e in events)

    # Again, for people (no --json): resumed, every phase's result was there, so it only reports.
    command.remove("--json")
    again = subprocess.run(command, cwd=ROOT, env=mesh.env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| **overall** | 3 |" in again.stdout and "e2e-r1: completed" in again.stdout
    summary = f"round 1: e2e-r1 from {result['selected']} of 6 rollouts ({result['rollouts_passed']} passed)"
    assert summary in again.stderr and "report.md" in again.stderr
    assert len((folder / "round-1" / "rollouts.jsonl").read_text().splitlines()) == 6
    assert json.loads((folder / "rounds.json").read_text()) == [result]

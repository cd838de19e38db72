"""`meshpilot train` end to end on the real mesh, in a tiny configuration: 3 one-hop train tasks x 2 sampled attempts
through the four services as processes on the default model, 2 LoRA steps on the verified rollouts, the model exported
and registered (ListModels shows it), 3 test tasks scored on it, and an agent on it answering once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.integration.processes import ROOT, ServiceProcesses
from tests.integration.tiny_train import assert_round_trained, four_services, run_train, train_command

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    yield from four_services(tmp_path_factory)


def test_a_tiny_loop_trains_registers_and_serves_a_model(mesh: ServiceProcesses) -> None:
    done = run_train(mesh)
    assert done.returncode == 0, done.stderr[-3000:]

    (result,) = json.loads(done.stdout)
    assert_round_trained(mesh, result)
    folder = mesh.data_dir / "train" / "e2e"

    with grpc.insecure_channel(mesh.target("planner")) as channel:
        request = planner_pb2.RunRequest(task="What is the capital of France?", agent="default-on-e2e-r1")
        events = list(planner_pb2_grpc.PlannerServiceStub(channel).Run(request, timeout=300))
    assert events[-1].WhichOneof("event") == "final_answer", events[-1]
    assert any(e.WhichOneof("event") == "model_output" for e in events)

    # Again, for people (no --json): resumed, every phase's result was there, so it only reports.
    command = train_command(mesh)
    command.remove("--json")
    again = subprocess.run(command, cwd=ROOT, env=mesh.env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| **overall** | 3 |" in again.stdout and "e2e-r1: completed" in again.stdout
    summary = f"round 1: e2e-r1 from {result['selected']} of 6 rollouts ({result['rollouts_passed']} passed)"
    assert summary in again.stderr and "report.md" in again.stderr
    assert len((folder / "round-1" / "rollouts.jsonl").read_text().splitlines()) == 6
    assert json.loads((folder / "rounds.json").read_text()) == [result]

"""The tiny configuration of `meshpilot train` on a real mesh, shared by the tests that run it (locally and on a Ray
cluster): the four services as processes, the command's arguments, and what a finished round must show."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc
from tests.integration.processes import ROOT, ServiceProcesses

SERVICES = ("knowledge", "inference", "tools", "planner")
# 3 one-hop train tasks x 2 attempts, 2 LoRA steps, 3 test tasks, no baseline.
TINY = ["--category", "one_hop", "--limit", "3", "--eval-limit", "3", "--attempts", "2"]
TINY += ["--max-steps", "2", "--grad-accumulation", "1", "--save-steps", "1", "--no-baseline", "--json"]
ROLLOUTS = 6
TEST_TASKS = 3


def four_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    """The four services on the default model, started once per module (use as a module fixture's body); jobs on one
    mesh each have a name of their own, so their rounds and models do not meet."""
    processes = ServiceProcesses(tmp_path_factory.mktemp("mesh"), SERVICES)
    try:
        processes.start_all()
        yield processes
    finally:
        processes.stop_all()


def train_command(mesh: ServiceProcesses, *args: str, name: str = "e2e") -> list[str]:
    command = [sys.executable, "-m", "meshpilot", "train", "--name", name, *TINY, *args]
    return [*command, "--planner", mesh.target("planner")]


def run_train(mesh: ServiceProcesses, *args: str, name: str = "e2e") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_command(mesh, *args, name=name), cwd=ROOT, env=mesh.env, capture_output=True, text=True, timeout=900
    )


def assert_round_trained(mesh: ServiceProcesses, result: dict[str, Any], job: str = "e2e") -> None:
    """Round 1 of the tiny job: every rollout recorded, a model trained on the verified ones, exported and registered
    with the inference service (ListModels shows it), the test split scored by an agent on it."""
    model = f"{job}-r1"
    assert result["model"] == model and result["rollouts"] == ROLLOUTS
    assert result["selected"] >= 1 and result["examples"] >= 2 and result["steps"] == 2  # a lookup and an answer
    assert result["eval"]["overall"]["tasks"] == TEST_TASKS and result["eval"]["agent"] == model
    folder = mesh.data_dir / "train" / job
    assert len((folder / "round-1" / "rollouts.jsonl").read_text().splitlines()) == ROLLOUTS
    assert (mesh.data_dir / "models" / model / "config.json").is_file()
    with grpc.insecure_channel(mesh.target("inference")) as channel:
        models = inference_pb2_grpc.InferenceServiceStub(channel).ListModels(inference_pb2.ListModelsRequest())
    assert {"smollm2-135m-instruct", model} <= {m.id for m in models.models}
    with grpc.insecure_channel(mesh.target("planner")) as channel:
        agent = agents_pb2_grpc.AgentServiceStub(channel).GetAgent(
            agents_pb2.GetAgentRequest(name=f"default-on-{model}")
        )
    assert agent.spec.model == model


def read_lines(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]

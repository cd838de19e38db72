"""`meshpilot train` end to end on the real mesh, in a tiny configuration: 3 one-hop train tasks x 2 sampled attempts
through the four services as processes on the default model, 2 LoRA steps on the verified rollouts, the model exported
and registered (ListModels shows it), 3 test tasks scored on it, and an agent on it answering once.

Then the same job with `--ray` on a real local Ray cluster (a head and a worker node, each a process of the test, on
the same mesh): its rollouts and evaluation runs are made by Ray tasks on both nodes, its training runs under Ray
Train's TorchTrainer in a cluster worker, and the model comes back registered. The cluster is stopped at the end, even
on failure, and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.integration.processes import ROOT, ServiceProcesses
from tests.integration.ray_cluster import LocalRayCluster
from tests.integration.tiny_train import assert_round_trained, four_services, read_lines, run_train, train_command

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


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """Started in the background (it mostly waits); the test waits for it with ``ready``."""
    ray_cluster = LocalRayCluster()
    try:
        ray_cluster.start_in_background()
        yield ray_cluster
    finally:
        left = ray_cluster.stop()
    assert not left, f"processes of the Ray cluster still alive after it was stopped: {left}"


def test_a_tiny_loop_runs_its_rollouts_evaluation_and_training_on_the_cluster(
    cluster: LocalRayCluster, mesh: ServiceProcesses
) -> None:
    cluster.ready()
    nodes = cluster.node_ids()
    assert len(nodes) == 2, cluster.processes()
    driver = subprocess.Popen(
        train_command(mesh, "--ray", cluster.address, "--ray-workers", "1", name="ray"),
        cwd=ROOT, env=mesh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stdout, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, stderr[-3000:]

    (result,) = json.loads(stdout)
    assert_round_trained(mesh, result, job="ray")
    folder = mesh.data_dir / "train" / "ray" / "round-1"
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

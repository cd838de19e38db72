"""`meshpilot eval` end to end: a tiny suite (knowledge-graph questions and one BFCL function call) through the four
services as real processes on the default model, resumed on a re-run, and a run rated with `meshpilot runs rate`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.eval import load_suite
from tests.integration.processes import ROOT, ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICES = ("knowledge", "inference", "tools", "planner")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    processes = ServiceProcesses(tmp_path_factory.mktemp("mesh"), SERVICES)
    try:
        processes.start_all()
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two one-hop questions and an unanswerable one from kg-test, and BFCL's first simple task."""
    tasks = [t for t in load_suite("kg-test").tasks if t.id in ("one_hop-capital-AI", "one_hop-currency-PT")]
    tasks += [t for t in load_suite("kg-test").tasks if t.category == "unanswerable"][:1]
    tasks += [t for t in load_suite("bfcl-simple").tasks if t.id == "simple_python_0"]
    path = tmp_path_factory.mktemp("suite") / "tiny.jsonl"
    path.write_text("".join(json.dumps(task.to_json(), ensure_ascii=False) + "\n" for task in tasks))
    return path


def meshpilot(mesh: ServiceProcesses, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "meshpilot", *args, "--planner", mesh.target("planner")]
    return subprocess.run(command, cwd=ROOT, env=mesh.env, capture_output=True, text=True, timeout=900)


def test_a_tiny_suite_is_evaluated_resumed_and_a_run_rated(mesh: ServiceProcesses, suite: Path) -> None:
    out = mesh.data_dir / "eval"
    done = meshpilot(mesh, "eval", str(suite), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr

    (report,) = json.loads(done.stdout)
    assert report["overall"]["tasks"] == 4
    assert set(report["categories"]) == {"one_hop", "unanswerable", "bfcl_simple"}
    results = {r["task_id"]: r for r in map(json.loads, (out / "default.results.jsonl").read_text().splitlines())}
    assert set(results) == {task.id for task in load_suite(suite).tasks}
    capital = results["one_hop-capital-AI"]
    assert capital["passed"], capital  # "What is the capital of Anguilla?": The Valley, as the graph says
    assert capital["steps"] >= 2 and capital["total_tokens"] > 0 and capital["tool_calls"] >= 1
    bfcl = results["simple_python_0"]
    # The BFCL task's agent was made with its function, served by the suite's MCP source, and the model called it.
    assert bfcl["tool_calls"] >= 1 and not bfcl["error"], bfcl
    assert {path.name for path in out.iterdir()} >= {"report.json", "report.md", "report.png"}

    again = meshpilot(mesh, "eval", str(suite), "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert len((out / "default.results.jsonl").read_text().splitlines()) == 4  # nothing ran twice

    rated = meshpilot(mesh, "runs", "rate", capital["run_id"], "5", "--comment", "right")
    assert rated.returncode == 0, rated.stderr
    with grpc.insecure_channel(mesh.target("planner")) as channel:
        run = planner_pb2_grpc.PlannerServiceStub(channel).GetRun(planner_pb2.GetRunRequest(run_id=capital["run_id"]))
    assert (run.feedback.score, run.feedback.comment) == (5, "right")

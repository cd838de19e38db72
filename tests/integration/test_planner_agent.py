"""The planner's agent on the real default model, through real knowledge, inference, tools and planner processes.

The acceptance questions are asserted exactly; the evaluation set (agent_questions.json) is scored and reported.
Run the scorer by hand against a running mesh with
``python -m tests.integration.test_planner_agent --planner 127.0.0.1:50051``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = json.loads((Path(__file__).parent / "agent_questions.json").read_text())
KG_TOOLS = {"country_facts", "entity_facts", "sparql_query"}
SERVICES = ("knowledge", "inference", "tools", "planner")


@dataclass
class Outcome:
    """One question's run: the answer (or the error), the tools called and the wall time."""

    question: dict
    answer: str = ""
    error: str = ""
    tools: list[str] = field(default_factory=list)
    seconds: float = 0.0
    session_id: str = ""

    @property
    def correct(self) -> bool:
        return matches(self.answer, self.question["expect"])


def matches(answer: str, expected: list[str]) -> bool:
    """Whether the answer names any expected text as a whole word, ignoring case ("Euro" is not in "Europe")."""
    return any(re.search(rf"(?<!\w){re.escape(text)}(?!\w)", answer, re.IGNORECASE) for text in expected)


async def ask(stub: planner_pb2_grpc.PlannerServiceStub, question: dict, session_id: str = "") -> Outcome:
    outcome = Outcome(question)
    started = time.monotonic()
    async for event in stub.Run(planner_pb2.RunRequest(task=question["task"], session_id=session_id)):
        outcome.session_id = event.session_id
        kind = event.WhichOneof("event")
        if kind == "tool_call":
            outcome.tools.append(event.tool_call.tool)
        elif kind == "final_answer":
            outcome.answer = event.final_answer.answer
        elif kind == "error":
            outcome.error = f"{event.error.code}: {event.error.message}"
    outcome.seconds = time.monotonic() - started
    return outcome


async def ask_all(target: str, questions: list[dict]) -> list[Outcome]:
    """Runs the questions in order; those sharing a "session" label run in one planner session."""
    sessions: dict[str, str] = {}
    outcomes = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        for question in questions:
            label = question.get("session")
            outcome = await ask(stub, question, sessions.get(label, "") if label else "")
            if label:
                sessions[label] = outcome.session_id
            outcomes.append(outcome)
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    lines = [
        f"{'ok ' if o.correct else 'BAD'} {o.seconds:5.1f}s {o.question['task']!r} -> {o.answer or o.error!r} "
        f"(tools: {', '.join(o.tools) or 'none'})"
        for o in outcomes
    ]
    seconds = [o.seconds for o in outcomes]
    lines.append(
        f"score {sum(o.correct for o in outcomes)}/{len(outcomes)}; run time median {statistics.median(seconds):.1f}s, "
        f"max {max(seconds):.1f}s"
    )
    return "\n".join(lines)


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def planner_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The four services as real processes (`meshpilot serve <name>`) on free ports; the planner's address."""
    data_dir = tmp_path_factory.mktemp("mesh")
    ports = {name: free_port() for name in SERVICES}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_")}
    env["MESHPILOT_DATA_DIR"] = str(data_dir)
    env.update({f"MESHPILOT_{name.upper()}__SERVER__PORT": str(port) for name, port in ports.items()})
    processes = {}
    for name in SERVICES:
        with (data_dir / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "meshpilot", "serve", name], cwd=ROOT, env=env, stdout=log, stderr=log
            )
    try:
        deadline = time.monotonic() + 600
        while not all(_serving(f"127.0.0.1:{port}") for port in ports.values()):
            exited = [name for name, process in processes.items() if process.poll() is not None]
            assert not exited, f"{exited} exited early; logs in {data_dir}"
            assert time.monotonic() < deadline, f"the services were not SERVING within 600s; logs in {data_dir}"
            time.sleep(1)
        yield f"127.0.0.1:{ports['planner']}"
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    assert processes["planner"].returncode == 0, f"the planner did not drain cleanly; see {data_dir}/planner.log"


async def test_acceptance_questions(planner_target: str) -> None:
    france, follow_up, japan = await ask_all(planner_target, QUESTIONS["acceptance"])
    print("\n" + report([france, follow_up, japan]))

    assert "Paris" in france.answer, france
    assert KG_TOOLS & set(france.tools), france
    assert follow_up.session_id == france.session_id
    assert "Euro" in follow_up.answer and "Europe" not in follow_up.answer, follow_up
    assert "yen" in japan.answer.lower(), japan


async def test_evaluation_questions_score(planner_target: str) -> None:
    outcomes = await ask_all(planner_target, QUESTIONS["questions"])
    print("\n" + report(outcomes))

    assert all(not o.error or o.error.startswith("RESOURCE_EXHAUSTED") for o in outcomes), report(outcomes)
    # Measured 19 of 20 when this set was written; a floor well below that catches a broken prompt or policy.
    assert sum(o.correct for o in outcomes) >= 15, report(outcomes)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Score the planner on tests/integration/agent_questions.json.")
    parser.add_argument("--planner", default="127.0.0.1:50051", help="planner address HOST:PORT")
    args = parser.parse_args()
    outcomes = asyncio.run(ask_all(args.planner, QUESTIONS["acceptance"] + QUESTIONS["questions"]))
    print(report(outcomes))


if __name__ == "__main__":
    _main()

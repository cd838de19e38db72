"""Running a suite: trajectories from run events, bounded concurrency, resuming, transport failures left for a re-run,
the reports (JSON, markdown, PNG), and `meshpilot eval` / `meshpilot runs rate` against an in-process fake planner."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from typer.testing import CliRunner

from meshpilot.cli import app
from meshpilot.common.v1 import common_pb2
from meshpilot.planner.v1 import planner_pb2
from services.eval import (
    Contains,
    EvalTask,
    Numeric,
    ResultLine,
    RunUnavailable,
    Suite,
    ToolCallRecord,
    Trajectory,
    evaluate,
    render_markdown,
    summarize,
    trajectory_of,
    write_reports,
)
from services.eval.report import percentile
from tests.unit.cli_fakes import FakeMesh, FakePlanner

FRANCE = EvalTask("capital-FR", "What is the capital of France?", (Contains(("Paris",)),), "one_hop")
JAPAN = EvalTask("capital-JP", "What is the capital of Japan?", (Contains(("Tokyo",)),), "one_hop")
COUNT = EvalTask("count-EU", "How many?", (Numeric(3.0),), "counting")
SUITE = Suite("tiny", (FRANCE, JAPAN, COUNT))
ANSWERS = {FRANCE.task: "The capital of France is Paris.", JAPAN.task: "It is Kyoto.", COUNT.task: "There are 3."}


class ScriptedRunner:
    """Answers from ANSWERS, one tool call per run; counts runs in flight; ``unavailable`` tasks raise."""

    def __init__(self, unavailable: set[str] = frozenset()) -> None:
        self.unavailable = set(unavailable)
        self.asked: list[tuple[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def run(self, task: str, *, agent: str, timeout_s: float) -> Trajectory:
        self.asked.append((task, agent))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if task in self.unavailable:
            raise RunUnavailable("UNAVAILABLE: the planner is down")
        bad = ToolCallRecord("country_facts", {"nom": "x"}, "invalid arguments for tool 'country_facts'", rejected=True)
        calls = (ToolCallRecord("country_facts", {"name": "France"}), bad) if task == COUNT.task else ()
        return Trajectory(ANSWERS[task], calls, steps=2, total_tokens=100, latency_s=len(self.asked), run_id=task[:5])


async def test_every_task_is_judged_and_recorded_with_at_most_the_concurrency_in_flight(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    results = await evaluate(SUITE, runner, tmp_path / "r.jsonl", agent="geo", concurrency=2)

    assert {task: passed for task, passed in ((k, v.passed) for k, v in results.items())} == {
        "capital-FR": True, "capital-JP": False, "count-EU": True
    }  # fmt: skip
    assert results["capital-JP"].failed_checks == ["the answer does not contain 'Tokyo'"]
    assert runner.most_in_flight == 2
    assert {agent for _, agent in runner.asked} == {"geo"}
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert sorted(ResultLine.from_json(line).task_id for line in lines) == ["capital-FR", "capital-JP", "count-EU"]


async def test_a_rerun_skips_finished_tasks_and_retries_those_the_planner_could_not_run(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first = await evaluate(SUITE, ScriptedRunner(unavailable={JAPAN.task}), path)
    assert sorted(first) == ["capital-FR", "count-EU"]
    with path.open("a") as torn:
        torn.write('{"task_id": "capital-JP", "passed": tr')  # a process killed mid-write

    again = ScriptedRunner()
    second = await evaluate(SUITE, again, path)

    assert again.asked == [(JAPAN.task, "")]
    assert sorted(second) == ["capital-FR", "capital-JP", "count-EU"]


async def test_a_tasks_own_agent_wins_and_concurrency_below_one_is_refused(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    own = EvalTask(FRANCE.id, FRANCE.task, FRANCE.checks, agent="bfcl-1")
    await evaluate(Suite("s", (own,)), runner, tmp_path / "r.jsonl", agent="geo")
    assert runner.asked == [(FRANCE.task, "bfcl-1")]
    with pytest.raises(ValueError, match="concurrency is 0; use 1 or more"):
        await evaluate(SUITE, runner, tmp_path / "r.jsonl", concurrency=0)


def struct(**fields) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


def events(*kinds: dict) -> list[planner_pb2.RunEvent]:
    return [planner_pb2.RunEvent(run_id="run-1", sequence=n, **kind) for n, kind in enumerate(kinds, start=1)]


def test_a_trajectory_is_read_from_the_runs_events_and_refused_calls_are_told_from_failed_ones() -> None:
    refused = "invalid arguments for tool 'country_facts': $: 'name' is a required property"
    run = events(
        {"step_started": planner_pb2.StepStarted(step=1)},
        {"tool_call": planner_pb2.ToolCall(step=1, call_id="c0", tool="country_facts", arguments=struct(nom="x"))},
        {"tool_result": planner_pb2.ToolResult(step=1, call_id="c0", tool="country_facts", error=refused)},
        {
            "tool_call": planner_pb2.ToolCall(
                step=1, call_id="c1", tool="country_facts", arguments=struct(name="France")
            )
        },
        {"tool_result": planner_pb2.ToolResult(step=1, call_id="c1", tool="country_facts", error="no such country")},
        {"step_started": planner_pb2.StepStarted(step=2)},
        {"final_answer": planner_pb2.FinalAnswer(answer="Paris.", usage=common_pb2.Usage(total_tokens=321))},
    )
    assert trajectory_of(run, 1.5) == Trajectory(
        "Paris.",
        (
            ToolCallRecord("country_facts", {"nom": "x"}, refused, rejected=True),
            ToolCallRecord("country_facts", {"name": "France"}, "no such country"),
        ),
        2, 321, 1.5, "", "run-1",
    )  # fmt: skip
    failed = trajectory_of(events({"error": planner_pb2.RunError(code="RESOURCE_EXHAUSTED", message="max_steps")}), 0)
    assert failed.error == "RESOURCE_EXHAUSTED: max_steps"


def test_percentiles_by_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile([], 50), percentile([7.0], 95)) == (
        50.0, 95.0, 0.0, 7.0
    )  # fmt: skip


async def test_reports_side_by_side_as_json_markdown_and_png(tmp_path: Path) -> None:
    geo = await evaluate(SUITE, ScriptedRunner(), tmp_path / "geo.jsonl", agent="geo")
    react = await evaluate(Suite("tiny", (FRANCE, JAPAN)), ScriptedRunner(), tmp_path / "react.jsonl", agent="react")
    reports = [summarize("tiny", "geo", geo.values()), summarize("tiny", "react", react.values())]

    paths = write_reports(reports, tmp_path / "out")

    data = json.loads(paths["json"].read_text())
    assert [r["agent"] for r in data] == ["geo", "react"]
    assert data[0]["overall"]["completion_rate"] == round(2 / 3, 4)
    assert data[0]["categories"]["counting"]["valid_tool_call_rate"] == 0.5
    assert data[1]["categories"]["one_hop"]["valid_tool_call_rate"] == 1.0  # no calls made: none invalid
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["markdown"].read_text()
    assert "| **overall** | 3 | 67% (2/3) | 50% (1/2) |" in table
    assert "| counting | 1 | 100% (1/1) | – |" in table
    assert render_markdown(reports) == table


def test_reports_of_several_suites_are_a_table_each_in_the_order_the_suites_come(tmp_path: Path) -> None:
    def result(task_id: str, category: str, passed: bool) -> ResultLine:
        return ResultLine(task_id, category, passed, float(passed), "", 1, 1, 2, 100, 1.0, "", "run", [])

    kg = [result("capital-FR", "one_hop", True), result("capital-JP", "one_hop", False)]
    bfcl = [result("simple_python_0", "bfcl_simple", False)]
    trained = [result("simple_python_0", "bfcl_simple", True)]
    reports = [
        summarize("kg-test", "baseline", kg), summarize("bfcl-simple", "baseline", bfcl),
        summarize("kg-test", "t-r1", kg), summarize("bfcl-simple", "t-r1", trained),
    ]  # fmt: skip

    paths = write_reports(reports, tmp_path)

    first, second = paths["markdown"].read_text().split("\nSuite ")
    assert first.startswith("Suite `kg-test`") and second.startswith("`bfcl-simple`")
    assert "| **overall** | 2 | 50% (1/2) | 50% (1/2) |" in first and "bfcl_simple" not in first
    assert "| bfcl_simple | 1 | 0% (0/1) | 100% (1/1) |" in second and "one_hop" not in second
    assert "baseline: completed | t-r1: completed" in second
    assert [(r["suite"], r["agent"]) for r in json.loads(paths["json"].read_text())] == [
        ("kg-test", "baseline"), ("bfcl-simple", "baseline"), ("kg-test", "t-r1"), ("bfcl-simple", "t-r1"),
    ]  # fmt: skip
    chart = paths["chart"].read_bytes()
    assert chart[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(chart[20:24], "big") == 900  # a panel (450 px) each
    assert render_markdown([]) == "No results.\n"


# The CLI against an in-process fake planner


class AnsweringPlanner(FakePlanner):
    """Answers each task from ANSWERS; RateRun records the rating."""

    async def Run(self, request, context):
        self.requests.append(("Run", request))
        answer = ANSWERS.get(request.task, "I could not find the answer.")
        yield planner_pb2.RunEvent(run_id="run-1", sequence=1, step_started=planner_pb2.StepStarted(step=1))
        yield planner_pb2.RunEvent(run_id="run-1", sequence=2, final_answer=planner_pb2.FinalAnswer(answer=answer))

    async def RateRun(self, request, context):
        self.requests.append(("RateRun", request))
        if self.error is not None:
            await context.abort(*self.error)
        return planner_pb2.Run(run_id=request.run_id, feedback=planner_pb2.RunFeedback(score=request.score))


@pytest.fixture
def mesh():
    with FakeMesh(AnsweringPlanner()) as running:
        yield running


def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(task.to_json()) for task in SUITE.tasks) + "\n")
    return path


def test_eval_runs_each_agent_writes_the_reports_and_resumes(mesh, tmp_path: Path) -> None:
    args = ["eval", str(suite_file(tmp_path)), "--agent", "geo", "--agent", "react", "--out", str(tmp_path / "out")]
    done = CliRunner().invoke(app, [*args, "--planner", mesh.target])

    assert done.exit_code == 0, done.output
    assert "| **overall** | 3 | 67% (2/3) | 67% (2/3) |" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "geo.results.jsonl", "react.results.jsonl", "report.json", "report.md", "report.png"
    ]  # fmt: skip
    assert sorted(r.agent for r in mesh.planner.calls("Run")) == ["geo"] * 3 + ["react"] * 3

    again = CliRunner().invoke(app, [*args, "--json", "--planner", mesh.target])
    assert again.exit_code == 0, again.output
    assert len(mesh.planner.calls("Run")) == 6  # everything was finished: nothing ran again
    assert [r["overall"]["completed"] for r in json.loads(again.stdout)] == [2, 2]


def test_eval_of_a_bad_suite_exits_2_naming_the_line_and_runs_nothing(mesh, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FRANCE.to_json()) + "\n{oops\n")
    done = CliRunner().invoke(app, ["eval", str(path), "--planner", mesh.target])
    assert done.exit_code == 2
    assert f"error: {path}, line 2: not valid JSON" in done.output
    assert mesh.planner.calls("Run") == []


def test_eval_with_no_task_in_the_category_exits_2(mesh, tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["eval", str(suite_file(tmp_path)), "--category", "nope", "--planner", mesh.target])
    assert done.exit_code == 2
    assert "has no tasks in the categories nope" in done.output


def test_eval_of_one_split_runs_only_its_tasks_and_a_bad_split_exits_2(mesh, tmp_path: Path) -> None:
    path = tmp_path / "split.jsonl"
    tasks = (dataclasses.replace(FRANCE, split="train"), JAPAN, COUNT)
    path.write_text("\n".join(json.dumps(task.to_json()) for task in tasks) + "\n")

    done = CliRunner().invoke(app, ["eval", str(path), "--split", "test", "--out", str(tmp_path / "out"),
                                    "--planner", mesh.target])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert sorted(r.task for r in mesh.planner.calls("Run")) == sorted([JAPAN.task, COUNT.task])

    bad = CliRunner().invoke(app, ["eval", str(path), "--split", "tests", "--planner", mesh.target])
    assert bad.exit_code == 2 and "--split 'tests': use one of train, test" in bad.output
    empty = CliRunner().invoke(app, ["eval", str(path), "--split", "train", "--category", "counting",
                                     "--planner", mesh.target])  # fmt: skip
    assert empty.exit_code == 2 and "has no tasks in the categories counting and the train split" in empty.output
    assert len(mesh.planner.calls("Run")) == 2  # neither bad call ran anything


def test_eval_without_a_planner_exits_1_and_says_to_run_again(tmp_path: Path) -> None:
    from tests.conftest import free_port

    args = ["eval", str(suite_file(tmp_path)), "--out", str(tmp_path / "out"), "--planner", f"127.0.0.1:{free_port()}"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 1
    assert "some tasks could not be run for default (planner unavailable); run again to resume" in done.output


def test_runs_rate_sends_the_score_and_comment(mesh) -> None:
    done = CliRunner().invoke(app, ["runs", "rate", "run-1", "4", "--comment", "close", "--planner", mesh.target])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == "rated run run-1: 4/5"
    (request,) = mesh.planner.calls("RateRun")
    assert (request.run_id, request.score, request.comment) == ("run-1", 4, "close")


@pytest.mark.parametrize("score", ["0", "6", "five"])
def test_runs_rate_refuses_a_score_off_the_scale_without_calling(mesh, score: str) -> None:
    done = CliRunner().invoke(app, ["runs", "rate", "run-1", score, "--planner", mesh.target])
    assert done.exit_code == 2
    assert mesh.planner.calls("RateRun") == []


def test_runs_rate_of_an_unknown_run_exits_1_with_the_code(mesh) -> None:
    mesh.planner.error = (grpc.StatusCode.NOT_FOUND, "run 'nope' does not exist")
    done = CliRunner().invoke(app, ["runs", "rate", "nope", "3", "--planner", mesh.target])
    assert done.exit_code == 1
    assert "error: NOT_FOUND: run 'nope' does not exist" in done.output


def test_eval_with_models_runs_each_agent_on_each_model_through_a_kept_variant(mesh, tmp_path: Path) -> None:
    from meshpilot.planner.v1 import agents_pb2

    mesh.agents._store("geo", agents_pb2.AgentSpec(instructions="Answer about countries.", tools=["country_facts"]))
    args = ["eval", str(suite_file(tmp_path)), "--agent", "geo", "--model", "SmolLM2-135M", "--model", "Tiny 2"]
    args += ["--out", str(tmp_path / "out"), "--planner", mesh.target]

    done = CliRunner().invoke(app, args)
    again = CliRunner().invoke(app, [*args, "--restart"])

    assert done.exit_code == 0 and again.exit_code == 0, done.output + again.output
    variants = {name: versions[-1].spec for name, versions in mesh.agents.versions.items() if name != "geo"}
    assert {name: (spec.model, list(spec.tools)) for name, spec in variants.items()} == {
        "geo-on-smollm2-135m": ("SmolLM2-135M", ["country_facts"]),
        "geo-on-tiny-2": ("Tiny 2", ["country_facts"]),
    }
    assert [len(mesh.agents.versions[name]) for name in variants] == [1, 1]  # the same spec again: no new version
    assert sorted({r.agent for r in mesh.planner.calls("Run")}) == ["geo-on-smollm2-135m", "geo-on-tiny-2"]


def test_eval_on_a_model_runs_tasks_with_their_own_agent_as_its_variant_with_the_prompt_asked(
    mesh, tmp_path: Path
) -> None:
    from meshpilot.planner.v1 import agents_pb2

    mesh.agents._store("default", agents_pb2.AgentSpec(instructions="Answer."))
    mesh.agents._store("fn-1", agents_pb2.AgentSpec(instructions="Call the function.", tools=["calculator"]))
    path = tmp_path / "own.jsonl"
    tasks = (dataclasses.replace(FRANCE, agent="fn-1"), JAPAN)
    path.write_text("\n".join(json.dumps(task.to_json()) for task in tasks) + "\n")
    args = ["eval", str(path), "--model", "Tuned 1", "--no-builtin-examples", "--out", str(tmp_path / "out")]

    done = CliRunner().invoke(app, [*args, "--planner", mesh.target])

    assert done.exit_code == 0, done.output
    assert sorted((r.task, r.agent) for r in mesh.planner.calls("Run")) == sorted(
        [(FRANCE.task, "fn-1-on-tuned-1"), (JAPAN.task, "default-on-tuned-1")]
    )
    made = {name: mesh.agents.versions[name][-1].spec for name in ("fn-1-on-tuned-1", "default-on-tuned-1")}
    assert {name: (s.model, list(s.tools), s.builtin_examples) for name, s in made.items()} == {
        "fn-1-on-tuned-1": ("Tuned 1", ["calculator"], False),
        "default-on-tuned-1": ("Tuned 1", [], False),
    }


def test_eval_builtin_examples_without_a_model_exits_2_and_runs_nothing(mesh, tmp_path: Path) -> None:
    done = CliRunner().invoke(
        app, ["eval", str(suite_file(tmp_path)), "--no-builtin-examples", "--planner", mesh.target]
    )
    assert done.exit_code == 2
    assert "--builtin-examples/--no-builtin-examples goes with --model" in done.output
    assert mesh.planner.calls("Run") == []


def test_eval_with_a_model_for_an_unknown_agent_exits_1_with_the_code(mesh, tmp_path: Path) -> None:
    done = CliRunner().invoke(
        app, ["eval", str(suite_file(tmp_path)), "--agent", "nope", "--model", "m", "--planner", mesh.target]
    )
    assert done.exit_code == 1
    assert "error: NOT_FOUND: no agent 'nope'" in done.output
    assert mesh.planner.calls("Run") == []


class FailingStub:
    """A PlannerService stub whose Run streams one event, then ends with ``code``."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    def Run(self, request, timeout=None):
        async def stream():
            yield planner_pb2.RunEvent(run_id="run-9", sequence=1, step_started=planner_pb2.StepStarted(step=1))
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x" * 5000)

        return stream()


async def test_a_run_that_ends_with_an_rpc_error_is_a_failed_task_with_a_bounded_error() -> None:
    from services.eval import PlannerRunner

    trajectory = await PlannerRunner(FailingStub(grpc.StatusCode.DEADLINE_EXCEEDED)).run("q", agent="", timeout_s=1)
    assert trajectory.error == "DEADLINE_EXCEEDED: " + "x" * 300
    assert (trajectory.steps, trajectory.run_id) == (1, "run-9")
    with pytest.raises(RunUnavailable, match=r"^UNAVAILABLE: x"):
        await PlannerRunner(FailingStub(grpc.StatusCode.UNAVAILABLE)).run("q", agent="", timeout_s=1)


def test_eval_of_a_bfcl_suite_on_a_planner_without_tool_sources_exits_1_with_the_code(mesh, tmp_path: Path) -> None:
    from services.eval.bfcl import convert_bfcl
    from tests.unit.test_eval_suite import ANSWERS as BFCL_ANSWERS
    from tests.unit.test_eval_suite import QUESTIONS as BFCL_QUESTIONS

    path = tmp_path / "bfcl.jsonl"
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in convert_bfcl(BFCL_QUESTIONS, BFCL_ANSWERS)))
    done = CliRunner().invoke(app, ["eval", str(path), "--out", str(tmp_path / "out"), "--planner", mesh.target])
    assert done.exit_code == 1
    assert "error: UNIMPLEMENTED" in done.output
    assert mesh.planner.calls("Run") == []

"""The whole loop against an in-process planner (scripted model, fake tools) and a tiny random Llama: baseline,
rollouts, reward filtering, training, export into the models directory, evaluation on the new model; a second run
resumes everything and runs nothing; the job's bad inputs are refused naming the option."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from inference_core.testing import write_tiny_llama
from meshpilot.planner.v1 import agents_pb2
from services.common import load_config
from services.eval import Contains, EvalTask, RunUnavailable
from services.planner.pg_store import PostgresRunStore
from services.planner.store import RunStore
from services.train import TrainSettings, TrainSettingsError, react_action
from services.train.journal import open_journal
from services.train.loop import TrainJob, load_suites
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call

FRANCE = EvalTask("capital-FR", "What is the capital of France?", (Contains(("Paris",)),), "one_hop", "train")
JAPAN = EvalTask("capital-JP", "What is the capital of Japan?", (Contains(("Tokyo",)),), "one_hop", "test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-loop"), context_length=2048)


@pytest.fixture
def config(tmp_path: Path):
    planner = {"server": {"port": 0}, "default_agent_tools": ["country_facts", "calculator"]}
    return load_config(data_dir=str(tmp_path / "data"), planner=planner)


@pytest.fixture
def settings(tmp_path: Path) -> TrainSettings:
    suite = tmp_path / "tiny.jsonl"
    suite.write_text("".join(json.dumps(task.to_json()) + "\n" for task in (FRANCE, JAPAN)))
    return TrainSettings(
        name="t", suite=str(suite), eval_suite=str(suite), attempts=2, max_steps=2, save_steps=1, concurrency=1,
        grad_accumulation=1, max_length=4096,
    )  # fmt: skip


def job(settings: TrainSettings, config, planner: Planner, tools: FakeTools, tiny: Path) -> TrainJob:
    return TrainJob(
        settings, data_dir=config.data_dir, default_model_path=str(tiny), default_model_id="tiny",
        channel=planner.channel, tools=tools, journal=planner.servicer.store,
    )  # fmt: skip


async def test_a_round_trains_registers_and_scores_a_model_and_a_rerun_resumes_it(config, settings, tiny) -> None:
    tokyo = [call("country_facts", country="Japan"), answer("The capital of Japan is Tokyo.")]
    outputs = [
        *tokyo,  # the baseline on the test task
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # attempt 0: passes
        call("country_facts", country="Francia"), answer("I could not find the answer."),  # attempt 1: fails
        *tokyo,  # the trained model on the test task
    ]  # fmt: skip
    llm, tools = ScriptedLLM(outputs, models=("tiny", "t-r1")), FakeTools()
    async with Planner(config, llm, tools) as planner:
        (result,) = await job(settings, config, planner, tools, tiny).run()
        llm.assert_consumed()
        assert [r["model"] for r in llm.requests] == ["", "", "", "", "", "", "t-r1", "t-r1"]

        assert (result.model, result.rollouts, result.rollouts_passed, result.selected) == ("t-r1", 2, 1, 1)
        assert (result.examples, result.steps) == (2, 2)
        assert result.report.overall.completion_rate == 1.0 and result.report.agent == "t-r1"
        model = config.data_dir / "models" / "t-r1"
        assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
        folder = config.data_dir / "train" / "t"
        assert {p.name for p in folder.iterdir()} >= {"report.json", "report.md", "report.png", "rounds.json"}
        assert [r["agent"] for r in json.loads((folder / "report.json").read_text())] == ["baseline", "t-r1"]
        examples = [json.loads(line) for line in (folder / "round-1" / "examples.jsonl").read_text().splitlines()]
        assert [e["messages"] for e in examples] == [llm.requests[2]["messages"], llm.requests[3]["messages"]]
        assert not (folder / "round-1" / "checkpoints").exists()  # exported: nothing left to resume

        (again,) = await job(settings, config, planner, tools, tiny).run()  # every phase's result is there
        assert again == result and len(llm.requests) == 8


async def test_an_agent_on_a_model_this_job_cannot_train_is_refused_naming_the_option(config, settings, tiny) -> None:
    llm, tools = ScriptedLLM([], models=("tiny", "other")), FakeTools()
    async with Planner(config, llm, tools) as planner:
        spec = (await planner.agents.GetAgent(agents_pb2.GetAgentRequest(name="default"))).spec
        spec.model = "other"
        await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="geo", spec=spec))
        with pytest.raises(TrainSettingsError, match=r"--agent 'geo' runs model 'other', which is not in"):
            await job(dataclasses.replace(settings, agent="geo"), config, planner, tools, tiny).run()
    llm.assert_consumed()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"suite": "no-such-suite"}, r"^--suite: no suite 'no-such-suite'"),
        ({"eval_suite": "no-such-suite"}, r"^--eval-suite: no suite"),
        ({"categories": ("poetry",)}, r"^--suite 'kg-train' has no train tasks in the categories poetry"),
        ({"suite": "kg-test"}, r"^--suite 'kg-test' has no train tasks"),
    ],
)
def test_suites_that_give_no_tasks_are_refused_naming_the_option(change: dict, message: str) -> None:
    with pytest.raises(TrainSettingsError, match=message):
        load_suites(dataclasses.replace(TrainSettings(), **change))


def test_the_suites_are_the_train_and_test_splits_sampled() -> None:
    train, test = load_suites(TrainSettings(categories=("one_hop", "reverse"), limit=2, eval_limit=1))
    assert [(t.category, t.split) for t in train.tasks] == [("one_hop", "train")] * 2 + [("reverse", "train")] * 2
    assert [(t.category, t.split) for t in test.tasks] == [("one_hop", "test"), ("reverse", "test")]


async def test_a_react_student_learns_from_the_guided_rollouts_and_is_what_is_scored(config, settings, tiny) -> None:
    outputs = [
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # attempt 0 (guided)
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # attempt 1
        react_action(call("country_facts", country="Japan")), react_action(answer("The capital of Japan is Tokyo.")),
    ]  # fmt: skip
    llm, tools = ScriptedLLM(outputs, models=("tiny", "t-r1")), FakeTools()
    async with Planner(config, llm, tools) as planner:
        await make_agent(planner, "free", "react")
        student = dataclasses.replace(settings, student="free")
        (result,) = await job(student, config, planner, tools, tiny).run(baseline=False)
    llm.assert_consumed()
    assert (result.selected, result.examples, result.report.agent) == (1, 2, "t-r1")
    assert result.report.overall.completion_rate == 1.0
    examples = [json.loads(line) for line in (config.data_dir / "train" / "t" / "round-1" / "examples.jsonl").open()]
    assert [json.loads(e["completion"]).get("thought") is not None for e in examples] == [True, True]
    assert "Think step by step" in examples[0]["messages"][0]["content"]  # the react agent's own prompt


@pytest.mark.parametrize(
    ("student", "message"),
    [("absent", r"--student 'absent': no such agent"), ("geo", r"--student 'geo' runs the guided policy")],
)
async def test_a_student_that_is_not_a_react_agent_is_refused(config, settings, tiny, student, message) -> None:
    llm, tools = ScriptedLLM([]), FakeTools()
    async with Planner(config, llm, tools) as planner:
        await make_agent(planner, "geo", "guided")
        with pytest.raises(TrainSettingsError, match=message):
            await job(dataclasses.replace(settings, student=student), config, planner, tools, tiny).run()
    llm.assert_consumed()


async def test_an_agent_that_does_not_exist_is_refused_naming_the_option(config, settings, tiny) -> None:
    llm, tools = ScriptedLLM([]), FakeTools()
    async with Planner(config, llm, tools) as planner:
        with pytest.raises(TrainSettingsError, match=r"^--agent 'absent': no such agent"):
            await job(dataclasses.replace(settings, agent="absent"), config, planner, tools, tiny).run()


async def make_agent(planner: Planner, name: str, policy: str) -> None:
    spec = (await planner.agents.GetAgent(agents_pb2.GetAgentRequest(name="default"))).spec
    spec.policy.name = policy
    await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name=name, spec=spec))


class Unavailable:
    async def run(self, task: str, *, agent: str, timeout_s: float):
        raise RunUnavailable("UNAVAILABLE: the planner is draining")


@pytest.mark.parametrize(
    ("baseline", "message"),
    [(True, r"some test tasks could not be run"), (False, r"some rollouts could not be run")],
)
async def test_runs_the_planner_could_not_make_stop_the_job_to_be_resumed(config, settings, tiny, baseline, message):
    llm, tools = ScriptedLLM([]), FakeTools()
    async with Planner(config, llm, tools) as planner:
        train = job(settings, config, planner, tools, tiny)
        train.runner = Unavailable()  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match=message + r".*run the command again"):
            await train.run(baseline=baseline)
    assert not (config.data_dir / "models").exists()


def test_the_journal_is_the_one_the_planners_config_names(config) -> None:
    assert isinstance(open_journal(config), RunStore)
    config.planner.database_url = "postgresql://u:p@127.0.0.1:1/db"
    assert isinstance(open_journal(config), PostgresRunStore)


async def test_a_grpo_round_samples_from_every_rollouts_prompts(config, settings, tiny) -> None:
    outputs = [
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # attempt 0: passes
        call("country_facts", country="Francia"), answer("I could not find the answer."),  # attempt 1: fails
        call("country_facts", country="Japan"), answer("The capital of Japan is Tokyo."),  # the model on the test
    ]  # fmt: skip
    llm, tools = ScriptedLLM(outputs, models=("tiny", "t-r1")), FakeTools()
    async with Planner(config, llm, tools) as planner:
        grpo = dataclasses.replace(settings, method="grpo", max_steps=1, temperature=1.0)
        (result,) = await job(grpo, config, planner, tools, tiny).run(baseline=False)
    llm.assert_consumed()
    assert (result.rollouts, result.examples, result.steps) == (2, 4, 1)  # both runs' prompts, good and bad
    assert (config.data_dir / "models" / "t-r1" / "config.json").is_file()

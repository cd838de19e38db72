"""The whole loop against an in-process planner (scripted model, fake tools) and a tiny random Llama: baseline,
rollouts, reward filtering, training, export into the models directory, evaluation on the new model; a second run
resumes everything and runs nothing; the job's bad inputs are refused naming the option."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from inference_core.testing import write_tiny_llama
from meshpilot.planner.v1 import agents_pb2, planner_pb2_grpc
from services.common import load_config
from services.eval import Contains, EvalTask, PlannerRunner, RunUnavailable
from services.eval.bfcl import convert_bfcl
from services.planner.pg_store import PostgresRunStore
from services.planner.store import RunStore
from services.train import TrainSettings, TrainSettingsError, react_action
from services.train.finetune import TrainingStopped
from services.train.journal import open_journal
from services.train.loop import TrainJob
from services.train.rollouts import collect_rollouts, rollout_agent_name
from services.train.suites import load_suites
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call
from tests.unit.test_eval_bfcl import INTEGER, FunctionTools, question, tool_sources
from tests.unit.test_eval_bfcl import answer as bfcl_answer

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


async def test_with_a_lean_prompt_the_trained_models_read_and_learn_prompts_without_the_builtin_examples(
    config, settings, tiny
) -> None:
    builtin = "What is the capital of Peru?"  # the first of the planner's built-in worked examples
    tokyo = [call("country_facts", country="Japan"), answer("The capital of Japan is Tokyo.")]
    paris = [call("country_facts", country="France"), answer("The capital of France is Paris.")]
    outputs = [*tokyo, *paris, *paris, *tokyo, *paris, *paris, *tokyo]  # baseline, then per round: rollouts, eval
    llm, tools = ScriptedLLM(outputs, models=("tiny", "t-r1", "t-r2")), FakeTools()
    lean = dataclasses.replace(settings, lean_prompt=True, rounds=2, max_steps=1)
    async with Planner(config, llm, tools) as planner:
        first, second = await job(lean, config, planner, tools, tiny).run()
        llm.assert_consumed()
    system = [request["messages"][0]["content"] for request in llm.requests]
    models = [request["model"] for request in llm.requests]
    assert models == ["", "", "", "", "", "", "t-r1", "t-r1", "t-r1", "t-r1", "t-r1", "t-r1", "t-r2", "t-r2"]
    # The untrained model (baseline, round 1's rollouts) reads the examples; the trained ones never do.
    assert [builtin in text for text in system] == [True] * 6 + [False] * 8
    assert len(system[6]) < len(system[0]) / 2
    folder = config.data_dir / "train" / "t"
    for number, rollout_prompts in ((1, (2, 3)), (2, (8, 9))):
        examples = (folder / f"round-{number}" / "examples.jsonl").read_text().splitlines()
        messages = [json.loads(line)["messages"] for line in examples]
        assert len(messages) == 2
        # What round 1 learned from is what its model is then asked: the same lean system prompt.
        assert all(m[0]["content"] == system[6] for m in messages)
        assert [m[1:] for m in messages] == [llm.requests[i]["messages"][1:] for i in rollout_prompts]
    assert (first.report.agent, second.report.agent) == ("t-r1", "t-r2")


async def test_cancelled_while_training_the_trainer_is_asked_to_stop_and_the_job_ends(config, settings, tiny) -> None:
    # Ctrl-C cancels the job; the trainer runs in a thread that cancellation does not reach, and the process used to
    # wait for all its steps (an hour in `make train`). Now it is asked to stop at its next step.
    stepping, asked = threading.Event(), []

    def in_a_thread(tune, folder):
        def train(*, base, checkpoints, settings, on_step):
            for done in range(1, 400):  # bounded: without the fix nothing stops this thread
                stepping.set()
                if on_step(done, 400):
                    asked.append(done)
                    raise TrainingStopped(done)
                time.sleep(0.05)
            raise AssertionError("never asked to stop")

        return train

    france = [call("country_facts", country="France"), answer("The capital of France is Paris.")]
    llm, tools = ScriptedLLM([*france, *france], models=("tiny",)), FakeTools()
    async with Planner(config, llm, tools) as planner:
        trainer = TrainJob(
            settings, data_dir=config.data_dir, default_model_path=str(tiny), default_model_id="tiny",
            channel=planner.channel, tools=tools, journal=planner.servicer.store, training=in_a_thread,
        )  # fmt: skip
        running = asyncio.ensure_future(trainer.run(baseline=False))
        assert await asyncio.to_thread(stepping.wait, 120)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 60)
    assert len(asked) == 1  # asked once, and the job waited for the trainer to stop before it ended


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
        (
            {"eval_limit_for": (("bfcl_simple", 5),)},
            r"^--eval-limit-for bfcl_simple: no --eval-suite has such a test category; use one of calling_code, ",
        ),
    ],
)
def test_suites_that_give_no_tasks_are_refused_naming_the_option(change: dict, message: str) -> None:
    with pytest.raises(TrainSettingsError, match=message):
        load_suites(dataclasses.replace(TrainSettings(), **change))


def test_the_suites_are_the_train_and_test_splits_sampled() -> None:
    (train,), (test,) = load_suites(TrainSettings(categories=("one_hop", "reverse"), limit=2, eval_limit=1))
    assert [(t.category, t.split) for t in train.tasks] == [("one_hop", "train")] * 2 + [("reverse", "train")] * 2
    assert [(t.category, t.split) for t in test.tasks] == [("one_hop", "test"), ("reverse", "test")]


def test_a_category_scored_on_its_own_number_of_test_tasks() -> None:
    settings = TrainSettings(
        eval_suite=("kg-test", "bfcl-simple"), categories=("one_hop", "bfcl_simple"), eval_limit=1,
        eval_limit_for=(("bfcl_simple", 7),),
    )  # fmt: skip
    _, (kg, bfcl) = load_suites(settings)
    assert len(kg.tasks) == 1 and len(bfcl.tasks) == 7 and {t.split for t in bfcl.tasks} == {"test"}
    with pytest.raises(TrainSettingsError, match=r"^--eval-limit-for names bfcl_simple twice"):
        dataclasses.replace(settings, eval_limit_for=(("bfcl_simple", 7), ("bfcl_simple", 8))).validate()


def test_kg_and_bfcl_are_trained_on_together_and_each_scored_on_its_own_test_split() -> None:
    settings = TrainSettings(
        suite=("kg-train", "bfcl-simple"), eval_suite=("kg-test", "bfcl-simple"), limit=2, eval_limit=1,
        categories=("one_hop", "bfcl_simple"),
    )  # fmt: skip
    train, test = load_suites(settings)
    assert [(s.name, [t.category for t in s.tasks]) for s in train] == [
        ("kg-train", ["one_hop", "one_hop"]), ("bfcl-simple", ["bfcl_simple", "bfcl_simple"]),
    ]  # fmt: skip
    assert [(s.name, len(s.tasks)) for s in test] == [("kg-test", 1), ("bfcl-simple", 1)]
    assert {t.split for s in train for t in s.tasks} == {"train"} and {t.split for s in test for t in s.tasks} == {
        "test"
    }
    bfcl_train, bfcl_test = train[1].tasks, test[1].tasks
    assert [t.id for t in bfcl_train] == ["simple_python_1", "simple_python_3"] and bfcl_test[0].id == "simple_python_0"
    assert all(t.agent == f"bfcl-simple-python-{t.id.rsplit('_', 1)[1]}" for t in (*bfcl_train, *bfcl_test))


def write_suite(path: Path, *tasks: EvalTask) -> str:
    path.write_text("".join(json.dumps(task.to_json()) + "\n" for task in tasks))
    return str(path)


def test_a_suite_without_the_split_an_option_needs_is_refused_naming_the_option_and_the_suite(tmp_path: Path) -> None:
    only_test = write_suite(tmp_path / "only-test.jsonl", JAPAN)
    only_train = write_suite(tmp_path / "only-train.jsonl", FRANCE)
    with pytest.raises(TrainSettingsError, match=rf"^--suite '{only_test}' has no train tasks; choose another suite"):
        load_suites(TrainSettings(suite=("kg-train", only_test)))
    with pytest.raises(TrainSettingsError, match=rf"^--eval-suite '{only_train}' has no test tasks; choose another"):
        load_suites(TrainSettings(eval_suite=("kg-test", only_train)))


def test_suites_of_one_option_that_share_a_task_id_are_refused(tmp_path: Path) -> None:
    again = write_suite(tmp_path / "again.jsonl", FRANCE, JAPAN)
    mine = write_suite(tmp_path / "mine.jsonl", FRANCE, JAPAN)
    with pytest.raises(TrainSettingsError, match=rf"^--suite '{mine}': task 'capital-FR' is also in '{again}'; give"):
        load_suites(TrainSettings(suite=(again, mine)))
    with pytest.raises(TrainSettingsError, match=rf"^--eval-suite '{mine}': task 'capital-JP' is also in '{again}'"):
        load_suites(TrainSettings(suite=(again,), eval_suite=(again, mine)))
    assert [len(s.tasks) for s in load_suites(TrainSettings(suite=(again,), eval_suite=(mine,)))[0]] == [1]


def test_a_student_with_tasks_that_run_as_their_own_agents_is_refused() -> None:
    settings = TrainSettings(suite=("kg-train", "bfcl-simple"), student="free")
    with pytest.raises(TrainSettingsError, match=r"^--student 'free': the tasks of 'bfcl-simple' run as their own"):
        load_suites(settings)
    assert load_suites(dataclasses.replace(settings, suite=("kg-train",), eval_suite=("kg-test", "bfcl-simple")))


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


class RecordingRunner(PlannerRunner):
    """The planner's Run, recording which agent each task ran as."""

    def __init__(self, planner: Planner) -> None:
        super().__init__(planner_pb2_grpc.PlannerServiceStub(planner.channel))
        self.ran: list[tuple[str, str]] = []

    async def run(self, task: str, *, agent: str, timeout_s: float):
        self.ran.append((task, agent))
        return await super().run(task, agent=agent, timeout_s=timeout_s)


async def test_bfcl_tasks_roll_out_demonstrate_and_score_as_their_own_agents_beside_kg_tasks(tmp_path, tiny) -> None:
    """One round on a kg suite and a BFCL suite: a BFCL task's rollouts run as sampled copies of its own agent, its
    demonstration plays as that agent, the trained model is scored as ``<task agent>-on-<model>``, and each suite
    gets its report."""
    factorial = question(1, "math.factorial", {"number": INTEGER}, ["number"], "Calculate the factorial of 5.")
    area = question(2, "area", {"base": INTEGER}, ["base"], "Find the area of a square of side 4.")
    answers = [bfcl_answer(1, "math.factorial", {"number": [5]}), bfcl_answer(2, "area", {"base": [4]})]
    train, test = convert_bfcl(f"{factorial}\n{area}", "\n".join(answers))
    assert (train.split, test.split) == ("train", "test")
    kg = dataclasses.replace(FRANCE, meta={"solution": [{"tool": "country_facts", "arguments": {"country": "France"}}]})
    suites = (write_suite(tmp_path / "kg.jsonl", kg, JAPAN), write_suite(tmp_path / "bfcl.jsonl", train, test))
    settings = TrainSettings(
        name="t", suite=suites, eval_suite=suites, attempts=1, demonstrations=1, max_steps=1, save_steps=1,
        concurrency=1, grad_accumulation=1, max_length=4096,
    )  # fmt: skip
    no_answer = answer("I could not find the answer.")
    outputs = [
        call("country_facts", country="Japan"), answer("The capital of Japan is Tokyo."),  # baseline, kg
        call("bfcl.area", base=5), no_answer,  # baseline, BFCL: a wrong value
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # rollout: passes
        call("bfcl.math_factorial", number=6), no_answer,  # rollout as a copy of the task's agent: fails
        call("country_facts", country="Japan"), answer("The capital of Japan is Tokyo."),  # t-r1, kg
        call("bfcl.area", base=4), no_answer,  # t-r1 as bfcl-simple-python-2-on-t-r1: passes
    ]  # fmt: skip
    llm, tools = ScriptedLLM(outputs, models=("tiny", "t-r1")), FunctionTools((train, test))
    async with tool_sources() as (sources, port):
        config = load_config(
            data_dir=str(tmp_path / "data"), tools={"server": {"port": port}},
            planner={"server": {"port": 0}, "default_agent_tools": ["country_facts", "calculator"]},
        )  # fmt: skip
        async with Planner(config, llm, tools) as planner:
            runner = RecordingRunner(planner)
            loop = TrainJob(
                settings, data_dir=config.data_dir, default_model_path=str(tiny), default_model_id="tiny",
                channel=planner.channel, tools=tools, journal=planner.servicer.store, runner=runner, tool_runner=tools,
            )  # fmt: skip
            (result,) = await loop.run()
            copy = await planner.agents.GetAgent(agents_pb2.GetAgentRequest(name="train-t-bfcl-simple-python-1-a0"))
    llm.assert_consumed()
    assert [agent for _, agent in runner.ran] == [
        "", "bfcl-simple-python-2",  # the baseline: the task's own agent
        "train-t-a0", "train-t-bfcl-simple-python-1-a0",  # rollouts: sampled copies of each
        "default-on-t-r1", "bfcl-simple-python-2-on-t-r1",  # the trained model
    ]  # fmt: skip
    assert list(copy.spec.tools) == ["bfcl.math_factorial"] and copy.spec.sampling.seed == 14 + 1000
    assert [r["model"] for r in llm.requests][-4:] == ["t-r1"] * 4
    assert [source.name for source in sources.registered] == ["bfcl"]

    assert (result.rollouts, result.rollouts_passed, result.selected) == (2, 1, 1)
    assert result.demonstrations == {"one_hop": {"kept": 1, "tried": 1}, "bfcl_simple": {"kept": 1, "tried": 1}}
    folder = config.data_dir / "train" / "t"
    examples = [json.loads(line) for line in (folder / "round-1" / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == result.examples == 6  # the passing rollout and two demonstrations, two steps each
    bfcl_call = examples[4]  # the BFCL demonstration's call, prompted as its agent was at the rollout's first step
    assert json.loads(bfcl_call["completion"]) == {"tool": "bfcl.math_factorial", "arguments": {"number": 5}}
    assert bfcl_call["messages"] == llm.requests[6]["messages"]
    assert "You call the one function" in bfcl_call["messages"][0]["content"]

    assert [(r.suite, r.agent, r.overall.completed) for r in result.reports] == [("kg", "t-r1", 1), ("bfcl", "t-r1", 1)]
    assert set(json.loads((folder / "rounds.json").read_text())[0]["evals"]) == {"kg", "bfcl"}
    report = json.loads((folder / "report.json").read_text())
    assert [(r["suite"], r["agent"], r["overall"]["completed"]) for r in report] == [
        ("kg", "baseline", 1), ("bfcl", "baseline", 0), ("kg", "t-r1", 1), ("bfcl", "t-r1", 1),
    ]  # fmt: skip
    assert "Suite `bfcl`" in (folder / "round-1" / "eval.md").read_text()


async def test_a_task_whose_own_agent_does_not_exist_is_refused_before_any_run(config, tmp_path, tiny) -> None:
    ghost = dataclasses.replace(FRANCE, agent="ghost")
    suite = write_suite(tmp_path / "ghost.jsonl", ghost, JAPAN)
    llm, tools = ScriptedLLM([]), FakeTools()
    async with Planner(config, llm, tools) as planner:
        settings = TrainSettings(name="t", suite=suite, eval_suite=suite, attempts=1)
        with pytest.raises(TrainSettingsError, match=rf"^--suite '{suite}': task capital-FR runs as 'ghost': no such"):
            await job(settings, config, planner, tools, tiny).run()
    assert llm.requests == []


async def test_rollouts_of_a_task_agent_without_sampled_copies_are_refused_before_any_run(tmp_path: Path) -> None:
    own = dataclasses.replace(FRANCE, agent="bfcl-simple-python-1")
    path, journal, copies = (
        tmp_path / "rollouts.jsonl",
        RunStore(tmp_path / "journal.db"),
        {"bfcl-simple-python-2": ["c"]},
    )
    with pytest.raises(ValueError, match=r"^no sampled copies of the task agents bfcl-simple-python-1; prepare them"):
        await collect_rollouts(
            [own], ["a0"], Unavailable(), journal, path, concurrency=1, timeout_s=1, task_agents=copies
        )
    assert not path.exists()


def test_a_task_agents_copies_are_named_after_it_and_never_shared() -> None:
    assert rollout_agent_name("kg", 3) == "train-kg-a3"
    assert rollout_agent_name("kg", 3, "bfcl-simple-python-12") == "train-kg-bfcl-simple-python-12-a3"
    job_name = "j" * 41
    long = {rollout_agent_name(job_name, 0, f"bfcl-simple-python-{n}") for n in (12, 123)}
    assert len(long) == 2 and all(len(name) <= 63 and name.endswith("-a0") for name in long)

"""Verified demonstrations: each kg category's reference solution played through the planner's executor against the
real tools service (in-process, over a real knowledge store), judged, and turned into examples whose prompts are what
the agent was sent and whose completions its step's grammar accepts; solutions that do not fit are dropped saying
why; round 1 of the loop learns from them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import jsonschema
import pytest

from inference_core.testing import write_tiny_llama
from meshpilot.knowledge.v1 import knowledge_pb2_grpc
from meshpilot.planner.v1 import agents_pb2
from services.common import KnowledgeConfig, MeshConfig, ServerConfig, ToolsConfig, create_channel, load_config
from services.common.config import PlannerConfig
from services.eval import Contains, EvalTask, Unanswerable, load_suite
from services.eval.bfcl import bfcl_agent_spec
from services.eval.generate import CATEGORIES, generate_kg_tasks
from services.knowledge import DatasetSpec, OxigraphStore
from services.knowledge import create_server as create_knowledge_server
from services.knowledge.dataset import default_data_dir, read_countries
from services.planner.agents import check_definition, default_agent
from services.planner.clients import ToolsServiceClient
from services.planner.convert import definition_from_proto
from services.planner.prompt import asked_arguments
from services.planner.types import Generation
from services.tools.server import create_server as create_tools_server
from services.train import TrainSettings, TrainSettingsError, step_examples
from services.train.demonstrations import (
    Demonstration,
    DemonstrationError,
    Demonstrator,
    SolutionPlayer,
    collect_demonstrations,
    decodable,
    demonstration_counts,
    read_demonstrations,
)
from services.train.loop import TrainJob
from services.train.settings import parse_category_counts
from services.train.suites import demonstration_tasks
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call
from tests.unit.test_eval_bfcl import FunctionTools

# Enough for every category: Euro countries to count, unique capitals, Chinese names, time zones.
COUNTRIES = frozenset({"BE", "BT", "DE", "DZ", "FR", "JP"})
DEFAULT = default_agent(PlannerConfig()).definition


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OxigraphStore]:
    store = OxigraphStore(tmp_path_factory.mktemp("knowledge"), dataset=DatasetSpec(countries=COUNTRIES), workers=1)
    store.start_sync()
    yield store
    store.close_sync()


@pytest.fixture
async def tools(store: OxigraphStore) -> AsyncIterator[ToolsServiceClient]:
    """The tools service (the real built-in tools) in-process, over the knowledge service in-process."""
    config = MeshConfig(
        knowledge=KnowledgeConfig(server=ServerConfig(port=0)), tools=ToolsConfig(server=ServerConfig(port=0))
    )
    knowledge = create_knowledge_server(config, store)
    await knowledge.start()
    await knowledge.set_serving()
    knowledge_channel = create_channel(knowledge.address)
    server = create_tools_server(config, knowledge_stub=knowledge_pb2_grpc.KnowledgeServiceStub(knowledge_channel))
    await server.start()
    await server.set_serving()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield ToolsServiceClient(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await knowledge_channel.close()
        await knowledge.stop(0)


def one_task_per_kind() -> list[EvalTask]:
    """The first task of each kind of question ("counting-timezones", "counting-currency", ...) of every category."""
    records = [r for r in read_countries(default_data_dir()) if r["iso2"] in COUNTRIES]
    tasks = generate_kg_tasks(records, per_category={"train": 50, "test": 50})
    kinds = {task.id.rsplit("-", 1)[0]: task for task in reversed(tasks)}
    assert {task.category for task in kinds.values()} == set(CATEGORIES)
    return sorted(kinds.values(), key=lambda task: task.id)


class RecordingPlayer(SolutionPlayer):
    """The solution player, keeping each request the executor made (messages and schema)."""

    requests: ClassVar[list[dict[str, Any]]] = []

    async def generate(
        self, messages: list[dict[str, str]], json_schema: dict[str, Any], *args, **kwargs
    ) -> Generation:
        RecordingPlayer.requests.append({"messages": messages, "schema": json_schema})
        return await super().generate(messages, json_schema, *args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("task", one_task_per_kind(), ids=lambda task: task.id.rsplit("-", 1)[0])
async def test_a_categorys_solution_is_verified_and_teaches_what_the_agent_is_sent(tools, task) -> None:
    RecordingPlayer.requests = []
    listing = await tools.list_tools()
    async with Demonstrator(DEFAULT, tools, player=RecordingPlayer) as demonstrator:
        demonstration = await demonstrator.demonstrate(task)
    assert (demonstration.kept, demonstration.reason) == (True, ""), demonstration
    rollout = demonstration.rollout
    assert rollout is not None and rollout.passed and rollout.valid_call_rate == 1.0
    assert rollout.tool_calls == len(task.meta["solution"]) and rollout.steps == rollout.tool_calls + 1

    examples = step_examples(rollout, listing)
    sent = RecordingPlayer.requests
    assert [e.messages for e in examples] == [request["messages"] for request in sent]
    for example, request in zip(examples, sent, strict=True):
        jsonschema.validate(json.loads(example.completion), request["schema"])
        assert decodable(request["schema"], example.completion), example.completion
    assert json.loads(examples[-1].completion) == {"final_answer": rollout.answer}
    for example, step in zip(examples, task.meta["solution"], strict=False):
        assert json.loads(example.completion) == step


CAPITAL, PRESIDENT = "What is the capital of France?", "Who is the president of France?"
PARIS, LYON = (Contains(("Paris",)),), (Contains(("Lyon",)),)
FRANCE = call("country_facts", name="France")
REVERSE, BHUTAN = "Which country has Thimphu as its capital?", (Contains(("Bhutan",)),)
# Valid SPARQL and valid JSON, but no string the decoder writes under a maxLength holds a double quote.
QUOTED = 'SELECT ?country WHERE { ?c mp:capital "Thimphu" ; rdfs:label ?country }'


@pytest.mark.slow
@pytest.mark.parametrize(
    ("question", "checks", "solution", "reason"),
    [
        (CAPITAL, PARIS, [call("append_note", text="Paris")], "step 1 offers no append_note call"),
        (CAPITAL, PARIS, [call("country_facts", country="France")], "step 1: the country_facts call does not fit"),
        (REVERSE, BHUTAN, [call("sparql_query", query=QUOTED)], "step 1: the constrained decoder cannot write the"),
        (CAPITAL, PARIS, [FRANCE, FRANCE], "step 2 offers no country_facts call (tools offered: none); it offers only"),
        (
            PRESIDENT,
            (Unanswerable(),),
            [FRANCE],
            "step 2: the solution's calls are spent and the step offers no answer",
        ),
        (CAPITAL, LYON, [FRANCE], "step 2: no answer the step offers passes the task's checks ('The capital of"),
    ],
    ids=["tool not offered", "arguments refused", "not decodable", "answer forced early", "no answer", "no pass"],
)
async def test_a_solution_that_does_not_fit_is_dropped_with_the_reason(tools, question, checks, solution, reason):
    steps = [json.loads(step) for step in solution]
    task = EvalTask("t-1", question, checks, "one_hop", "train", meta={"solution": steps})
    async with Demonstrator(DEFAULT, tools) as demonstrator:
        demonstration = await demonstrator.demonstrate(task)
    assert not demonstration.kept and demonstration.rollout is not None
    assert demonstration.reason.startswith("FAILED_PRECONDITION: ") and reason in demonstration.reason, demonstration


async def test_a_task_without_a_solution_and_a_react_agent_are_refused_saying_why() -> None:
    async with Demonstrator(DEFAULT, FakeTools()) as demonstrator:
        demonstration = await demonstrator.demonstrate(EvalTask("bare", "What is 2 + 2?", (), "one_hop", "train"))
    assert demonstration == Demonstration("bare", "one_hop", False, demonstration.reason, None)
    assert "has no reference solution" in demonstration.reason
    with pytest.raises(DemonstrationError, match="runs the react policy"):
        Demonstrator(dataclasses.replace(DEFAULT, policy="react"), FakeTools())


def test_every_shipped_kg_task_carries_a_solution_with_the_default_agents_tools() -> None:
    for name in ("kg-train", "kg-test"):
        for task in load_suite(name).tasks:
            steps = task.meta.get("solution")
            assert steps, task.id
            assert all(DEFAULT.allows(step["tool"]) and isinstance(step["arguments"], dict) for step in steps), task.id


FAKE_AGENT = dataclasses.replace(DEFAULT, tools=("country_facts", "calculator"))
ON_FAKES = [
    EvalTask(f"capital-{c}", f"What is the capital of {n}?", (Contains((p,)),), "one_hop", "train",
             meta={"solution": [{"tool": "country_facts", "arguments": {"country": n}}]})
    for c, n, p in (("FR", "France", "Paris"), ("JP", "Japan", "Tokyo"))
]  # fmt: skip


async def test_demonstrations_are_recorded_and_a_rerun_plays_only_the_missing_ones(tmp_path: Path) -> None:
    path, fakes = tmp_path / "demonstrations.jsonl", FakeTools()
    seen: list[tuple[int, int]] = []
    async with Demonstrator(FAKE_AGENT, fakes) as demonstrator:
        first = await collect_demonstrations(ON_FAKES, demonstrator, path, on_progress=lambda *p: seen.append(p))
        assert [d.kept for d in first] == [True, True] and seen == [(1, 1), (2, 2)]
        assert demonstration_counts(first) == {"one_hop": {"kept": 2, "tried": 2}}
        assert await collect_demonstrations(ON_FAKES, demonstrator, path) == first
        assert len(fakes.calls) == 2  # the second collection played nothing
        lines = path.read_text().splitlines()
        path.write_text(lines[0] + "\n" + lines[1][:50])  # a torn last line: that task is played again
        again = await collect_demonstrations(ON_FAKES, demonstrator, path)
    assert len(fakes.calls) == 3 and [d.task_id for d in again] == [t.id for t in ON_FAKES]
    assert set(read_demonstrations(path)) == {t.id for t in ON_FAKES}


def test_the_chosen_tasks_are_a_seeded_sample_of_the_train_split_per_category() -> None:
    settings = TrainSettings(demonstrations=3, categories=("reverse", "counting"))
    chosen = demonstration_tasks(settings)
    assert [t.category for t in chosen] == ["reverse"] * 3 + ["counting"] * 3
    assert {t.split for t in chosen} == {"train"}
    assert demonstration_tasks(settings) == chosen
    assert demonstration_tasks(dataclasses.replace(settings, seed=15)) != chosen
    assert demonstration_tasks(TrainSettings()) == []


def test_demonstrations_for_a_category_override_the_number_for_it_alone() -> None:
    settings = TrainSettings(
        demonstrations=2, demonstrations_for=(("counting", 5), ("reverse", 0)),
        categories=("reverse", "counting", "one_hop"),
    )  # fmt: skip
    chosen = demonstration_tasks(settings)
    assert [t.category for t in chosen] == ["one_hop"] * 2 + ["counting"] * 5
    only = TrainSettings(demonstrations_for=(("reverse", 4),), categories=("reverse", "counting"))
    assert only.demonstrates and [t.category for t in demonstration_tasks(only)] == ["reverse"] * 4


def test_demonstrations_for_a_category_the_suite_lacks_is_refused_naming_the_choices() -> None:
    settings = TrainSettings(demonstrations=2, demonstrations_for=(("revers", 4),))
    with pytest.raises(
        TrainSettingsError,
        match=r"^--demonstrations-for revers: 'kg-train' has no such train category; use one of calling_code, ",
    ):
        demonstration_tasks(settings)


def test_demonstrations_come_from_every_train_suite_per_category() -> None:
    settings = TrainSettings(
        suite=("kg-train", "bfcl-simple"), demonstrations=2, demonstrations_for=(("bfcl_simple", 3),),
        categories=("one_hop", "bfcl_simple"),
    )  # fmt: skip
    chosen = demonstration_tasks(settings)
    assert [(t.category, t.split) for t in chosen] == [("one_hop", "train")] * 2 + [("bfcl_simple", "train")] * 3
    assert all(t.agent and t.meta["solution"] for t in chosen[2:])
    unknown = dataclasses.replace(settings, demonstrations_for=(("revers", 1),))
    with pytest.raises(
        TrainSettingsError,
        match=r"^--demonstrations-for revers: neither 'kg-train' nor 'bfcl-simple' has such train category; use one "
        r"of bfcl_simple, one_hop$",
    ):
        demonstration_tasks(unknown)


BFCL_TRAIN = [task for task in load_suite("bfcl-simple").tasks if task.split == "train"]


async def test_every_bfcl_train_solution_is_played_as_its_tasks_agent_and_verified() -> None:
    """Every train task's reference solution through the planner's executor as its own agent (the definition the
    planner stores for bfcl_agent_spec), the guided policy and the round's listing of every BFCL function: each call
    is one the constrained decoder can write under its step's schema, and every one is verified by the judge, except
    the solutions that give an optional argument their task does not ask for (the guided policy does not offer it:
    ``asked_arguments``), which are refused at their call."""
    tools = FunctionTools(tuple(BFCL_TRAIN))
    listing = await tools.list_tools()
    unasked = {
        task.id
        for task in BFCL_TRAIN
        if set(task.meta["solution"][0]["arguments"])
        - set(asked_arguments(task.meta["tool"]["input_schema"], task.task)["properties"])
    }
    played, refused_calls = {}, []
    for task in BFCL_TRAIN:
        spec = definition_from_proto(agents_pb2.AgentSpec(**bfcl_agent_spec(task)))
        RecordingPlayer.requests = []
        async with Demonstrator(check_definition(task.agent, spec, listing, []), tools, player=RecordingPlayer) as d:
            played[task.id] = await d.demonstrate(task)
        refused_calls += [task.id] if "step 1" in played[task.id].reason else []
        if task.id in unasked:
            continue
        rollout = played[task.id].rollout
        assert rollout is not None and json.loads(rollout.outputs[1]) == task.meta["solution"][0], task.id
        assert decodable(RecordingPlayer.requests[0]["schema"], rollout.outputs[1]), task.id
    dropped = {task_id: d.reason for task_id, d in played.items() if not d.kept}
    # "a radius of 4 inches" names no unit, so unit is not offered
    assert len(unasked) == 22 and "simple_python_7" in unasked
    assert sorted(refused_calls) == sorted(unasked)  # the others are decodable and fit their schema
    # the rest are kept: simple_python_89 and 337 pass a dict argument, checked field by field in BFCL's form
    assert set(dropped) == unasked
    assert sum(d.kept for d in played.values()) == len(BFCL_TRAIN) - 22 == 172
    rollout = played[BFCL_TRAIN[0].id].rollout
    assert rollout is not None and (rollout.tool_calls, rollout.steps, rollout.valid_call_rate) == (1, 2, 1.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["reverse"], r"^--demonstrations-for 'reverse': write CATEGORY=N, such as reverse=16$"),
        (["reverse=-1"], r"^--demonstrations-for 'reverse=-1': write CATEGORY=N"),
        (["x" * 500 + "=1"], r"^--demonstrations-for 'x{60}': write CATEGORY=N"),
    ],
)
def test_demonstrations_for_values_not_of_the_form_category_n_are_refused(values: list[str], message: str) -> None:
    with pytest.raises(TrainSettingsError, match=message):
        parse_category_counts("--demonstrations-for", values)


def test_demonstrations_for_naming_a_category_twice_is_refused() -> None:
    counts = parse_category_counts("--demonstrations-for", ["reverse=4", "counting=2", "reverse=8"])
    assert counts == (("reverse", 4), ("counting", 2), ("reverse", 8))
    with pytest.raises(TrainSettingsError, match=r"^--demonstrations-for names reverse twice; give each category once"):
        TrainSettings(demonstrations_for=counts).validate()


def test_a_negative_number_of_demonstrations_is_refused_naming_the_option() -> None:
    with pytest.raises(TrainSettingsError, match=r"^--demonstrations is -1; use 0 or more"):
        TrainSettings(demonstrations=-1).validate()


async def test_round_one_learns_from_the_demonstrations_with_the_prompts_the_agent_is_sent(tmp_path: Path) -> None:
    planner = {"server": {"port": 0}, "default_agent_tools": ["country_facts", "calculator"]}
    config = load_config(data_dir=str(tmp_path / "data"), planner=planner)
    suite = tmp_path / "tiny.jsonl"
    test = EvalTask("capital-DE", "What is the capital of Germany?", (Contains(("Berlin",)),), "one_hop", "test")
    suite.write_text("".join(json.dumps(task.to_json()) + "\n" for task in (*ON_FAKES, test)))
    settings = TrainSettings(
        name="t", suite=str(suite), eval_suite=str(suite), limit=1, attempts=1, demonstrations=2, max_steps=1,
        save_steps=1, concurrency=1, grad_accumulation=1, max_length=4096,
    )  # fmt: skip
    outputs = [
        call("country_facts", country="Francia"), answer("I could not find the answer."),  # the rollout fails
        call("country_facts", country="Germany"), answer("I could not find the answer."),  # the trained model
    ]  # fmt: skip
    tiny = write_tiny_llama(tmp_path / "tiny", context_length=2048)
    llm, fakes = ScriptedLLM(outputs, models=("tiny", "t-r1")), FakeTools()
    async with Planner(config, llm, fakes) as planner:
        job = TrainJob(
            settings, data_dir=config.data_dir, default_model_path=str(tiny), default_model_id="tiny",
            channel=planner.channel, tools=fakes, journal=planner.servicer.store, tool_runner=fakes,
        )  # fmt: skip
        (result,) = await job.run(baseline=False)
    llm.assert_consumed()
    assert (result.selected, result.examples, result.steps) == (0, 4, 1)  # two demonstrations of two steps
    assert result.demonstrations == {"one_hop": {"kept": 2, "tried": 2}}
    folder = config.data_dir / "train" / "t" / "round-1"
    assert json.loads((folder / "round.json").read_text())["demonstrations"] == result.demonstrations
    assert len((folder / "demonstrations.jsonl").read_text().splitlines()) == 2
    examples = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    # A first step's prompt holds no tool output (no nonce): the demonstration's is the rollout's, message for message.
    assert examples[0]["messages"] == llm.requests[0]["messages"]
    assert [json.loads(e["completion"]) for e in examples[:2]] == [
        {"tool": "country_facts", "arguments": {"country": "France"}},
        {"final_answer": "The capital of France is Paris."},
    ]
    with pytest.raises(ValueError, match="--demonstrations needs a tool_runner"):
        TrainJob(
            settings, data_dir=config.data_dir, default_model_path=str(tiny), default_model_id="tiny",
            channel=planner.channel, tools=fakes, journal=planner.servicer.store,
        )  # fmt: skip

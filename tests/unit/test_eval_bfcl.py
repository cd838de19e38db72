"""BFCL simple as a trainable suite: the fixed split (a function on one side only), the reference solutions built from
the possible answers, one tool name per signature, and the registration of the functions and the tasks' agents
through the planner (a regenerated suite's renamed function reaches the agents that exist already)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from meshpilot.planner.v1 import agents_pb2
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import load_config
from services.eval import ToolCalled, Trajectory, load_suite
from services.eval.bfcl import (
    SOURCE,
    acknowledgement,
    convert_bfcl,
    first_values,
    functions,
    has_functions,
    prepare_bfcl,
    split_by_function,
    task_number,
    tool_name,
)
from services.eval.checks import ToolCallRecord
from services.eval.suite import EvalTask, Suite
from services.planner.types import ToolOutcome, ToolSpec
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM


def question(number: int, function: str, properties: dict, required: list[str], text: str = "Do it.") -> str:
    parameters = {"type": "dict", "properties": properties, "required": required}
    return json.dumps(
        {
            "id": f"simple_python_{number}",
            "question": [[{"role": "user", "content": text}]],
            "function": [{"name": function, "description": f"{function} does it.", "parameters": parameters}],
        }
    )


def answer(number: int, function: str, arguments: dict) -> str:
    return json.dumps({"id": f"simple_python_{number}", "ground_truth": [{function: arguments}]})


INTEGER, STRING = {"type": "integer"}, {"type": "string"}


def test_a_function_stays_on_the_side_its_lowest_task_number_gives_odd_train_even_test() -> None:
    pairs = [("simple_python_0", "area"), ("simple_python_1", "gcd"), ("simple_python_2", "gcd")]
    pairs += [("simple_python_3", "bmi"), ("simple_python_4", "area"), ("simple_python_9", "bmi")]
    assert split_by_function(pairs) == {
        "simple_python_0": "test", "simple_python_4": "test",  # area: first at 0
        "simple_python_1": "train", "simple_python_2": "train",  # gcd: first at 1, so 2 goes with it
        "simple_python_3": "train", "simple_python_9": "train",
    }  # fmt: skip
    assert task_number("simple_python_12") == 12
    with pytest.raises(ValueError, match=r"BFCL task id 'simple_python' does not end in _<number>"):
        task_number("simple_python")


def test_a_solution_takes_each_arguments_first_possible_value_and_leaves_out_what_bfcl_lets_be_omitted() -> None:
    schema = {
        "required": ["number", "formatted", "where"],
        "properties": {"where": {"properties": {"school": STRING}}, "rows": {"items": {"properties": {}}}},
    }
    possible = {
        "number": [450, 451],
        "unit": ["units", ""],  # optional, may be omitted: left out
        "formatted": [True, ""],  # may be omitted, but the schema requires it: its first other value
        "limit": [],  # no values: anything goes, left out
        "where": [{"department": ["Science"], "school": ["Bluebird High School", "Bluebird HS"], "year": ["", 9]}],
        "rows": [[{"field": ["age"], "value": ["25"]}, {"field": ["job"], "value": ["engineer"]}]],
        "cards": [[["A of spades", "K of spades"]]],
    }
    assert first_values(possible, schema) == {
        "number": 450,
        "formatted": True,
        "where": {"department": "Science", "school": "Bluebird High School"},
        "rows": [{"field": "age", "value": "25"}, {"field": "job", "value": "engineer"}],
        "cards": [["A of spades", "K of spades"]],
    }


def test_a_function_name_with_several_signatures_gets_a_tool_name_each_on_one_side_of_the_split() -> None:
    questions = [
        question(1, "calculate_bmi", {"weight": INTEGER}, ["weight"]),
        question(2, "area", {"base": INTEGER}, ["base"]),
        question(3, "calculate_BMI", {"weight": INTEGER, "unit": STRING}, ["weight"]),  # another signature
        question(4, "calculate_bmi", {"weight": INTEGER}, ["weight"]),  # the first signature again
    ]
    answers = [
        answer(1, "calculate_bmi", {"weight": [70]}),
        answer(2, "area", {"base": [10]}),
        answer(3, "calculate_BMI", {"weight": [80], "unit": ["metric", ""]}),
        answer(4, "calculate_bmi", {"weight": [90]}),
    ]
    tasks = convert_bfcl("\n".join(questions), "\n".join(answers))
    assert [(t.id, t.meta["tool"]["name"], t.split) for t in tasks] == [
        ("simple_python_1", "calculate_bmi", "train"),
        ("simple_python_2", "area", "test"),
        ("simple_python_3", "calculate_bmi_2", "train"),  # the name's tasks start at 1: train, as 4 is
        ("simple_python_4", "calculate_bmi", "train"),
    ]
    assert [t.checks[0].tool for t in tasks] == [f"bfcl.{t.meta['tool']['name']}" for t in tasks]
    assert tasks[2].meta["solution"] == [{"tool": "bfcl.calculate_bmi_2", "arguments": {"weight": 80}}]
    assert set(functions(Suite("s", tuple(tasks)))) == {"calculate_bmi", "calculate_bmi_2", "area"}
    with pytest.raises(ValueError, match=r"simple_python_2: the answer calls volume, the task offers area"):
        convert_bfcl(questions[1], answer(2, "volume", {"base": [10]}))


SHIPPED = load_suite("bfcl-simple")


def test_the_shipped_split_keeps_every_function_on_one_side_and_every_task_has_a_solution_its_check_passes() -> None:
    splits = {split: [t for t in SHIPPED.tasks if t.split == split] for split in ("train", "test")}
    assert {split: len(tasks) for split, tasks in splits.items()} == {"train": 194, "test": 206}
    sides: dict[str, set[str]] = {}
    for task in SHIPPED.tasks:
        sides.setdefault(tool_name(task.meta["function"]), set()).add(task.split)
    assert all(len(side) == 1 for side in sides.values()), [f for f, side in sides.items() if len(side) > 1]
    listed = functions(SHIPPED)
    assert len(listed) == 400  # BFCL repeats 27 function names with other signatures: each has its own tool name
    failing = []
    for task in SHIPPED.tasks:
        (check,) = task.checks
        (step,) = task.meta["solution"]
        assert isinstance(check, ToolCalled) and step["tool"] == check.tool == f"{SOURCE}.{task.meta['tool']['name']}"
        assert listed[task.meta["tool"]["name"]] == task.meta["tool"]
        if not check.evaluate(Trajectory("", (ToolCallRecord(step["tool"], step["arguments"]),))).passed:
            failing.append(task.id)
    # Dict arguments (and lists of dicts: simple_python_89, 94, 96, 260, 337) are checked field by field in BFCL's form.
    assert failing == []
    assert has_functions(SHIPPED) and not has_functions(load_suite("kg-test"))


class RecordingToolSources(tools_pb2_grpc.ToolsServiceServicer):
    """The tools service's RegisterToolSource as the planner forwards it: recorded; a name registered before is
    ALREADY_EXISTS, as the tools service answers."""

    def __init__(self) -> None:
        self.registered: list[tools_pb2.ToolSource] = []

    async def RegisterToolSource(self, request, context):
        if any(source.name == request.source.name for source in self.registered):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"tool source {request.source.name} exists")
        self.registered.append(request.source)
        return request.source

    async def ListToolSources(self, request, context):
        return tools_pb2.ListToolSourcesResponse(sources=self.registered)

    async def UnregisterToolSource(self, request, context):
        self.registered = [source for source in self.registered if source.name != request.name]
        return tools_pb2.UnregisterToolSourceResponse()


@asynccontextmanager
async def tool_sources() -> AsyncIterator[tuple[RecordingToolSources, int]]:
    """A tools service that only registers sources, on a free port: (its servicer, the port)."""
    server = grpc.aio.server()
    servicer = RecordingToolSources()
    tools_pb2_grpc.add_ToolsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(0)


class FunctionTools(FakeTools):
    """FakeTools that also lists the BFCL functions of ``tasks`` (as the tools service lists the source's tools) and
    acknowledges their calls as the MCP server does."""

    def __init__(self, tasks: tuple[EvalTask, ...]) -> None:
        super().__init__()
        listed = functions(Suite("bfcl", tasks)).values()
        self.tools += [ToolSpec(f"{SOURCE}.{f['name']}", f["description"], f["input_schema"]) for f in listed]

    async def _run(self, name: str, arguments: dict) -> ToolOutcome:
        if name.startswith(f"{SOURCE}."):
            return ToolOutcome(result=acknowledgement(name.removeprefix(f"{SOURCE}."), arguments), duration_s=0.01)
        return await super()._run(name, arguments)


async def test_the_functions_are_registered_once_and_an_agent_whose_function_was_renamed_gets_it(tmp_path) -> None:
    tasks = tuple(SHIPPED.tasks[:3])
    async with tool_sources() as (sources, port):
        config = load_config(
            data_dir=str(tmp_path / "data"), planner={"server": {"port": 0}}, tools={"server": {"port": port}}
        )
        async with Planner(config, ScriptedLLM([]), FunctionTools(tasks)) as planner:
            stale = agents_pb2.AgentSpec(instructions="Call it.", tools=[f"{SOURCE}.{tasks[1].meta['tool']['name']}"])
            await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name=tasks[0].agent, spec=stale))
            suite = Suite("bfcl-simple", tasks, SHIPPED.path)
            assert SHIPPED.path is not None
            assert await prepare_bfcl(planner.channel, suite, SHIPPED.path) == 3  # two made, one brought up to date
            assert await prepare_bfcl(planner.channel, suite, SHIPPED.path) == 0  # nothing left to change
            agents = [await planner.agents.GetAgent(agents_pb2.GetAgentRequest(name=t.agent)) for t in tasks]
    assert [list(a.spec.tools) for a in agents] == [[f"{SOURCE}.{t.meta['tool']['name']}"] for t in tasks]
    assert agents[0].spec.instructions == "Call it." and agents[0].version == 2  # its own spec, the tool fixed
    (source,) = sources.registered
    assert (source.name, list(source.mcp.args)) == (SOURCE, ["-m", "services.eval.bfcl", str(Path(SHIPPED.path))])


async def test_a_source_registered_for_another_suite_file_is_registered_again_for_this_one(tmp_path) -> None:
    # Evaluating a subset of the suite first registered the source for the subset's file: the next suite's agents
    # named functions the source did not offer (INVALID_ARGUMENT: unknown tool).
    tasks = tuple(SHIPPED.tasks[:2])
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(task.to_json()) + "\n" for task in tasks[:1]))
    async with tool_sources() as (sources, port):
        config = load_config(
            data_dir=str(tmp_path / "data"), planner={"server": {"port": 0}}, tools={"server": {"port": port}}
        )
        async with Planner(config, ScriptedLLM([]), FunctionTools(tasks)) as planner:
            await prepare_bfcl(planner.channel, Suite("subset", tasks[:1], subset), subset)
            assert SHIPPED.path is not None
            await prepare_bfcl(planner.channel, Suite("bfcl-simple", tasks, SHIPPED.path), SHIPPED.path)
            await prepare_bfcl(planner.channel, Suite("bfcl-simple", tasks, SHIPPED.path), SHIPPED.path)
    (source,) = sources.registered
    assert list(source.mcp.args) == ["-m", "services.eval.bfcl", str(Path(SHIPPED.path))]

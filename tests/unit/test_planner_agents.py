"""AgentService over gRPC (in-process planner, fake model and tools): versions, checks, the built-in agent, and runs
that name an agent."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from google.protobuf import empty_pb2

from meshpilot.planner.v1 import agents_pb2, planner_pb2
from services.common import load_config
from services.planner.agents import LIMITS
from services.planner.prompt import DEFAULT_INSTRUCTIONS
from services.planner.types import Sampling, ToolSpec
from tests.unit.planner_fakes import CALCULATOR, COUNTRY_FACTS, FakeTools, Planner, ScriptedLLM, answer

APPEND_NOTE = ToolSpec(
    "append_note",
    "Appends a note.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
)
TUTOR = "You are a terse geography tutor."


@pytest.fixture
def config(tmp_path):
    # No metrics endpoint: closing it waits out its HTTP server's 0.5 s poll, the bulk of a test here.
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})


def planner(config, outputs: list[str] | None = None, tools: list[ToolSpec] | None = None) -> Planner:
    return Planner(config, ScriptedLLM(outputs or [], models=("tiny", "big")), FakeTools(tools))


def spec(instructions: str = TUTOR, **fields) -> agents_pb2.AgentSpec:
    return agents_pb2.AgentSpec(instructions=instructions, **fields)


async def create(p: Planner, name: str = "tutor", definition: agents_pb2.AgentSpec | None = None) -> agents_pb2.Agent:
    return await p.agents.CreateAgent(agents_pb2.CreateAgentRequest(name=name, spec=definition or spec()))


async def run(p: Planner, agent: str, version: int = 0) -> list[planner_pb2.RunEvent]:
    request = planner_pb2.RunRequest(task="What is the capital of France?", agent=agent, agent_version=version)
    return [event async for event in p.stub.Run(request)]


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def offered_tools(schema: dict) -> list[str]:
    return [o["properties"]["tool"]["const"] for o in schema["anyOf"] if "tool" in o["properties"]]


async def test_an_agent_is_created_read_updated_listed_and_deleted(config) -> None:
    async with planner(config) as p:
        created = await create(p, definition=spec(tools=["country_facts"]))
        latest = await p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor"))
        updated = await p.agents.UpdateAgent(
            agents_pb2.UpdateAgentRequest(name="tutor", spec=spec("You are a patient tutor.", tools=["*"]))
        )
        first = await p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor", version=1))
        listed = await p.agents.ListAgents(agents_pb2.ListAgentsRequest())
        deleted = await p.agents.DeleteAgent(agents_pb2.DeleteAgentRequest(name="tutor"))
        gone = await refused(p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor")))
        left = await p.agents.ListAgents(agents_pb2.ListAgentsRequest())

    assert (created.name, created.version, created.builtin) == ("tutor", 1, False)
    assert created.create_time.ToNanoseconds() > 0
    assert (created.spec.instructions, list(created.spec.tools)) == (TUTOR, ["country_facts"])
    # Zero options are stored as the defaults they select.
    assert (created.spec.policy.name, created.spec.policy.max_parallel_tool_calls) == ("guided", 4)
    assert created.spec.sampling.top_p == 1.0
    assert latest == created
    assert (updated.version, updated.spec.instructions, list(updated.spec.tools)) == (
        2,
        "You are a patient tutor.",
        ["*"],
    )
    assert first == created
    assert [(a.name, a.version, a.builtin) for a in listed.agents] == [("default", 1, True), ("tutor", 2, False)]
    assert deleted == empty_pb2.Empty()
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert [a.name for a in left.agents] == ["default"]


def with_value(path: str, value: float) -> agents_pb2.AgentSpec:
    """A valid spec with the number at ``path`` (a field of agents.LIMITS) set to ``value``."""
    definition = spec()
    if path == "budget.timeout_seconds":
        definition.budget.timeout.FromNanoseconds(int(value * 1e9))
    elif "." in path:
        section, name = path.split(".")
        setattr(getattr(definition, section), name, value)
    else:
        setattr(definition, path, value)
    return definition


@pytest.mark.parametrize(
    ("name", "definition", "message"),
    [
        pytest.param("Tutor", spec(), "name 'Tutor' must be lowercase letters, digits and '-'", id="uppercase name"),
        pytest.param("9lives", spec(), "name '9lives' must be lowercase", id="name starts with a digit"),
        pytest.param("a" * 64, spec(), "at most 63 characters", id="long name"),
        pytest.param("tutor", spec(""), "spec.instructions is empty", id="no instructions"),
        pytest.param("tutor", spec(" \n "), "spec.instructions is empty", id="blank instructions"),
        pytest.param("tutor", spec("x" * 8001), "spec.instructions has 8001 characters; shorten it to 8000",
                     id="long instructions"),
        pytest.param("tutor", spec(tools=["country_facts", "weather"]),
                     "spec.tools[1]: unknown tool 'weather'; registered tools: calculator, country_facts",
                     id="unknown tool"),
        pytest.param("tutor", spec(approval_required=["weather"]), "spec.approval_required[0]: unknown tool 'weather'",
                     id="unknown approval tool"),
        pytest.param("tutor", spec(approval_required=["*"]), "spec.approval_required[0]: unknown tool '*'",
                     id="approval for every tool"),
        pytest.param("tutor", spec(model="huge"), "spec.model 'huge' is not served; use one of: tiny, big",
                     id="unknown model"),
        pytest.param("tutor", spec(policy=agents_pb2.PolicySpec(name="magic")),
                     "spec.policy.name 'magic' is not a policy; choose one of: guided, react, plan_execute",
                     id="unknown policy"),
        pytest.param("tutor", spec(sampling=agents_pb2.AgentSampling(temperature=math.nan)),
                     "spec.sampling.temperature is nan", id="NaN temperature"),
        pytest.param("tutor", spec(sampling=agents_pb2.AgentSampling(top_p=1.25)),
                     "spec.sampling.top_p is 1.25; use a value from 0 to 1", id="fractional top_p"),
    ],
)  # fmt: skip
async def test_a_bad_definition_is_invalid_and_names_the_field(config, name, definition, message) -> None:
    async with planner(config) as p:
        error = await refused(create(p, name, definition))
        listed = await p.agents.ListAgents(agents_pb2.ListAgentsRequest())

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert [a.name for a in listed.agents] == ["default"]


@pytest.mark.parametrize(
    ("path", "low", "high", "value"),
    [
        pytest.param(path, low, high, value, id=f"{path}={value}")
        for path, low, high in LIMITS
        for value in (low - 1, high + 1)
    ],
)
async def test_a_number_out_of_range_is_invalid_and_says_the_range(config, path, low, high, value) -> None:
    async with planner(config) as p:
        error = await refused(create(p, definition=with_value(path, value)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"spec.{path} is {value}; use a value from {low} to {high}" in error.details()


async def test_an_update_is_checked_like_a_creation(config) -> None:
    async with planner(config) as p:
        await create(p)
        error = await refused(
            p.agents.UpdateAgent(agents_pb2.UpdateAgentRequest(name="tutor", spec=spec(tools=["weather"])))
        )
        latest = await p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor"))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.tools[0]: unknown tool 'weather'" in error.details()
    assert latest.version == 1


async def test_creating_an_agent_twice_already_exists(config) -> None:
    async with planner(config) as p:
        await create(p)
        error = await refused(create(p, definition=spec("Another.")))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "agent 'tutor' exists; update it to make a new version" in error.details()


async def test_unknown_agents_and_versions_are_not_found(config) -> None:
    async with planner(config) as p:
        await create(p)
        errors = [
            await refused(p.agents.GetAgent(agents_pb2.GetAgentRequest(name="nope"))),
            await refused(p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor", version=2))),
            await refused(p.agents.UpdateAgent(agents_pb2.UpdateAgentRequest(name="nope", spec=spec()))),
            await refused(p.agents.DeleteAgent(agents_pb2.DeleteAgentRequest(name="nope"))),
        ]
        negative = await refused(p.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor", version=-1)))

    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND] * 4
    assert "version 2 of agent 'tutor' does not exist" in errors[1].details()
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_built_in_agent_cannot_be_changed_and_has_one_version(config) -> None:
    async with planner(config) as p:
        created = await refused(create(p, "default"))
        updated = await refused(p.agents.UpdateAgent(agents_pb2.UpdateAgentRequest(name="default", spec=spec())))
        deleted = await refused(p.agents.DeleteAgent(agents_pb2.DeleteAgentRequest(name="default")))
        version_2 = await refused(p.agents.GetAgent(agents_pb2.GetAgentRequest(name="default", version=2)))
        builtin = await p.agents.GetAgent(agents_pb2.GetAgentRequest(name="default"))

    assert [e.code() for e in (created, updated, deleted)] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "built-in agent" in created.details() and "pick another name" in created.details()
    assert "the built-in agent cannot be deleted" in deleted.details()
    assert version_2.code() == grpc.StatusCode.NOT_FOUND
    assert (builtin.version, builtin.builtin, builtin.spec.instructions) == (1, True, DEFAULT_INSTRUCTIONS)


async def test_a_run_of_an_agent_uses_its_instructions_model_tools_policy_and_sampling(config) -> None:
    definition = spec(
        model="big",
        tools=["country_facts"],
        policy=agents_pb2.PolicySpec(name="react", max_parallel_tool_calls=2),
        sampling=agents_pb2.AgentSampling(temperature=0.5, top_p=0.75, seed=7, step_max_tokens=99),
    )
    final = json.dumps({"thought": "I know it.", "final_answer": "Paris"})
    async with planner(config, [final]) as p:
        await create(p, definition=definition)
        events = await run(p, "tutor")
        stored = await p.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))

    request = p.llm.requests[0]
    assert request["messages"][0]["content"].startswith(TUTOR)
    assert (request["model"], request["sampling"], request["max_tokens"]) == ("big", Sampling(0.5, 0.75, 7), 99)
    tool_calls = request["schema"]["anyOf"][0]["properties"]["tool_calls"]  # the react schema
    assert tool_calls["maxItems"] == 2
    assert [o["properties"]["tool"]["const"] for o in tool_calls["items"]["anyOf"]] == ["country_facts"]
    assert events[-1].final_answer.answer == "Paris"
    assert (stored.agent, stored.agent_version) == ("tutor", 1)
    p.llm.assert_consumed()


async def test_a_run_may_name_an_older_version_of_its_agent(config) -> None:
    async with planner(config, [answer("One."), answer("Two.")], tools=[]) as p:
        await create(p, definition=spec("You are version one."))
        await p.agents.UpdateAgent(agents_pb2.UpdateAgentRequest(name="tutor", spec=spec("You are version two.")))
        older = await run(p, "tutor", version=1)
        latest = await run(p, "tutor")
        runs = [await p.stub.GetRun(planner_pb2.GetRunRequest(run_id=e[0].run_id)) for e in (older, latest)]

    systems = [r["messages"][0]["content"] for r in p.llm.requests]
    assert systems[0].startswith("You are version one.") and systems[1].startswith("You are version two.")
    assert [(r.agent, r.agent_version, r.answer) for r in runs] == [("tutor", 1, "One."), ("tutor", 2, "Two.")]


async def test_runs_of_a_deleted_agent_keep_naming_it(config) -> None:
    async with planner(config, [answer("Hi.")], tools=[]) as p:
        await create(p)
        events = await run(p, "tutor")
        await p.agents.DeleteAgent(agents_pb2.DeleteAgentRequest(name="tutor"))
        stored = await p.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))
        error = await refused(run(p, "tutor"))

    assert (stored.agent, stored.agent_version, stored.answer) == ("tutor", 1, "Hi.")
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_run_of_an_unknown_agent_or_version_is_not_found_before_anything_runs(config) -> None:
    async with planner(config) as p:
        await create(p)
        unknown = await refused(run(p, "nope"))
        version = await refused(run(p, "tutor", version=5))
        negative = await refused(run(p, "tutor", version=-1))
        listed = await p.stub.ListRuns(planner_pb2.ListRunsRequest())

    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "agent 'nope' does not exist" in unknown.details()
    assert version.code() == grpc.StatusCode.NOT_FOUND
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(listed.runs) == [] and p.llm.requests == []


async def test_the_default_agent_calls_only_the_configured_default_tools(config) -> None:
    async with planner(config, [answer("Paris"), answer("Noted")], [COUNTRY_FACTS, APPEND_NOTE, CALCULATOR]) as p:
        builtin = await p.agents.GetAgent(agents_pb2.GetAgentRequest(name="default"))
        await create(p, "scribe", spec(tools=["*"]))
        await run(p, "")
        await run(p, "scribe")

    assert list(builtin.spec.tools) == config.planner.default_agent_tools
    assert "append_note" not in config.planner.default_agent_tools
    assert offered_tools(p.llm.requests[0]["schema"]) == ["country_facts", "calculator"]
    assert p.llm.requests[0]["messages"][0]["content"].startswith(DEFAULT_INSTRUCTIONS)
    # An agent that allows every tool is offered append_note too.
    assert offered_tools(p.llm.requests[1]["schema"]) == ["country_facts", "append_note", "calculator"]


async def test_an_agents_budget_is_the_default_of_its_runs(config) -> None:
    async with planner(config, [answer("Paris")]) as p:
        await create(p, definition=spec(budget=agents_pb2.AgentBudget(max_steps=1, max_tokens=50)))
        events = await run(p, "tutor")

    # The answer came with 110 tokens, over the agent's 50: the run fails instead of answering.
    assert events[-1].error.code == "RESOURCE_EXHAUSTED"
    assert "max_tokens=50" in events[-1].error.message


def example(task: str = "What is the capital of Peru?", tool: str = "country_facts", arguments=None, **fields):
    item = agents_pb2.AgentExample(task=task, tool=tool, **fields)
    item.arguments.update({"country": "Peru"} if arguments is None else arguments)
    return item


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        pytest.param([example(tool="weather")], "spec.examples[0].tool 'weather' is not a registered tool this agent may call",
                     id="unknown tool"),
        pytest.param([example(), example(tool="calculator", arguments={"expression": "1+1"})],
                     "spec.examples[1].tool 'calculator' is not a registered tool this agent may call",
                     id="tool the agent may not call"),
        pytest.param([example(arguments={"nation": "Peru"})],
                     "spec.examples[0].arguments does not fit tool 'country_facts': 'country' is a required property",
                     id="arguments break the schema"),
        pytest.param([example(arguments={"country": 7})], "spec.examples[0].arguments.country does not fit tool",
                     id="argument of the wrong type"),
        pytest.param([example(task=" ")], "spec.examples[0].task is empty", id="no task"),
        pytest.param([example(task="x" * 501)], "spec.examples[0].task has 501 characters; shorten it to 500",
                     id="long task"),
        pytest.param([example(answer="y" * 501)], "spec.examples[0].answer has 501 characters", id="long answer"),
        pytest.param([example(arguments={"country": "Peru", "note": "z" * 3000})],
                     "spec.examples[0].arguments is 30", id="huge arguments"),
        pytest.param([example()] * 9, "spec.examples has 9 examples; at most 8", id="too many"),
    ],
)  # fmt: skip
async def test_a_bad_example_is_invalid_and_names_the_field(config, examples, message) -> None:
    async with planner(config) as p:
        error = await refused(create(p, definition=spec(tools=["country_facts"], examples=examples)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert len(error.details()) < 600


async def test_an_agents_examples_are_kept_and_shown_to_the_model_before_the_built_in_ones(config) -> None:
    observation = {"capital": "Lima", "country": "Peru"}
    shown = example(answer="The capital of Peru is Lima.")
    shown.observation.struct_value.update(observation)
    definition = spec(
        tools=["country_facts"], examples=[shown, example("Where is Chile?", arguments={"country": "Chile"})]
    )
    async with planner(config, [answer("Paris.")]) as p:
        created = await create(p, definition=definition)
        events = await run(p, "tutor")

    assert list(created.spec.examples) == list(definition.examples)
    system = p.llm.requests[0]["messages"][0]["content"]
    peru = system.index(
        'User: What is the capital of Peru?\nAssistant: {"tool": "country_facts", "arguments": {"country": "Peru"}}'
    )
    observed = system.index('{"capital": "Lima", "country": "Peru"}', peru)
    answered = system.index('Assistant: {"final_answer": "The capital of Peru is Lima."}', observed)
    chile = system.index(
        'User: Where is Chile?\nAssistant: {"tool": "country_facts", "arguments": {"country": "Chile"}}\n\n'
    )
    assert peru < observed < answered < chile
    # The agent's own examples come before the built-in one of the same tool.
    assert system.index("Where is Chile?") < system.index("Which currency is used in Sweden?")
    assert events[-1].final_answer.answer == "Paris."


async def test_an_agent_without_the_builtin_examples_shows_only_its_own_and_keeps_the_setting(config) -> None:
    own = example("Where is Chile?", arguments={"country": "Chile"})
    definition = spec(tools=["country_facts"], examples=[own], builtin_examples=False)
    async with planner(config, [answer("Paris."), answer("Paris.")]) as p:
        created = await create(p, definition=definition)
        await run(p, "tutor")
        await create(p, "with-them", definition=spec(tools=["country_facts"], examples=[own]))
        await run(p, "with-them")

    assert created.spec.HasField("builtin_examples") and not created.spec.builtin_examples
    lean, full = (request["messages"][0]["content"] for request in p.llm.requests)
    assert "Where is Chile?" in lean and "Which currency is used in Sweden?" not in lean
    assert "Where is Chile?" in full and "Which currency is used in Sweden?" in full

"""Rollouts through an in-process planner (scripted model, fake tools) become training examples whose prompts are
exactly the chats the model was sent, step by step; reward filtering keeps each task's best verified rollouts."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from meshpilot.planner.v1 import agents_pb2, planner_pb2_grpc, tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2
from services.common import load_config
from services.eval import Contains, EvalTask, PlannerRunner, Unanswerable
from services.planner.convert import definition_from_proto
from services.train import ExampleError, Rollout, StepExample, select_rollouts, step_examples
from services.train.examples import react_action, student_examples
from services.train.rollouts import (
    PlannerToolLister,
    collect_rollouts,
    prepare_rollout_agents,
    read_rollouts,
    rollout_agent_name,
)
from tests.unit.planner_fakes import COUNTRY_FACTS, FakeTools, Planner, ScriptedLLM, answer, call

FRANCE = EvalTask("capital-FR", "What is the capital of France?", (Contains(("Paris",)),), "one_hop", "train")
ZORVANIA = EvalTask("capital-ZV", "What is the capital of Zorvania?", (Unanswerable(),), "unanswerable", "train")


@pytest.fixture
def config(tmp_path: Path):
    return load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0}, "default_agent_tools": ["country_facts", "calculator"]}
    )


def rollout(task_id: str, attempt: int, *, reward: float = 1.0, steps: int = 2, calls: int = 1, valid: int = 1,
            error: str = "") -> Rollout:  # fmt: skip
    return Rollout(task_id, "one_hop", attempt, f"run-{task_id}-{attempt}", reward, reward == 1.0 and not error,
                   steps, calls, valid, "answer", error, {1: "{}"}, "")  # fmt: skip


async def test_rollouts_become_examples_with_the_exact_prompts_the_model_was_sent(config, tmp_path: Path) -> None:
    outputs = [
        call("country_facts", country="France"), answer("The capital of France is Paris."),  # attempt 0
        call("country_facts", country="Francia"), call("country_facts", country="France"),   # attempt 1: 3 steps
        answer("The capital of France is Paris."),
    ]  # fmt: skip
    llm, tools = ScriptedLLM(outputs), FakeTools()
    async with Planner(config, llm, tools) as planner:
        agents = await prepare_rollout_agents(
            planner.channel, base="", model="", job="t", attempts=2, temperature=0.5, seed=100
        )
        assert agents == [rollout_agent_name("t", 0), rollout_agent_name("t", 1)]
        path = tmp_path / "rollouts.jsonl"
        runner = PlannerRunner(planner_pb2_grpc.PlannerServiceStub(planner.channel))
        store = planner.servicer.store
        rollouts = await collect_rollouts([FRANCE], agents, runner, store, path, concurrency=1, timeout_s=30)
        llm.assert_consumed()
        # Every attempt sampled as its agent says: temperature 0.5, seed 100 + attempt.
        assert {(r["sampling"].temperature, r["sampling"].seed) for r in llm.requests} == {(0.5, 100), (0.5, 101)}

    assert [(r.attempt, r.passed, r.steps) for r in rollouts] == [(0, True, 2), (1, True, 3)]
    assert rollouts[1].valid_call_rate == 1.0  # a call that found nothing is still a valid call
    assert read_rollouts(path) == {(FRANCE.id, 0): rollouts[0], (FRANCE.id, 1): rollouts[1]}

    examples = [example for r in rollouts for example in step_examples(r, tools.tools)]
    assert [e.messages for e in examples] == [request["messages"] for request in llm.requests]
    assert [e.completion for e in examples] == outputs
    assert [(e.run_id, e.step) for e in examples][:2] == [(rollouts[0].run_id, 1), (rollouts[0].run_id, 2)]
    # The second step's prompt holds the observation fenced with the run's own nonce.
    assert "<data-" in examples[1].messages[-1]["content"] and "Paris" in examples[1].messages[-1]["content"]
    assert StepExample.from_json(examples[1].to_json()) == examples[1]


async def test_collected_attempts_are_not_run_again(config, tmp_path: Path) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        agents = await prepare_rollout_agents(
            planner.channel, base="", model="", job="t", attempts=1, temperature=0.7, seed=0
        )
        runner = PlannerRunner(planner_pb2_grpc.PlannerServiceStub(planner.channel))
        path = tmp_path / "rollouts.jsonl"
        first = await collect_rollouts(
            [FRANCE], agents, runner, planner.servicer.store, path, concurrency=1, timeout_s=30
        )
        again = await collect_rollouts(
            [FRANCE], agents, runner, planner.servicer.store, path, concurrency=1, timeout_s=30
        )
    llm.assert_consumed()  # two model calls in all: the second collection ran nothing
    assert again == first and len(path.read_text().splitlines()) == 1


def test_a_torn_last_line_is_run_again(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    path.write_text(rollout("a", 0).to_json() + "\n" + rollout("a", 1).to_json()[:40])
    assert set(read_rollouts(path)) == {("a", 0)}


def test_reward_filtering_keeps_each_tasks_best_verified_rollouts() -> None:
    rollouts = [
        rollout("a", 0, steps=3),
        rollout("a", 1, steps=2),  # best of a: passed in fewer steps
        rollout("a", 2, steps=2),  # as good: the earlier attempt wins the tie
        rollout("b", 0, reward=0.5),  # half the checks: below min_reward
        rollout("b", 1, calls=2, valid=1),  # a rejected call
        rollout("c", 0, error="DEADLINE_EXCEEDED: time budget ran out"),
        rollout("d", 0, reward=0.5, steps=2),
        rollout("d", 1, reward=0.5, steps=4),
    ]
    chosen = select_rollouts(rollouts, min_reward=1.0, keep_per_task=1)
    assert [(r.task_id, r.attempt) for r in chosen] == [("a", 1)]
    two = select_rollouts(rollouts, min_reward=0.5, keep_per_task=2)
    assert [(r.task_id, r.attempt) for r in two] == [("a", 1), ("a", 2), ("b", 0), ("d", 0), ("d", 1)]


async def test_a_plan_execute_agents_rollouts_are_refused_naming_the_policy(config, tmp_path: Path) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run()
        record = await planner.servicer.store.get_run(events[0].run_id, tenant=None)
    snapshot = json.loads(record.snapshot)
    snapshot["agent"]["spec"]["policy"] = "plan_execute"
    planned = Rollout(
        FRANCE.id, "one_hop", 0, record.run_id, 1.0, True, 2, 1, 1, "", "", {1: "{}"}, json.dumps(snapshot)
    )
    with pytest.raises(ExampleError, match=r"plan_execute policy.*guided, react"):
        step_examples(planned, FakeTools().tools)


def without_nonces(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": re.sub(r"data-[0-9a-f]{12}>", "data-NONCE>", m["content"])} for m in messages]


async def test_a_guided_run_teaches_a_react_agent_what_it_would_have_been_sent(config) -> None:
    """The student's examples are the chats a react agent is sent when it acts as the guided agent did."""
    guided = [call("country_facts", country="France"), answer("The capital of France is Paris.")]
    react = [react_action(text) for text in guided]
    llm, tools = ScriptedLLM([*guided, *react]), FakeTools()
    async with Planner(config, llm, tools) as planner:
        spec = (await planner.agents.GetAgent(agents_pb2.GetAgentRequest(name="default"))).spec
        spec.policy.name = "react"
        spec.ClearField("examples")
        await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="free", spec=spec))
        agents = await prepare_rollout_agents(
            planner.channel, base="", model="", job="t", attempts=1, temperature=0.5, seed=0
        )
        runner = PlannerRunner(planner_pb2_grpc.PlannerServiceStub(planner.channel))
        (teacher,) = await collect_rollouts(
            [FRANCE], agents, runner, planner.servicer.store, config.data_dir / "r.jsonl", concurrency=1, timeout_s=30
        )
        events = await planner.run(FRANCE.task, agent="free")  # the react agent, acting as the guided one did
    llm.assert_consumed()
    assert events[-1].final_answer.answer == "The capital of France is Paris."

    student = definition_from_proto(spec)
    examples = student_examples(teacher, tools.tools, student)
    assert [e.completion for e in examples] == react
    sent = [request["messages"] for request in llm.requests[2:]]
    assert [without_nonces(e.messages) for e in examples] == [without_nonces(m) for m in sent]
    assert "Think step by step" in examples[0].messages[0]["content"]

    with pytest.raises(ExampleError, match=r"--student must be a react agent; this one runs the guided policy"):
        student_examples(teacher, tools.tools, dataclasses.replace(student, policy="guided"))


def test_guided_actions_in_the_react_format() -> None:
    assert json.loads(react_action(call("country_facts", country="Peru"))) == {
        "thought": "I look it up with country_facts.",
        "tool_calls": [{"tool": "country_facts", "arguments": {"country": "Peru"}}],
    }
    assert json.loads(react_action(answer("Lima.")))["final_answer"] == "Lima."
    with pytest.raises(ExampleError, match="is not JSON"):
        react_action('{"tool": "country_facts"')
    with pytest.raises(ExampleError, match="neither a tool call nor a final answer"):
        react_action('{"plan": []}')


class OneTool(tool_sources_pb2_grpc.ToolSourceServiceServicer):
    async def ListTools(self, request, context):
        schema = struct_pb2.Struct()
        schema.update(COUNTRY_FACTS.input_schema)
        tool = tools_pb2.Tool(name="country_facts", description="Facts about a country.", input_schema=schema)
        return tools_pb2.ListToolsResponse(tools=[tool])


async def test_the_tools_are_listed_through_the_planners_front_door() -> None:
    server = grpc.aio.server()
    tool_sources_pb2_grpc.add_ToolSourceServiceServicer_to_server(OneTool(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await PlannerToolLister(channel).list_tools() == [COUNTRY_FACTS]
    finally:
        await server.stop(0)

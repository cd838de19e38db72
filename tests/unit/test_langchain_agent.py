"""MeshPilotAgent against an in-process planner: answers, event streams, run errors, broken streams, auth, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from langchain_core.messages import AIMessage, HumanMessage

from meshpilot.langchain import AgentRunError, AuthenticationError, MeshPilotAgent
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import NotFoundError, UnavailableError


class ScriptedPlanner(planner_pb2_grpc.PlannerServiceServicer):
    """Run streams one tool call and a final answer; tasks "fail" and "cut" end with an error event or no last
    event; agent "secret" wants the key mpk_good, agent "missing" does not exist."""

    def __init__(self) -> None:
        self.requests: list[planner_pb2.RunRequest] = []

    def Run(self, request: planner_pb2.RunRequest, context: grpc.ServicerContext) -> Iterator[planner_pb2.RunEvent]:
        self.requests.append(request)
        if request.agent == "secret" and dict(context.invocation_metadata()).get("authorization") != "Bearer mpk_good":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "an API key is required")
        if request.agent == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no agent named 'missing'")
        ids = {"run_id": "run-1", "session_id": request.session_id or "session-1"}
        arguments = json_format.ParseDict({"name": "France"}, struct_pb2.Struct())
        yield planner_pb2.RunEvent(**ids, sequence=1, step_started=planner_pb2.StepStarted(step=1))
        yield planner_pb2.RunEvent(
            **ids,
            sequence=2,
            tool_call=planner_pb2.ToolCall(step=1, call_id="c1", tool="country_facts", arguments=arguments),
        )
        if request.task == "cut":
            return
        if request.task == "fail":
            error = planner_pb2.RunError(code="RESOURCE_EXHAUSTED", message="the run's token budget is spent")
            yield planner_pb2.RunEvent(**ids, sequence=3, error=error)
            return
        answer = planner_pb2.FinalAnswer(answer=f"Answer to: {request.task}")
        yield planner_pb2.RunEvent(**ids, sequence=3, final_answer=answer)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ScriptedPlanner, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = ScriptedPlanner()
    planner_pb2_grpc.add_PlannerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def planner(service: tuple[ScriptedPlanner, str]) -> ScriptedPlanner:
    service[0].requests.clear()
    return service[0]


@pytest.fixture
def agent(service: tuple[ScriptedPlanner, str]) -> MeshPilotAgent:
    return MeshPilotAgent(agent="geo", planner=service[1], agent_version=2, max_steps=4, timeout=20)


def test_invoke_returns_the_final_answer(agent: MeshPilotAgent, planner: ScriptedPlanner) -> None:
    assert agent.invoke("What is the capital of France?") == "Answer to: What is the capital of France?"
    request = planner.requests[0]
    assert (request.agent, request.agent_version, request.session_id) == ("geo", 2, "")
    assert request.budget.max_steps == 4 and request.budget.timeout.ToSeconds() == 20


def test_stream_yields_every_run_event_as_a_dict(agent: MeshPilotAgent, planner: ScriptedPlanner) -> None:
    events = list(agent.stream({"task": "Capital of France?", "session_id": "s-7"}))

    assert [event["type"] for event in events] == ["step_started", "tool_call", "final_answer"]
    assert [event["sequence"] for event in events] == [1, 2, 3]
    assert events[1]["tool_call"] == {
        "step": 1,
        "call_id": "c1",
        "tool": "country_facts",
        "arguments": {"name": "France"},
    }
    assert events[2]["final_answer"]["answer"] == "Answer to: Capital of France?"
    assert events[2]["session_id"] == "s-7" and events[2]["run_id"] == "run-1"
    assert planner.requests[0].session_id == "s-7"


async def test_ainvoke_and_astream(agent: MeshPilotAgent, planner: ScriptedPlanner) -> None:
    answer = await agent.ainvoke(HumanMessage("Capital of Peru?"))
    events = [event async for event in agent.astream([HumanMessage("first"), AIMessage("x"), HumanMessage("second")])]

    assert answer == "Answer to: Capital of Peru?"
    assert events[-1]["final_answer"]["answer"] == "Answer to: second"


def test_a_run_that_ends_in_error_raises_its_code(agent: MeshPilotAgent, planner: ScriptedPlanner) -> None:
    with pytest.raises(AgentRunError, match="run run-1 failed: RESOURCE_EXHAUSTED: the run's token budget") as caught:
        agent.invoke("fail")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and caught.value.run_id == "run-1"


async def test_a_stream_that_ends_before_the_last_event_says_how_to_follow_it(
    agent: MeshPilotAgent, planner: ScriptedPlanner
) -> None:
    with pytest.raises(UnavailableError, match=r"run run-1 ended before the run's last event.*runs watch run-1"):
        agent.invoke("cut")
    with pytest.raises(UnavailableError, match="runs watch run-1"):
        await agent.ainvoke("cut")


def test_planner_errors_name_what_to_change(service: tuple[ScriptedPlanner, str], planner: ScriptedPlanner) -> None:
    with pytest.raises(NotFoundError, match=r"planner at .*: no agent named 'missing'"):
        MeshPilotAgent(agent="missing", planner=service[1]).invoke("hi")
    with pytest.raises(AuthenticationError, match="an API key is required; pass api_key="):
        MeshPilotAgent(agent="secret", planner=service[1], api_key="mpk_bad").invoke("hi")
    assert MeshPilotAgent(agent="secret", planner=service[1], api_key="mpk_good").invoke("hi") == "Answer to: hi"


@pytest.mark.parametrize("bad", [42, {"question": "hi"}, [AIMessage("only an answer")], "   "])
def test_input_without_a_task_is_refused(agent: MeshPilotAgent, planner: ScriptedPlanner, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"MeshPilotAgent takes a task|the task is empty"):
        agent.invoke(bad)
    assert planner.requests == []


def test_the_default_planner_is_the_mesh_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPILOT_PLANNER__SERVER__PORT", "50151")
    assert MeshPilotAgent().planner == "127.0.0.1:50151"


def test_a_closed_agent_reopens_its_channel(agent: MeshPilotAgent, planner: ScriptedPlanner) -> None:
    assert agent.invoke("one") == "Answer to: one"
    agent.close()
    assert agent.invoke("two") == "Answer to: two"

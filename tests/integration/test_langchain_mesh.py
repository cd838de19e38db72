"""meshpilot.langchain against the mesh as real processes on the real default model: the chat model streams, structured
output validates, a tools-service tool runs, a MeshPilot agent answers, and a LangGraph graph answers a question."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel

from meshpilot.langchain import ChatMeshPilot, MeshPilotAgent, meshpilot_tools
from tests.integration.processes import ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICES = ("knowledge", "inference", "tools", "planner")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    """The four services as real processes (`meshpilot serve <name>`) on free ports."""
    processes = ServiceProcesses(tmp_path_factory.mktemp("mesh"), SERVICES)
    try:
        processes.start_all()
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def model(mesh: ServiceProcesses) -> Iterator[ChatMeshPilot]:
    chat = ChatMeshPilot(target=mesh.target("inference"), temperature=0, max_tokens=96)
    yield chat
    chat.close()


def test_the_chat_model_streams_text_and_usage(model: ChatMeshPilot) -> None:
    chunks = list(model.stream("Say hello in French."))

    text = "".join(str(chunk.content) for chunk in chunks)
    assert len(chunks) > 2 and text.strip()
    usage = chunks[-1].usage_metadata
    assert usage is not None and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert chunks[-1].response_metadata["finish_reason"] in ("stop", "length")


class Country(BaseModel):
    name: str
    capital: str


def test_structured_output_is_a_validated_object(model: ChatMeshPilot) -> None:
    country = model.with_structured_output(Country).invoke("What is the capital of France?")

    assert isinstance(country, Country)
    assert country.name.strip() and country.capital.strip()


def test_a_tool_of_the_tools_service_runs(mesh: ServiceProcesses) -> None:
    (country_facts,) = meshpilot_tools(mesh.target("tools"), names=["country_facts"])

    assert country_facts.args_schema["properties"]["name"]["type"] == "string"  # type: ignore[index]
    assert country_facts.invoke({"name": "France"})["capital"] == "Paris"


async def test_a_meshpilot_agent_answers_through_the_planner(mesh: ServiceProcesses) -> None:
    agent = MeshPilotAgent(planner=mesh.target("planner"), timeout=120)
    events = [event async for event in agent.astream("What currency is used in Japan?")]

    assert "tool_call" in [event["type"] for event in events]
    assert "yen" in events[-1]["final_answer"]["answer"].lower()


def test_a_langgraph_graph_answers_through_the_mesh(mesh: ServiceProcesses, model: ChatMeshPilot) -> None:
    tools = meshpilot_tools(mesh.target("tools"), names=["country_facts", "calculator"])

    # The question's first step must look a fact up (a 135M model left free sometimes answers from memory, wrongly);
    # after a tool result the model calls another tool or answers.
    first_step, next_steps = model.bind_tools(tools, tool_choice="required"), model.bind_tools(tools)

    def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        step = first_step if isinstance(state["messages"][-1], HumanMessage) else next_steps
        return {"messages": [step.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    result = graph.compile().invoke(
        {"messages": [HumanMessage("What is the capital of Kenya?")]}, {"recursion_limit": 8}
    )

    messages = result["messages"]
    calls = [call for m in messages if isinstance(m, AIMessage) for call in m.tool_calls]
    assert [call["name"] for call in calls][:1] == ["country_facts"]
    assert any(isinstance(m, ToolMessage) and "Nairobi" in str(m.content) for m in messages)
    assert "Nairobi" in str(messages[-1].content)

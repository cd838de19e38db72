"""A LangGraph graph of meshpilot.langchain components over in-process inference and tools services: the model's tool
call runs through ExecuteTool and the result reaches the model's next prompt as an observation."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from meshpilot.inference.v1 import inference_pb2_grpc
from meshpilot.langchain import ChatMeshPilot, meshpilot_tools
from meshpilot.tools.v1 import tools_pb2_grpc
from tests.unit.test_langchain_chat_model import ScriptedInference
from tests.unit.test_langchain_tools import RecordingTools


@pytest.fixture
def services() -> Iterator[tuple[ScriptedInference, RecordingTools, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference, tools = ScriptedInference(), RecordingTools()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    tools_pb2_grpc.add_ToolsServiceServicer_to_server(tools, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield inference, tools, f"127.0.0.1:{port}"
    server.stop(0)
    assert not inference.replies, f"scripted replies left unused: {inference.replies}"


async def test_a_graph_calls_a_mesh_tool_and_answers_from_its_result(
    services: tuple[ScriptedInference, RecordingTools, str],
) -> None:
    inference, tools_service, target = services
    inference.replies += ['{"tool": "calculator", "arguments": {"expression": "2+2"}}', '{"final_answer": "It is 4."}']
    tools = [tool for tool in meshpilot_tools(target) if tool.name == "calculator"]
    model = ChatMeshPilot(target=target, temperature=0).bind_tools(tools)

    async def call_model(state: MessagesState) -> dict[str, list[AIMessage]]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    result = await graph.compile().ainvoke({"messages": [HumanMessage("What is 2+2?")]})

    messages = result["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    assert messages[-1].content == "It is 4."
    assert [request.name for request in tools_service.requests] == ["calculator"]
    second_prompt = inference.requests[1].chat.messages[-1].content
    assert second_prompt.startswith("Observation: <data-") and '"result": 4' in second_prompt

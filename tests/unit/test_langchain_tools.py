"""meshpilot_tools against an in-process tools service: schemas, results, error observations, approvals, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from langchain_core.messages import ToolMessage
from langchain_core.tools import StructuredTool

from meshpilot.langchain import AuthenticationError, ToolApprovalRequiredError, ameshpilot_tools, meshpilot_tools
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import NotFoundError, UnavailableError
from tests.conftest import free_port

CALCULATOR_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "maxLength": 500}},
    "required": ["expression"],
}


class RecordingTools(tools_pb2_grpc.ToolsServiceServicer):
    """calculator (1/0 fails as an error observation, a missing expression is INVALID_ARGUMENT), append_note (needs
    approval) and ghost (listed, then gone: NOT_FOUND)."""

    def __init__(self) -> None:
        self.requests: list[tools_pb2.ExecuteToolRequest] = []
        self.metadata: list[dict[str, str]] = []

    def ListTools(self, request: Any, context: grpc.ServicerContext) -> tools_pb2.ListToolsResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        note = {"type": "object", "properties": {"text": {"type": "string"}}}
        return tools_pb2.ListToolsResponse(
            tools=[
                tools_pb2.Tool(name="calculator", description="Arithmetic.", input_schema=_struct(CALCULATOR_SCHEMA)),
                tools_pb2.Tool(
                    name="append_note",
                    description="Appends a note.",
                    input_schema=_struct(note),
                    requires_approval=True,
                ),
                tools_pb2.Tool(name="ghost", description="", input_schema=_struct({})),
            ]
        )

    def ExecuteTool(self, request: tools_pb2.ExecuteToolRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        if request.name == "ghost":
            context.abort(grpc.StatusCode.NOT_FOUND, "no tool named 'ghost'; ListTools shows the tools")
        if "expression" not in request.arguments:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "arguments.expression is required")
        response = tools_pb2.ExecuteToolResponse(
            call_id=request.call_id, name=request.name, duration=duration_pb2.Duration(nanos=1_000_000)
        )
        if request.arguments["expression"] == "1/0":
            response.error.CopyFrom(
                tools_pb2.ToolError(kind=tools_pb2.ToolError.KIND_FAILED, message="division by zero")
            )
        else:
            response.result.CopyFrom(json_format.ParseDict({"result": 4, "exact": 4.5}, struct_pb2.Value()))
        return response


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[RecordingTools, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = RecordingTools()
    tools_pb2_grpc.add_ToolsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def tools(service: tuple[RecordingTools, str]) -> dict[str, StructuredTool]:
    service[0].requests.clear()
    return {tool.name: tool for tool in meshpilot_tools(service[1], timeout=5)}


def test_each_tool_has_its_schema_and_description(tools: dict[str, StructuredTool]) -> None:
    assert list(tools) == ["calculator", "append_note", "ghost"]
    calculator = tools["calculator"]
    assert calculator.description == "Arithmetic."
    assert calculator.args_schema == CALCULATOR_SCHEMA
    assert calculator.tool_call_schema == {**CALCULATOR_SCHEMA, "description": "Arithmetic."}
    assert tools["append_note"].metadata == {"requires_approval": True}
    assert tools["ghost"].args_schema == {"type": "object", "properties": {}}


def test_invoke_runs_the_tool_through_execute_tool(
    tools: dict[str, StructuredTool], service: tuple[RecordingTools, str]
) -> None:
    assert tools["calculator"].invoke({"expression": "2+2"}) == {"result": 4, "exact": 4.5}
    request = service[0].requests[0]
    assert request.name == "calculator"
    assert json_format.MessageToDict(request.arguments) == {"expression": "2+2"}
    assert request.timeout.ToSeconds() == 5 and request.call_id


async def test_ainvoke_from_a_tool_call_gives_a_json_tool_message(tools: dict[str, StructuredTool]) -> None:
    call = {"name": "calculator", "args": {"expression": "2+2"}, "id": "c1", "type": "tool_call"}
    message = await tools["calculator"].ainvoke(call)

    assert isinstance(message, ToolMessage)
    assert json.loads(str(message.content)) == {"result": 4, "exact": 4.5}
    assert message.tool_call_id == "c1" and message.status == "success"


def test_a_failing_tool_returns_its_error_as_the_tool_message(tools: dict[str, StructuredTool]) -> None:
    call = {"name": "calculator", "args": {"expression": "1/0"}, "id": "c1", "type": "tool_call"}
    message = tools["calculator"].invoke(call)

    assert isinstance(message, ToolMessage)
    assert message.content == "division by zero" and message.status == "error"


def test_arguments_the_schema_refuses_become_an_error_observation(tools: dict[str, StructuredTool]) -> None:
    call = {"name": "calculator", "args": {"expr": "2+2"}, "id": "c1", "type": "tool_call"}
    message = tools["calculator"].invoke(call)

    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "arguments.expression is required" in str(message.content)


def test_arguments_that_are_not_json_become_an_error_observation(tools: dict[str, StructuredTool]) -> None:
    call = {"name": "calculator", "args": {"expression": object()}, "id": "c1", "type": "tool_call"}
    message = tools["calculator"].invoke(call)

    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "the arguments of calculator are not JSON" in str(message.content)


def test_a_tool_that_needs_approval_raises_and_is_not_run(
    tools: dict[str, StructuredTool], service: tuple[RecordingTools, str]
) -> None:
    with pytest.raises(ToolApprovalRequiredError, match="'append_note' runs only with a human's approval"):
        tools["append_note"].invoke({"text": "hello"})
    assert service[0].requests == []


def test_a_tool_gone_from_the_service_raises_not_found(tools: dict[str, StructuredTool]) -> None:
    with pytest.raises(NotFoundError, match=r"^tools at 127\.0\.0\.1:\d+: no tool named 'ghost'"):
        tools["ghost"].invoke({})


async def test_names_choose_tools_and_an_unknown_name_is_refused(service: tuple[RecordingTools, str]) -> None:
    chosen = await ameshpilot_tools(service[1], names=["calculator"])
    assert [tool.name for tool in chosen] == ["calculator"]
    with pytest.raises(ValueError, match="has no tool 'weather'; it has append_note, calculator, ghost"):
        meshpilot_tools(service[1], names=["calculator", "weather"])


def test_the_api_key_is_sent_as_a_bearer_token(service: tuple[RecordingTools, str]) -> None:
    meshpilot_tools(service[1], api_key="mpk_test")
    assert service[0].metadata[-1]["authorization"] == "Bearer mpk_test"


def test_an_unreachable_tools_service_says_to_start_the_mesh() -> None:
    with pytest.raises(UnavailableError, match=r"is the mesh up .* the address of its tools service"):
        meshpilot_tools(f"127.0.0.1:{free_port()}")


def test_unauthenticated_listing_says_to_pass_an_api_key() -> None:
    class Locked(tools_pb2_grpc.ToolsServiceServicer):
        def ListTools(self, request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    tools_pb2_grpc.add_ToolsServiceServicer_to_server(Locked(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(AuthenticationError, match="a bearer token is required; pass api_key="):
            meshpilot_tools(f"127.0.0.1:{port}")
    finally:
        server.stop(0)


def test_the_default_target_is_the_mesh_configs(
    service: tuple[RecordingTools, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHPILOT_TOOLS__SERVER__PORT", service[1].rsplit(":", 1)[1])
    assert [tool.name for tool in meshpilot_tools()] == ["calculator", "append_note", "ghost"]


async def test_async_calls_give_the_same_error_observations(tools: dict[str, StructuredTool]) -> None:
    refused = await tools["calculator"].ainvoke(
        {"name": "calculator", "args": {"expr": "2+2"}, "id": "c1", "type": "tool_call"}
    )
    failed = await tools["calculator"].ainvoke(
        {"name": "calculator", "args": {"expression": "1/0"}, "id": "c2", "type": "tool_call"}
    )

    assert isinstance(refused, ToolMessage) and refused.status == "error"
    assert "arguments.expression is required" in str(refused.content)
    assert isinstance(failed, ToolMessage) and (failed.status, failed.content) == ("error", "division by zero")
    with pytest.raises(ToolApprovalRequiredError):
        await tools["append_note"].ainvoke({"text": "hello"})

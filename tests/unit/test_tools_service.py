"""ToolsService end to end in-process: ListTools, ExecuteTool, status codes, and health staying SERVING after errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import services.tools
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, ServerConfig, ToolsConfig
from services.tools import SERVICE_NAME, Tool, ToolFailure, ToolRegistry, create_server


async def _boom(arguments: dict[str, Any]) -> Any:
    raise ToolFailure("the tool broke: try another")


async def _crash(arguments: dict[str, Any]) -> Any:
    raise RuntimeError("bug")


async def _sleep(arguments: dict[str, Any]) -> Any:
    await asyncio.sleep(3600)


async def _count(arguments: dict[str, Any]) -> Any:
    return {"n": arguments["n"], "type": type(arguments["n"]).__name__}


COUNT_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0}},
    "required": ["n"],
    "additionalProperties": False,
}
EMPTY_SCHEMA = {"type": "object", "properties": {}}


def config(data_dir: Path) -> MeshConfig:
    return MeshConfig(
        data_dir=data_dir,
        tools=ToolsConfig(server=ServerConfig(port=0), default_timeout_seconds=5, max_timeout_seconds=5),
    )


def make_registry() -> ToolRegistry:
    registry = ToolRegistry(default_timeout_seconds=5, max_timeout_seconds=5)
    registry.register(Tool("count", "Echo an integer.", COUNT_SCHEMA, _count))
    registry.register(Tool("boom", "Always fails.", EMPTY_SCHEMA, _boom))
    registry.register(Tool("crash", "Raises a bug.", EMPTY_SCHEMA, _crash))
    registry.register(Tool("sleep", "Never finishes.", EMPTY_SCHEMA, _sleep))
    registry.register(Tool("guarded", "Needs approval.", EMPTY_SCHEMA, _count, requires_approval=True))
    return registry


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    server = create_server(config(tmp_path), registry=make_registry())
    await server.start()
    await server.set_serving()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel
    await server.stop(0)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> tools_pb2_grpc.ToolsServiceStub:
    return tools_pb2_grpc.ToolsServiceStub(channel)


def execute_request(name: str, arguments: dict[str, Any] | None = None, **kwargs: Any) -> tools_pb2.ExecuteToolRequest:
    request = tools_pb2.ExecuteToolRequest(call_id="call-1", name=name, **kwargs)
    if arguments is not None:
        json_format.ParseDict(arguments, request.arguments)
    return request


async def test_list_tools_shows_schemas(stub: tools_pb2_grpc.ToolsServiceStub) -> None:
    response = await stub.ListTools(tools_pb2.ListToolsRequest())
    assert [t.name for t in response.tools] == ["count", "boom", "crash", "sleep", "guarded"]
    count = response.tools[0]
    assert count.description == "Echo an integer."
    assert json_format.MessageToDict(count.input_schema) == {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0.0}},
        "required": ["n"],
        "additionalProperties": False,
    }
    assert [t.requires_approval for t in response.tools] == [False, False, False, False, True]


async def test_execute_returns_result_with_integers_restored(stub: tools_pb2_grpc.ToolsServiceStub) -> None:
    response = await stub.ExecuteTool(execute_request("count", {"n": 3}))
    assert response.call_id == "call-1"
    assert response.name == "count"
    assert response.WhichOneof("outcome") == "result"
    assert json_format.MessageToDict(response.result) == {"n": 3.0, "type": "int"}
    assert response.HasField("duration")


async def test_unknown_tool_is_not_found_listing_tools(stub: tools_pb2_grpc.ToolsServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(execute_request("cout", {"n": 1}))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "unknown tool 'cout'; available tools: count, boom, crash, sleep, guarded"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": "three"}, "arguments.n: 'three' is not of type 'integer'"),
        ({"n": 2.5}, "arguments.n: 2.5 is not of type 'integer'"),
        ({"n": -1}, "arguments.n: -1 is less than the minimum of 0"),
        (None, "arguments: 'n' is a required property"),
    ],
)
async def test_bad_arguments_are_invalid_argument_with_path(
    stub: tools_pb2_grpc.ToolsServiceStub, arguments: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(execute_request("count", arguments))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"invalid arguments for tool 'count': {message}"


async def test_negative_timeout_is_invalid_argument(stub: tools_pb2_grpc.ToolsServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(execute_request("count", {"n": 1}, timeout=duration_pb2.Duration(seconds=-1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout must be positive" in caught.value.details()


@pytest.mark.parametrize(
    ("name", "message"),
    [("boom", "the tool broke: try another"), ("crash", "tool 'crash' failed: RuntimeError: bug")],
)
async def test_failing_tool_is_ok_response_with_error_observation(
    stub: tools_pb2_grpc.ToolsServiceStub, name: str, message: str
) -> None:
    response = await stub.ExecuteTool(execute_request(name, {}))
    assert response.WhichOneof("outcome") == "error"
    assert response.error.kind == tools_pb2.ToolError.KIND_FAILED
    assert response.error.message == message
    assert response.HasField("duration")


async def test_timeout_is_ok_response_with_timeout_observation(stub: tools_pb2_grpc.ToolsServiceStub) -> None:
    response = await stub.ExecuteTool(execute_request("sleep", {}, timeout=duration_pb2.Duration(nanos=50_000_000)))
    assert response.error.kind == tools_pb2.ToolError.KIND_TIMEOUT
    assert response.error.message == "tool 'sleep' ran past its time limit of 0.05s"
    assert response.duration.ToNanoseconds() >= 50_000_000


async def test_service_stays_serving_after_errors(
    channel: grpc.aio.Channel, stub: tools_pb2_grpc.ToolsServiceStub
) -> None:
    codes = []
    for request in [execute_request("nope", {}), execute_request("count", {"n": "x"})]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(request)
        codes.append(caught.value.code())
    assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT]
    assert (await stub.ExecuteTool(execute_request("crash", {}))).HasField("error")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert (await stub.ExecuteTool(execute_request("count", {"n": 7}))).result.struct_value["n"] == 7


async def test_default_registry_serves_builtins(tmp_path: Path) -> None:
    class NoKnowledge:
        """A stub that must not be called: the test only lists tools and runs the calculator."""

    server = create_server(config(tmp_path), knowledge_stub=NoKnowledge())  # type: ignore[arg-type]
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tools_pb2_grpc.ToolsServiceStub(channel)
            names = [t.name for t in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools]
            assert names == [
                "calculator",
                "current_time",
                "country_facts",
                "entity_facts",
                "sparql_query",
                "append_note",
                "python",
            ]
            response = await stub.ExecuteTool(execute_request("calculator", {"expression": "6 * 7"}))
            assert response.result == struct_pb2.Value(struct_value={"result": 42})
            response = await stub.ExecuteTool(execute_request("append_note", {"text": "hello"}))
            assert json_format.MessageToDict(response.result) == {"notebook": "notes", "line": 1.0, "text": "hello"}
            assert (tmp_path / "notes" / "notes.txt").read_text() == "hello\n"
    finally:
        await server.stop(0)


def test_exported_members() -> None:
    assert set(services.tools.__all__) == {
        "SERVICE_NAME",
        "Execution",
        "KnowledgeClient",
        "OutcomeStore",
        "Tool",
        "ToolCall",
        "ToolCallError",
        "ToolDefinitionError",
        "ToolErrorKind",
        "ToolExecutor",
        "ToolFailure",
        "ToolOutcome",
        "ToolRegistry",
        "ToolsService",
        "ToolsServicer",
        "builtin_tools",
        "create_executor",
        "create_server",
        "default_registry",
        "main",
    }
    assert SERVICE_NAME == "meshpilot.tools.v1.ToolsService"

"""The planner's gRPC clients of inference and tools, against recording in-process servers on port 0."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from meshpilot.common.v1 import common_pb2
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    create_channel,
)
from services.common.auth import acting_as
from services.planner import InferenceLLMClient, ToolSpec, ToolsServiceClient, Usage
from tests.conftest import free_port


class RecordingInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.time_remaining: float | None = None
        self.tenants: list[str | None] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        self.time_remaining = context.time_remaining()
        self.tenants.append(dict(context.invocation_metadata()).get("x-meshpilot-tenant"))
        if request.max_tokens == 1:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full; retry later")
        for piece in ('{"final_answer": ', '"Paris"}'):
            yield inference_pb2.GenerateResponse(text=piece)
        yield inference_pb2.GenerateResponse(
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=50, completion_tokens=7, total_tokens=57, cached_prompt_tokens=40),
            timings=common_pb2.Timings(total_ms=12.5, time_to_first_token_ms=3.0),
        )


class RecordingTools(tools_pb2_grpc.ToolsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[tools_pb2.ExecuteToolRequest] = []

    async def ListTools(self, request, context):
        schema = json_format.ParseDict(
            {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 500}}},
            struct_pb2.Struct(),
        )
        return tools_pb2.ListToolsResponse(
            tools=[tools_pb2.Tool(name="calculator", description="Arithmetic.", input_schema=schema)]
        )

    async def ExecuteTool(self, request, context):
        self.requests.append(request)
        if request.name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no tool named 'missing'")
        if "expression" not in request.arguments:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "arguments.expression is required")
        response = tools_pb2.ExecuteToolResponse(
            call_id=request.call_id, name=request.name, duration=duration_pb2.Duration(nanos=2_000_000)
        )
        if request.arguments["expression"] == "1/0":
            response.error.CopyFrom(
                tools_pb2.ToolError(kind=tools_pb2.ToolError.KIND_FAILED, message="division by zero")
            )
        else:
            response.result.CopyFrom(json_format.ParseDict({"result": 391, "exact": 2.5}, struct_pb2.Value()))
        return response


@pytest.fixture
async def servers():
    server = grpc.aio.server()
    inference, tools = RecordingInference(), RecordingTools()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    tools_pb2_grpc.add_ToolsServiceServicer_to_server(tools, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}")
    yield InferenceLLMClient(channel), inference, ToolsServiceClient(channel), tools
    await channel.close()
    await server.stop(0)


async def test_generate_sends_a_greedy_constrained_chat_and_joins_the_stream(servers) -> None:
    llm, inference, _, _ = servers
    schema = {"anyOf": [{"properties": {"tool": {"const": "x"}, "arguments": {}}}]}
    generation = await llm.generate([{"role": "user", "content": "Hi"}], schema, 64, timeout=30)

    assert generation.text == '{"final_answer": "Paris"}'
    assert generation.usage == Usage(50, 7, 57, 40)
    assert generation.timings.total_ms == 12.5
    request = inference.requests[0]
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Hi")]
    assert request.max_tokens == 64
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert request.constraint.json_schema == json.dumps(schema)  # key order kept: it is the order of the output
    assert 0 < inference.time_remaining <= 30.5  # gRPC rounds deadlines: seen 30.095 for timeout=30


async def test_generate_says_which_tenant_it_acts_for(servers) -> None:
    llm, inference, _, _ = servers
    await llm.generate([{"role": "user", "content": "Hi"}], {}, 8, timeout=30)
    with acting_as("acme"):
        await llm.generate([{"role": "user", "content": "Hi"}], {}, 8, timeout=30)

    assert inference.tenants == ["default", "acme"]


async def test_generate_refusal_keeps_its_code(servers) -> None:
    llm = servers[0]
    with pytest.raises(ResourceExhaustedError, match=r"^inference: queue full; retry later$"):
        await llm.generate([{"role": "user", "content": "Hi"}], {}, 1)


async def test_list_tools_turns_struct_numbers_back_into_ints(servers) -> None:
    tools = servers[2]
    assert await tools.list_tools() == [
        ToolSpec(
            "calculator",
            "Arithmetic.",
            {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 500}}},
        )
    ]


async def test_execute_returns_results_and_error_observations(servers) -> None:
    _, _, tools, recorded = servers
    ok = await tools.execute("call-1", "calculator", {"expression": "17 * 23"}, timeout=5)
    failed = await tools.execute("call-2", "calculator", {"expression": "1/0"})

    assert ok.result == {"result": 391, "exact": 2.5}
    assert ok.error is None and ok.duration_s == pytest.approx(0.002)
    assert failed.error == "division by zero" and failed.result is None
    assert recorded.requests[0].call_id == "call-1"
    assert 0 < recorded.requests[0].timeout.ToNanoseconds() <= 5e9
    assert not recorded.requests[1].HasField("timeout")


async def test_execute_maps_not_found_and_invalid_argument(servers) -> None:
    tools = servers[2]
    with pytest.raises(NotFoundError, match="tools: no tool named 'missing'"):
        await tools.execute("c", "missing", {})
    with pytest.raises(InvalidArgumentError, match=r"tools: arguments\.expression is required"):
        await tools.execute("c", "calculator", {})


async def test_a_service_that_is_down_is_unavailable() -> None:
    channel = create_channel(f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(UnavailableError, match=r"^tools: "):
            await ToolsServiceClient(channel).list_tools(timeout=5)
        with pytest.raises(UnavailableError, match=r"^inference: "):
            await InferenceLLMClient(channel).generate([], {}, 8, timeout=5)
    finally:
        await channel.close()

"""MeshServer: error mapping in one place, health that follows readiness, reflection, and a draining stop."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import (
    InvalidArgumentError,
    MeshServer,
    NotFoundError,
    ResourceExhaustedError,
    ServerConfig,
    create_channel,
    serve,
)
from services.common.server import ServiceBinding


class ScriptedTools(tools_pb2_grpc.ToolsServiceServicer):
    def __init__(self) -> None:
        self.error: Exception | None = None

    async def ListTools(self, request, context):
        if self.error is not None:
            raise self.error
        return tools_pb2.ListToolsResponse(tools=[tools_pb2.Tool(name="calculator")])


class SlowInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.started = asyncio.Event()

    async def Generate(self, request, context):
        for i in range(5):
            if self.fail_after is not None and i == self.fail_after:
                raise ResourceExhaustedError("queue is full; retry later")
            self.started.set()
            await asyncio.sleep(0.05)
            yield inference_pb2.GenerateResponse(text=str(i))


def _server(tools: ScriptedTools, inference: SlowInference, grace: float = 5.0) -> MeshServer:
    return MeshServer(
        ServerConfig(port=0, grace_seconds=grace),
        [
            ServiceBinding(
                tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name,
                tools,
                tools_pb2_grpc.add_ToolsServiceServicer_to_server,
            ),
            ServiceBinding(
                inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
                inference,
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            ),
        ],
    )


@pytest.fixture
async def running():
    tools, inference = ScriptedTools(), SlowInference()
    server = _server(tools, inference)
    await server.start()
    channel = create_channel(server.address)
    yield server, tools, inference, channel
    await channel.close()
    await server.stop(0)


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_health_is_not_serving_until_ready(running) -> None:
    server, _, _, channel = running
    assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.set_serving()
    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, "meshpilot.tools.v1.ToolsService") == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgumentError("name must not be empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("no tool named 'x'"), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_domain_errors_map_to_their_status(running, error: Exception, code: grpc.StatusCode) -> None:
    _, tools, _, channel = running
    tools.error = error
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tools_pb2_grpc.ToolsServiceStub(channel).ListTools(tools_pb2.ListToolsRequest())
    assert caught.value.code() == code
    assert caught.value.details() == str(error)


async def test_unexpected_errors_are_internal_with_an_incident_not_a_trace(running) -> None:
    _, tools, _, channel = running
    tools.error = KeyError("secret internals")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tools_pb2_grpc.ToolsServiceStub(channel).ListTools(tools_pb2.ListToolsRequest())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "incident" in caught.value.details()
    assert "secret internals" not in caught.value.details()
    assert "Traceback" not in caught.value.details()


async def test_errors_inside_a_stream_keep_their_status() -> None:
    server = _server(ScriptedTools(), SlowInference(fail_after=2))
    await server.start()
    try:
        async with create_channel(server.address) as channel:
            stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(prompt="x")
            )
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for response in stream:
                    received.append(response.text)
            assert received == ["0", "1"]
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry later" in caught.value.details()
    finally:
        await server.stop(0)


async def test_reflection_lists_every_service(running) -> None:
    _, _, _, channel = running
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = set()
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
    assert {
        "meshpilot.tools.v1.ToolsService",
        "meshpilot.inference.v1.InferenceService",
        "grpc.health.v1.Health",
    } <= names


async def test_stop_lets_in_flight_streams_finish() -> None:
    inference = SlowInference()
    server = _server(ScriptedTools(), inference, grace=5.0)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(server, stop_event=stop))
    async with create_channel(server.address) as channel:
        while await _health(channel) != health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.01)
        stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(inference_pb2.GenerateRequest(prompt="x"))
        first = await stream.read()
        stop.set()
        texts = [first.text]
        while (response := await stream.read()) is not grpc.aio.EOF:
            texts.append(response.text)
        assert texts == ["0", "1", "2", "3", "4"]
        assert await stream.code() == grpc.StatusCode.OK
    await asyncio.wait_for(serving, 10)


async def test_metrics_endpoint_counts_calls_by_method_and_code(running) -> None:
    import urllib.request

    server, tools, _, channel = running
    stub = tools_pb2_grpc.ToolsServiceStub(channel)
    await stub.ListTools(tools_pb2.ListToolsRequest())
    tools.error = NotFoundError("gone")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ListTools(tools_pb2.ListToolsRequest())
    stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(inference_pb2.GenerateRequest(prompt="x"))
    assert len([r async for r in stream]) == 5
    assert server.metrics_port
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    method = "/meshpilot.tools.v1.ToolsService/ListTools"
    assert f'meshpilot_rpc_requests_total{{code="OK",method="{method}"}} 1.0' in body
    assert f'meshpilot_rpc_requests_total{{code="NOT_FOUND",method="{method}"}} 1.0' in body
    generate = "/meshpilot.inference.v1.InferenceService/Generate"
    assert f'meshpilot_rpc_stream_messages_total{{method="{generate}"}} 5.0' in body
    assert f'meshpilot_rpc_duration_seconds_count{{method="{generate}"}} 1.0' in body

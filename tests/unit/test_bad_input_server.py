"""Bad input meets the shared server machinery: corrupt bytes, JSON with NaN/Infinity and errors that quote megabytes
are refused with INVALID_ARGUMENT or a bounded message, never UNKNOWN, INTERNAL or an oversized header."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshServer, NotFoundError, ServerConfig, create_channel
from services.common.errors import MAX_STATUS_MESSAGE_BYTES, bounded, quoted
from services.common.server import HeapTrimInterceptor, ServiceBinding

EXECUTE = "/meshpilot.tools.v1.ToolsService/ExecuteTool"
GENERATE = "/meshpilot.inference.v1.InferenceService/Generate"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class RecordingTools(tools_pb2_grpc.ToolsServiceServicer):
    """Records the requests its handlers see; ExecuteTool raises ``error`` when set."""

    def __init__(self) -> None:
        self.seen: list[tools_pb2.ExecuteToolRequest] = []
        self.error: Exception | None = None

    async def ExecuteTool(self, request, context):
        self.seen.append(request)
        if self.error is not None:
            raise self.error
        return tools_pb2.ExecuteToolResponse(call_id=request.call_id)


class EchoInference(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(text=request.prompt)


TRIM_THRESHOLD = 10_000


@pytest.fixture
def trims() -> list[int]:
    """One entry per heap trim the server's HeapTrimInterceptor made."""
    return []


@pytest.fixture
async def mesh(trims: list[int]):
    tools = RecordingTools()
    server = MeshServer(
        ServerConfig(port=0, metrics=False),
        [
            ServiceBinding(
                tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name,
                tools,
                tools_pb2_grpc.add_ToolsServiceServicer_to_server,
            ),
            ServiceBinding(
                inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
                EchoInference(),
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            ),
        ],
        interceptors=[HeapTrimInterceptor(TRIM_THRESHOLD, lambda: trims.append(1))],
    )
    await server.start()
    await server.set_serving()
    channel = create_channel(server.address)
    yield tools, channel
    await channel.close()
    await server.stop(0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field on the wire."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


# ExecuteToolRequest.name is field 2 (a string), .arguments field 3 (a Struct).
CORRUPT = {
    "random bytes": b"\xff\xff\xff\xff\x0f",
    "a length past the end": b"\x12\x40abc",
    "a string that is not UTF-8": _field(2, b"\xff\xfe\xc0\x80"),
    "a wire type 7": b"\x17",
}


@pytest.mark.parametrize("payload", CORRUPT.values(), ids=CORRUPT.keys())
async def test_corrupt_bytes_are_invalid_argument_on_a_unary_method(mesh, payload: bytes) -> None:
    tools, channel = mesh
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(EXECUTE)(payload, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "the request could not be decoded" in caught.value.details()
    assert "ExecuteToolRequest" in caught.value.details()
    assert tools.seen == [], "the handler never sees a request it cannot have"


async def test_corrupt_bytes_are_invalid_argument_on_a_streaming_method(mesh) -> None:
    _, channel = mesh
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in channel.unary_stream(GENERATE)(CORRUPT["a string that is not UTF-8"], timeout=5):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateRequest" in caught.value.details()


async def test_json_nested_past_the_parsers_limit_is_invalid_argument(mesh) -> None:
    _, channel = mesh
    value = b""
    for _ in range(150):  # Value.list_value (6) -> ListValue.values (1) -> Value ...: past the parser's 100 levels
        value = _field(6, _field(1, value))
    request = _field(3, _field(1, _field(1, b"k") + _field(2, value)))  # arguments.fields["k"] = that Value
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(EXECUTE)(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_corrupt_bytes_in_a_client_stream_are_invalid_argument(mesh) -> None:
    _, channel = mesh
    call = channel.stream_stream(REFLECTION)(iter([b"\xff\xff\xff\xff\x0f"]), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("arguments", "path", "shown"),
    [
        ({"x": math.nan}, "arguments.x", "NaN"),
        ({"a": {"b": [1, math.inf]}}, "arguments.a.b[1]", "Infinity"),
        ({"weird key": [[-math.inf]]}, "arguments.'weird key'[0][0]", "-Infinity"),
    ],
)
async def test_nan_or_infinity_in_json_is_invalid_argument_naming_where(mesh, arguments, path, shown) -> None:
    tools, channel = mesh
    request = tools_pb2.ExecuteToolRequest(name="calculator", arguments=struct_pb2.Struct())
    request.arguments.update(arguments)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tools_pb2_grpc.ToolsServiceStub(channel).ExecuteTool(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{path} is {shown}: JSON has no NaN or Infinity")
    assert tools.seen == []


async def test_finite_json_numbers_pass(mesh) -> None:
    tools, channel = mesh
    request = tools_pb2.ExecuteToolRequest(name="calculator", arguments=struct_pb2.Struct())
    request.arguments.update({"x": 1e308, "y": [-0.0, 5e-324]})
    await tools_pb2_grpc.ToolsServiceStub(channel).ExecuteTool(request, timeout=5)
    assert tools.seen == [request]


async def test_an_error_quoting_megabytes_is_cut_and_keeps_its_start_and_end(mesh) -> None:
    tools, channel = mesh
    tools.error = NotFoundError(f"no tool named {'日' * 1_000_000}; call ListTools for the registered names")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tools_pb2_grpc.ToolsServiceStub(channel).ExecuteTool(tools_pb2.ExecuteToolRequest(), timeout=5)
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, details[:200]
    assert len(details.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert details.startswith("no tool named 日")
    assert details.endswith("; call ListTools for the registered names")


async def test_health_watch_streams_through_the_interceptors(mesh) -> None:
    _, channel = mesh
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    first = await watch.read()
    watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_method_the_servicer_does_not_implement_is_unimplemented(mesh) -> None:
    _, channel = mesh
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tools_pb2_grpc.ToolsServiceStub(channel).ListTools(tools_pb2.ListToolsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_quoted_cuts_long_values_and_says_how_long() -> None:
    assert quoted("run-1") == "'run-1'"
    assert quoted("a" * 100_000) == f"{'a' * 64!r}... (100000 characters)"


@pytest.mark.parametrize("text", ["short", "x" * 5000, "é" * 5000, "日" * 3000 + "end"])
def test_bounded_fits_the_byte_limit_and_never_splits_a_character(text: str) -> None:
    cut = bounded(text)
    assert len(cut.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert cut == text or (cut.startswith(text[:10]) and cut.endswith(text[-3:]) and " [...] " in cut)


async def test_the_heap_is_trimmed_after_a_large_request_only(mesh, trims: list[int]) -> None:
    tools, channel = mesh
    stub = tools_pb2_grpc.ToolsServiceStub(channel)
    await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="small"), timeout=5)
    assert trims == []
    await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="x" * TRIM_THRESHOLD), timeout=5)
    assert trims == [1]
    tools.error = NotFoundError("no such tool")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="y" * TRIM_THRESHOLD), timeout=5)
    assert trims == [1, 1], "a failed call is trimmed after too"
    generate = inference_pb2_grpc.InferenceServiceStub(channel).Generate
    [r async for r in generate(inference_pb2.GenerateRequest(prompt="z" * TRIM_THRESHOLD), timeout=5)]
    assert trims == [1, 1, 1], "and a stream"

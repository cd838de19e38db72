"""Bad input to the tools service: NaN or ±Infinity in a call's arguments is the caller's mistake (INVALID_ARGUMENT
naming where), not INTERNAL "Fail to serialize NaN for Value.number_value"; unknown megabyte names stay bounded."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import MeshConfig, ServerConfig, ToolsConfig
from services.tools import create_server
from services.tools.builtin import calculator_tool
from services.tools.registry import ToolRegistry


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[tools_pb2_grpc.ToolsServiceStub]:
    registry = ToolRegistry(default_timeout_seconds=5, max_timeout_seconds=5)
    registry.register(calculator_tool())
    config = MeshConfig(data_dir=tmp_path, tools=ToolsConfig(server=ServerConfig(port=0, metrics=False)))
    server = create_server(config, registry=registry)
    await server.start()
    await server.set_serving()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield tools_pb2_grpc.ToolsServiceStub(channel)
    await server.stop(0)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"expression": "1+1", "x": math.nan}, "arguments.x is NaN"),
        ({"expression": "1+1", "options": {"scale": [1, math.inf]}}, "arguments.options.scale[1] is Infinity"),
        ({"expression": -math.inf}, "arguments.expression is -Infinity"),
    ],
)
async def test_non_finite_numbers_in_arguments_are_invalid_argument(stub, arguments, fragment: str) -> None:
    request = tools_pb2.ExecuteToolRequest(call_id="c1", name="calculator", arguments=struct_pb2.Struct())
    request.arguments.update(arguments)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert fragment in caught.value.details()
    assert "send a finite number" in caught.value.details()


async def test_a_megabyte_tool_name_is_not_found_with_a_bounded_message(stub) -> None:
    request = tools_pb2.ExecuteToolRequest(call_id="c1", name="t" * 1_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteTool(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()[:200]
    assert len(caught.value.details()) <= 2000

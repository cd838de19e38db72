"""The tools service's MCP endpoint, driven by the MCP SDK's own client over streamable HTTP on a real socket."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from services.common import MeshConfig
from services.common.approval import ApprovalSigner
from services.common.config import McpEndpointConfig
from services.tools import Execution, OutcomeStore, Tool, ToolCall, ToolExecutor, default_registry
from services.tools.mcp_server import McpEndpoint
from tests.unit.tools_fakes import ECHO_SCHEMA, SIGNING_KEY, CountingHandler, make_executor, make_registry


@asynccontextmanager
async def serving(executor: ToolExecutor) -> AsyncIterator[McpEndpoint]:
    endpoint = McpEndpoint(executor, McpEndpointConfig(port=0))
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.close()
        await executor.close()


@asynccontextmanager
async def session(url: str) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        yield client


def port_of(endpoint: McpEndpoint) -> int:
    port = urlsplit(endpoint.url).port
    assert port is not None
    return port


def text_of(result: mcp_types.CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, mcp_types.TextContent)
    return block.text


@pytest.fixture
def echo() -> CountingHandler:
    return CountingHandler()


@pytest.fixture
def executor(tmp_path: Path, echo: CountingHandler) -> ToolExecutor:
    return make_executor(tmp_path / "tools.db", make_registry(("echo", echo)))


async def test_tools_are_listed_with_their_descriptions_and_schemas(executor: ToolExecutor) -> None:
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        assert endpoint.url.startswith("http://127.0.0.1:") and endpoint.url.endswith("/mcp")
        listed = await client.list_tools()
    assert [(tool.name, tool.description, tool.input_schema) for tool in listed.tools] == [
        ("echo", "The echo tool.", ECHO_SCHEMA)
    ]


async def test_a_call_returns_the_result_as_json_text_and_structured_content(executor: ToolExecutor) -> None:
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("echo", {"text": "héllo", "n": 2})
    assert not result.is_error
    assert json.loads(text_of(result)) == {"text": "héllo", "run": 1}
    assert result.structured_content == {"text": "héllo", "run": 1}


async def test_a_result_that_is_not_an_object_is_json_text_only(tmp_path: Path) -> None:
    async def count(arguments: dict[str, Any]) -> list[str]:
        return [arguments["text"]] * 2

    registry = make_registry(Tool("twice", "Repeats the text.", ECHO_SCHEMA, count))
    async with serving(make_executor(tmp_path / "tools.db", registry)) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("twice", {"text": "a"})
    assert json.loads(text_of(result)) == ["a", "a"]
    assert result.structured_content is None


async def test_a_tool_registered_while_serving_is_in_the_next_list_and_callable(executor: ToolExecutor) -> None:
    async def shout(arguments: dict[str, Any]) -> dict[str, str]:
        return {"text": arguments["text"].upper()}

    async with serving(executor) as endpoint, session(endpoint.url) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["echo"]
        executor.registry.register(Tool("shout", "Upper-cases the text.", ECHO_SCHEMA, shout))
        assert [tool.name for tool in (await client.list_tools()).tools] == ["echo", "shout"]
        result = await client.call_tool("shout", {"text": "hi"})
    assert result.structured_content == {"text": "HI"}


async def test_arguments_breaking_the_schema_are_an_error_result_naming_the_path(
    executor: ToolExecutor, echo: CountingHandler
) -> None:
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("echo", {"text": "hi", "n": "three"})
    assert result.is_error
    assert text_of(result) == "invalid arguments for tool 'echo': arguments.n: 'three' is not of type 'integer'"
    assert echo.calls == 0


async def test_an_unknown_tool_is_an_mcp_error_naming_the_available_tools(executor: ToolExecutor) -> None:
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("nope", {})
    assert raised.value.code == mcp_types.INVALID_PARAMS
    assert raised.value.message == "unknown tool 'nope'; available tools: echo"


@pytest.mark.parametrize("marked_by", ["definition", "config"])
async def test_a_tool_that_requires_approval_is_listed_but_not_run(tmp_path: Path, marked_by: str) -> None:
    handler = CountingHandler()
    tool = Tool("guarded", "Needs approval.", ECHO_SCHEMA, handler, requires_approval=marked_by == "definition")
    marked = ["guarded"] if marked_by == "config" else []
    executor = make_executor(tmp_path / "tools.db", make_registry(tool), approval_required=marked)
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["guarded"]
        result = await client.call_tool("guarded", {"text": "hi"})
    assert result.is_error
    assert text_of(result) == (
        "tool 'guarded' requires a human's approval, which an MCP call cannot carry; it can only be called in a "
        "MeshPilot agent run, where a human approves each call"
    )
    assert handler.calls == 0


async def test_a_tool_failure_is_an_error_result_with_its_message(tmp_path: Path) -> None:
    registry = make_registry(("broken", CountingHandler(fail=True)))
    async with serving(make_executor(tmp_path / "tools.db", registry)) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("broken", {"text": "purpose"})
    assert result.is_error
    assert text_of(result) == "failed on purpose"


async def test_a_tool_past_its_time_limit_is_an_error_result_saying_so(tmp_path: Path) -> None:
    stuck = CountingHandler(hold=True)
    registry = make_registry(Tool("stuck", "Never answers.", ECHO_SCHEMA, stuck, timeout_seconds=0.2))
    async with serving(make_executor(tmp_path / "tools.db", registry)) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("stuck", {"text": "hi"})
    assert result.is_error
    assert text_of(result) == "tool 'stuck' ran past its time limit of 0.2s"


async def test_a_tool_raising_unexpectedly_gives_the_client_no_trace(tmp_path: Path) -> None:
    async def buggy(arguments: dict[str, Any]) -> Any:
        raise KeyError("secret internals")

    registry = make_registry(Tool("buggy", "Has a bug.", ECHO_SCHEMA, buggy))
    async with serving(make_executor(tmp_path / "tools.db", registry)) as endpoint, session(endpoint.url) as client:
        result = await client.call_tool("buggy", {"text": "hi"})
    assert result.is_error
    assert text_of(result) == "tool 'buggy' failed: KeyError: 'secret internals'"
    assert "Traceback" not in text_of(result)


async def test_an_unexpected_error_in_the_service_is_an_internal_error_with_an_incident_id(
    tmp_path: Path, echo: CountingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenExecutor(ToolExecutor):
        async def execute(self, call: ToolCall) -> Execution:
            raise RuntimeError("secret internals")

    executor = BrokenExecutor(
        make_registry(("echo", echo)), store=OutcomeStore(tmp_path / "tools.db"), signer=ApprovalSigner(SIGNING_KEY)
    )
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("echo", {"text": "hi"})
    assert raised.value.code == mcp_types.INTERNAL_ERROR
    incident = re.fullmatch(
        r"internal error in the tools service \(incident (\w+)\); see its log", raised.value.message
    )
    assert incident is not None
    assert f"incident {incident[1]}" in caplog.text and "secret internals" in caplog.text


async def test_a_request_cancelled_under_the_handler_cancels_the_tool_and_is_not_answered(tmp_path: Path) -> None:
    # uvicorn cancels requests still open after its shutdown grace; the handler must end cancelled, not answer
    # as if close() had stopped the call. Driven directly: no client can cancel a call (see the README).
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(arguments: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    executor = make_executor(tmp_path / "tools.db", make_registry(Tool("forever", "Waits.", ECHO_SCHEMA, wait_forever)))
    endpoint = McpEndpoint(executor, McpEndpointConfig(port=0))
    params = mcp_types.CallToolRequestParams(name="forever", arguments={"text": "hi"})
    request = asyncio.create_task(endpoint._call_tool(None, params))
    await asyncio.wait_for(started.wait(), 10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(cancelled.wait(), 10)
    await executor.close()


async def test_a_slow_call_does_not_hold_up_another(tmp_path: Path, echo: CountingHandler) -> None:
    slow = CountingHandler(hold=True)
    registry = make_registry(("slow", slow), ("echo", echo))
    async with serving(make_executor(tmp_path / "tools.db", registry)) as endpoint, session(endpoint.url) as client:
        slow_call = asyncio.create_task(client.call_tool("slow", {"text": "late"}))
        await asyncio.wait_for(slow.started.wait(), 10)
        quick = await asyncio.wait_for(client.call_tool("echo", {"text": "now"}), 10)
        assert quick.structured_content == {"text": "now", "run": 1}
        assert not slow_call.done()
        slow.release()
        assert (await slow_call).structured_content == {"text": "late", "run": 1}


async def test_close_returns_promptly_with_a_client_session_open(executor: ToolExecutor) -> None:
    endpoint = McpEndpoint(executor, McpEndpointConfig(port=0))
    await endpoint.start()
    async with session(endpoint.url) as client:
        await client.list_tools()
        await asyncio.wait_for(endpoint.close(), 3)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port_of(endpoint))
    await executor.close()


async def test_close_answers_a_call_in_flight_with_an_error_and_cancels_the_tool(tmp_path: Path) -> None:
    held = CountingHandler(hold=True)
    executor = make_executor(tmp_path / "tools.db", make_registry(("held", held)))
    endpoint = McpEndpoint(executor, McpEndpointConfig(port=0))
    await endpoint.start()
    async with session(endpoint.url) as client:
        call = asyncio.create_task(client.call_tool("held", {"text": "hi"}))
        await asyncio.wait_for(held.started.wait(), 10)
        await asyncio.wait_for(endpoint.close(), 3)
        result = await asyncio.wait_for(call, 10)
    assert result.is_error
    assert (
        text_of(result)
        == "the tools service shut down during the call of tool 'held'; whether it took effect is unknown"
    )
    assert held.finished == 0
    await executor.close()


@pytest.mark.parametrize(
    ("header", "status"), [({"origin": "http://evil.example"}, 403), ({"host": "evil.example:80"}, 421)]
)
async def test_a_request_from_a_non_local_page_or_host_is_refused(
    executor: ToolExecutor, header: dict[str, str], status: int
) -> None:
    # DNS rebinding: a web page the user visits must not reach the tools through their browser.
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    accept = {"accept": "application/json, text/event-stream"}
    async with serving(executor) as endpoint, httpx2.AsyncClient() as http:
        assert (await http.post(endpoint.url, json=request, headers=accept)).status_code == 200
        assert (await http.post(endpoint.url, json=request, headers=accept | header)).status_code == status


async def test_an_address_in_use_fails_start(executor: ToolExecutor) -> None:
    async with serving(executor) as endpoint:
        with pytest.raises(OSError, match=f"cannot listen on {endpoint.url} .*change tools.mcp_endpoint.host or .port"):
            await McpEndpoint(executor, McpEndpointConfig(port=port_of(endpoint))).start()


async def test_the_2026_protocol_without_a_session_is_served_too(executor: ToolExecutor) -> None:
    async with serving(executor) as endpoint, Client(endpoint.url, mode="2026-07-28") as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["echo"]
        result = await client.call_tool("echo", {"text": "hi"})
    assert result.structured_content == {"text": "hi", "run": 1}


async def test_the_built_in_registry_is_served(tmp_path: Path) -> None:
    config = MeshConfig(data_dir=tmp_path)
    executor = make_executor(tmp_path / "tools.db", default_registry(config, None))
    async with serving(executor) as endpoint, session(endpoint.url) as client:
        names = [tool.name for tool in (await client.list_tools()).tools]
        result = await client.call_tool("calculator", {"expression": "2 * (3 + 4)"})
        refused = await client.call_tool("calculator", {"expression": ""})
    assert {"calculator", "current_time", "append_note"} <= set(names)
    assert result.structured_content == {"result": 14}
    assert refused.is_error and "arguments.expression" in text_of(refused)

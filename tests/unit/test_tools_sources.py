"""Tool sources registered at runtime through the tools service's API: real MCP servers (mcp-server-time over stdio),
kept across restarts, and every bad request refused with the code and field a client needs."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import ConfigError, MeshConfig
from services.tools import ToolsService
from services.tools.servicer import REDACTED

pytestmark = pytest.mark.slow

TIME_ARGS = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
TIME_CONFIG = {"name": "time", "command": sys.executable, "args": TIME_ARGS}


def config(tmp_path: Path, **tools: Any) -> MeshConfig:
    return MeshConfig(
        data_dir=tmp_path,
        tools={"server": {"port": 0, "metrics": False}, "mcp_endpoint": {"enabled": False}, **tools},
    )


@asynccontextmanager
async def tools_service(cfg: MeshConfig) -> AsyncIterator[tools_pb2_grpc.ToolsServiceStub]:
    service = ToolsService(cfg)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.server.address) as channel:
            yield tools_pb2_grpc.ToolsServiceStub(channel)
    finally:
        await service.stop()


def time_source(name: str = "clock", **fields: Any) -> tools_pb2.ToolSource:
    source = tools_pb2.ToolSource(name=name, **fields)
    source.mcp.command = sys.executable
    source.mcp.args.extend(TIME_ARGS)
    return source


async def register(stub: tools_pb2_grpc.ToolsServiceStub, source: tools_pb2.ToolSource) -> tools_pb2.ToolSource:
    return await stub.RegisterToolSource(tools_pb2.RegisterToolSourceRequest(source=source), timeout=60)


async def call(stub: tools_pb2_grpc.ToolsServiceStub, name: str, **arguments: Any) -> tools_pb2.ExecuteToolResponse:
    request = tools_pb2.ExecuteToolRequest(call_id="c", name=name)
    request.arguments.update(arguments)
    return await stub.ExecuteTool(request, timeout=30)


async def sources(stub: tools_pb2_grpc.ToolsServiceStub) -> dict[str, tools_pb2.ToolSource]:
    listed = await stub.ListToolSources(tools_pb2.ListToolSourcesRequest())
    return {source.name: source for source in listed.sources}


async def tool_names(stub: tools_pb2_grpc.ToolsServiceStub) -> list[str]:
    return [tool.name for tool in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools]


async def test_a_registered_mcp_server_is_called_and_comes_back_after_a_restart(tmp_path: Path) -> None:
    source = time_source()
    source.mcp.env["SECRET_TOKEN"] = "hunter2"
    async with tools_service(config(tmp_path)) as stub:
        registered = await register(stub, source)
        assert set(registered.tools) == {"clock.convert_time", "clock.get_current_time"}
        assert registered.origin == tools_pb2.ToolSource.ORIGIN_API
        assert registered.state == tools_pb2.ToolSource.STATE_READY
        tokyo = await call(stub, "clock.get_current_time", timezone="Asia/Tokyo")
        assert json_format.MessageToDict(tokyo.result)["datetime"].endswith("+09:00")
        listed = (await sources(stub))["clock"]
        assert dict(listed.mcp.env) == {"SECRET_TOKEN": REDACTED}
        assert list(listed.mcp.args) == TIME_ARGS
    async with tools_service(config(tmp_path)) as stub:
        listed = (await sources(stub))["clock"]
        assert listed.origin == tools_pb2.ToolSource.ORIGIN_API
        paris = await call(stub, "clock.get_current_time", timezone="Europe/Paris")
        assert json_format.MessageToDict(paris.result)["timezone"] == "Europe/Paris"


async def test_unregistering_removes_the_tools_and_the_source_for_good(tmp_path: Path) -> None:
    async with tools_service(config(tmp_path)) as stub:
        await register(stub, time_source())
        await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="clock"))
        assert "clock" not in await sources(stub)
        assert not [name for name in await tool_names(stub) if name.startswith("clock.")]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(stub, "clock.get_current_time", timezone="UTC")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # The name is free again.
        await register(stub, time_source())
        await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="clock"))
    async with tools_service(config(tmp_path)) as stub:
        assert "clock" not in await sources(stub)


async def test_a_name_in_use_is_already_exists(tmp_path: Path) -> None:
    async with tools_service(config(tmp_path, mcp_servers=[TIME_CONFIG])) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, time_source("time"))
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "in the configuration" in (raised.value.details() or "")
        await register(stub, time_source("clock"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, time_source("clock"))
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "unregister it first or pick another name" in (raised.value.details() or "")


def _timed(source: tools_pb2.ToolSource, seconds: int) -> tools_pb2.ToolSource:
    source.timeout.FromSeconds(seconds)
    return source


def _with(source: tools_pb2.ToolSource, **mcp: Any) -> tools_pb2.ToolSource:
    for key, value in mcp.items():
        setattr(source.mcp, key, value)
    return source


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (tools_pb2.ToolSource(name="x"), "source: set mcp (an MCP server) or openapi"),
        (time_source("Bad-Name"), "source.name: String should match pattern"),
        (time_source("x" * 100_000), "source.name"),
        (_with(time_source(), url="http://127.0.0.1:1/mcp"), "set exactly one of command"),
        (_with(tools_pb2.ToolSource(name="web"), url="ftp://example.com"), "must start with http:// or https://"),
        (_timed(time_source(), -1), "source.timeout_seconds: Input should be greater than 0"),
    ],
    ids=["no-kind", "bad-name", "huge-name", "command-and-url", "bad-url", "negative-timeout"],
)
async def test_a_malformed_source_is_invalid_argument_naming_the_field(
    tmp_path: Path, source: tools_pb2.ToolSource, needle: str
) -> None:
    async with tools_service(config(tmp_path)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, source)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (raised.value.details() or "")
        assert len(raised.value.details() or "") <= 600


async def test_a_server_that_does_not_start_is_failed_precondition_and_not_kept(tmp_path: Path) -> None:
    broken = tools_pb2.ToolSource(name="broken")
    broken.mcp.command = sys.executable
    broken.mcp.args.extend(["-c", "import sys; sys.exit(3)"])
    async with tools_service(config(tmp_path)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, broken)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "could not be reached" in (raised.value.details() or "")
        assert "nothing was registered" in (raised.value.details() or "")
        assert "broken" not in await sources(stub)
        nowhere = tools_pb2.ToolSource(name="nowhere")
        nowhere.mcp.url = "http://127.0.0.1:9/mcp"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, nowhere)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    async with tools_service(config(tmp_path)) as stub:
        assert await sources(stub) == {}


@pytest.mark.parametrize(
    "tools", [{"server": {"host": "0.0.0.0", "port": 0, "metrics": False}}, {"allow_registered_commands": False}]
)
async def test_a_command_is_refused_where_registered_commands_are_not_allowed(
    tmp_path: Path, tools: dict[str, Any]
) -> None:
    async with tools_service(config(tmp_path, **tools)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, time_source())
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tools.allow_registered_commands" in (raised.value.details() or "")
        assert await sources(stub) == {}


async def test_unregister_refuses_unknown_and_configured_sources(tmp_path: Path) -> None:
    async with tools_service(config(tmp_path, mcp_servers=[TIME_CONFIG])) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="nope" * 10_000))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "tool sources: time" in (raised.value.details() or "")
        assert len(raised.value.details() or "") < 300
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="time"))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tools.mcp_servers" in (raised.value.details() or "")
        assert (await sources(stub))["time"].origin == tools_pb2.ToolSource.ORIGIN_CONFIG


async def test_a_source_can_require_approval_for_its_tools(tmp_path: Path) -> None:
    async with tools_service(config(tmp_path)) as stub:
        await register(stub, time_source(approval_required=["convert_time"]))
        listed = {tool.name: tool for tool in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools}
        assert listed["clock.convert_time"].requires_approval
        assert not listed["clock.get_current_time"].requires_approval
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(stub, "clock.convert_time", source_timezone="UTC", time="12:00", target_timezone="Asia/Tokyo")
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_approval_required_may_name_the_tools_of_a_configured_source(tmp_path: Path) -> None:
    cfg = config(tmp_path, mcp_servers=[TIME_CONFIG], approval_required=["time.*"])
    async with tools_service(cfg) as stub:
        # The server connects in the background; once listed, every one of its tools requires approval.
        deadline = asyncio.get_running_loop().time() + 30
        while "time.get_current_time" not in await tool_names(stub):
            assert asyncio.get_running_loop().time() < deadline, "mcp-server-time never listed its tools"
            await asyncio.sleep(0.1)
        for tool in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools:
            assert tool.requires_approval == tool.name.startswith("time.")
    with pytest.raises(ConfigError, match=r"'nope\.\*'.*tools of sources: time\.\*"):
        ToolsService(config(tmp_path, mcp_servers=[TIME_CONFIG], approval_required=["nope.*"]))


COUNTER_DOCUMENT = """
openapi: 3.1.0
info: {title: Counter, version: "1"}
servers: [{url: "http://127.0.0.1:PORT"}]
paths:
  /count/{word}:
    get:
      operationId: countLetters
      summary: Counts the letters of a word.
      parameters:
        - {name: word, in: path, required: true, schema: {type: string, maxLength: 40}}
      responses: {"200": {description: the count}}
"""


class CounterHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        word = self.path.rsplit("/", 1)[-1]
        body = json.dumps({"word": word, "letters": len(word)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def counter_document() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CounterHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield COUNTER_DOCUMENT.replace("PORT", str(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()


def openapi_source(document: str, name: str = "counter", **fields: Any) -> tools_pb2.ToolSource:
    source = tools_pb2.ToolSource(name=name)
    source.openapi.document = document
    for key, value in fields.items():
        setattr(source.openapi, key, value)
    return source


async def test_a_registered_openapi_document_is_called_and_comes_back_after_a_restart(
    tmp_path: Path, counter_document: str
) -> None:
    source = openapi_source(counter_document)
    source.openapi.headers["Authorization"] = "Bearer s3cret"
    async with tools_service(config(tmp_path)) as stub:
        registered = await register(stub, source)
        assert list(registered.tools) == ["counter.count_letters"]
        assert registered.openapi.document == "" and dict(registered.openapi.headers) == {"Authorization": REDACTED}
        counted = await call(stub, "counter.count_letters", word="meshpilot")
        assert json_format.MessageToDict(counted.result) == {"word": "meshpilot", "letters": 9.0}
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(stub, "counter.count_letters", word="x" * 41)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "arguments.word" in (raised.value.details() or "")
    async with tools_service(config(tmp_path)) as stub:
        counted = await call(stub, "counter.count_letters", word="mesh")
        assert json_format.MessageToDict(counted.result)["letters"] == 4


@pytest.mark.parametrize(
    ("document", "fields", "needle"),
    [
        ("openapi: [unclosed", {}, "source.openapi:"),
        ('{"swagger": "2.0", "paths": {}}', {}, "only OpenAPI 3.x is supported"),
        ("KEEP", {"base_url": "http://169.254.169.254"}, "base_url"),
        ("", {}, "source.document: String should have at least 1 character"),
    ],
    ids=["does-not-parse", "swagger-2", "base-url-not-a-server", "empty"],
)
async def test_an_openapi_document_that_cannot_be_used_is_invalid_argument(
    tmp_path: Path, counter_document: str, document: str, fields: dict[str, Any], needle: str
) -> None:
    async with tools_service(config(tmp_path)) as stub:
        source = openapi_source(counter_document if document == "KEEP" else document, **fields)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, source)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (raised.value.details() or "")
        assert await sources(stub) == {}


async def test_an_openapi_name_in_use_is_already_exists(tmp_path: Path, counter_document: str) -> None:
    async with tools_service(config(tmp_path)) as stub:
        await register(stub, openapi_source(counter_document))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await register(stub, openapi_source(counter_document))
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-meshpilot-tenant", tenant),)


async def test_a_tenants_sources_are_its_own(tmp_path: Path, counter_document: str) -> None:
    acme, globex = as_tenant("acme"), as_tenant("globex")
    async with tools_service(config(tmp_path, mcp_servers=[TIME_CONFIG])) as stub:
        request = tools_pb2.RegisterToolSourceRequest(source=openapi_source(counter_document))
        await stub.RegisterToolSource(request, metadata=acme)
        # Another tenant may use the name; the configuration's names are everyone's.
        await stub.RegisterToolSource(request, metadata=globex)
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await stub.RegisterToolSource(
                tools_pb2.RegisterToolSourceRequest(source=time_source("time")), metadata=acme, timeout=60
            )
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="counter"), metadata=globex)

        async def names(metadata: Any) -> list[str]:
            listed = await stub.ListTools(tools_pb2.ListToolsRequest(), metadata=metadata)
            return [tool.name for tool in listed.tools]

        assert "counter.count_letters" in await names(acme)
        assert "counter.count_letters" not in await names(globex)
        assert "counter.count_letters" not in await names(())  # the default tenant
        listed = await stub.ListToolSources(tools_pb2.ListToolSourcesRequest(), metadata=globex)
        assert [source.name for source in listed.sources] == ["time"]
        request = tools_pb2.ExecuteToolRequest(call_id="c", name="counter.count_letters")
        request.arguments.update({"word": "abc"})
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await stub.ExecuteTool(request, metadata=globex)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await stub.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="counter"), metadata=globex)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        counted = await stub.ExecuteTool(request, metadata=acme)
        assert json_format.MessageToDict(counted.result)["letters"] == 3
    async with tools_service(config(tmp_path)) as stub:
        listed = await stub.ListToolSources(tools_pb2.ListToolSourcesRequest(), metadata=acme)
        assert [source.name for source in listed.sources] == ["counter"]
        assert await stub.ListToolSources(tools_pb2.ListToolSourcesRequest(), metadata=globex) == (
            tools_pb2.ListToolSourcesResponse()
        )


async def test_sources_registered_before_tenants_belong_to_the_default_tenant(tmp_path: Path) -> None:
    import sqlite3

    from services.tools.sources import MIGRATIONS, SourceStore

    path = tmp_path / "tools.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        spec = '{"name": "web", "url": "http://127.0.0.1:9/mcp"}'
        conn.execute("INSERT INTO tool_sources VALUES ('web', 'mcp', ?, 1.0)", (spec,))
    store = SourceStore(path)
    try:
        [(tenant, stored)] = await store.all()
    finally:
        await store.close()
    assert (tenant, stored.name, stored.url) == ("default", "web", "http://127.0.0.1:9/mcp")

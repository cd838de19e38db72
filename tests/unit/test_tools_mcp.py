"""The MCP client against real MCP servers: mcp-server-time and mcp-server-git over stdio, an SDK server over HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import ConfigError, MeshConfig, ServerConfig, ToolsConfig, load_config
from services.common.config import McpServerConfig
from services.tools import Tool, ToolErrorKind, ToolRegistry, create_server, default_registry
from services.tools.mcp_client import McpToolset
from tests.conftest import free_port

pytestmark = pytest.mark.slow

TIME = McpServerConfig(name="time", command=sys.executable, args=["-m", "mcp_server_time", "--local-timezone", "UTC"])

# A real MCP server built with the SDK: a slow tool to interrupt and one that says which process answers.
STDIO_SERVER = """
import os, time
from mcp.server.mcpserver import MCPServer

server = MCPServer("proc")

@server.tool()
def slow(seconds: float) -> str:
    \"\"\"Sleeps, then answers.\"\"\"
    time.sleep(seconds)
    return "woke up"

@server.tool()
def pid() -> int:
    \"\"\"The server's process id.\"\"\"
    return os.getpid()

server.run()
"""

HTTP_SERVER = """
import asyncio, sys
from mcp.server.mcpserver import MCPServer

server = MCPServer("web")

@server.tool()
def add(a: int, b: int) -> int:
    \"\"\"Adds two integers.\"\"\"
    return a + b

@server.tool()
async def slow() -> str:
    \"\"\"Takes a minute.\"\"\"
    await asyncio.sleep(60)
    return "late"

server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", HTTP_SERVER, str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with __import__("socket").create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the streamable-HTTP MCP server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    (repo / "README.md").write_text("hello\n")
    git("add", "README.md")
    git("-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "First commit")
    return repo


@asynccontextmanager
async def connected(*servers: McpServerConfig, registry: ToolRegistry | None = None) -> AsyncIterator[ToolRegistry]:
    registry = registry or ToolRegistry(default_timeout_seconds=10, max_timeout_seconds=30)
    toolset = McpToolset(servers, registry)
    await toolset.start()
    try:
        await asyncio.wait_for(toolset.wait_attempted(), 60)
        yield registry
    finally:
        await toolset.close()


def stdio_server(tmp_path: Path) -> McpServerConfig:
    script = tmp_path / "proc_server.py"
    script.write_text(STDIO_SERVER)
    return McpServerConfig(name="proc", command=sys.executable, args=[str(script)])


async def test_tools_are_listed_namespaced_by_server_with_their_schemas(http_url: str, git_repo: Path) -> None:
    git = McpServerConfig(name="git", command=sys.executable, args=["-m", "mcp_server_git", "-r", str(git_repo)])
    async with connected(TIME, git, McpServerConfig(name="web", url=http_url)) as registry:
        names = [tool.name for tool in registry.list()]
        assert {"time.get_current_time", "time.convert_time", "git.git_status", "git.git_log", "web.add"} <= set(names)
        schema = registry.get("time.get_current_time").input_schema
        assert schema["type"] == "object" and schema["required"] == ["timezone"]
        assert registry.get("web.add").input_schema["properties"].keys() == {"a", "b"}
        assert registry.get("web.add").description == "Adds two integers."


async def test_calls_return_the_servers_results(http_url: str, git_repo: Path) -> None:
    git = McpServerConfig(name="git", command=sys.executable, args=["-m", "mcp_server_git", "-r", str(git_repo)])
    async with connected(TIME, git, McpServerConfig(name="web", url=http_url)) as registry:
        tokyo = await registry.execute("time.get_current_time", {"timezone": "Asia/Tokyo"})
        assert tokyo.ok and tokyo.result["timezone"] == "Asia/Tokyo"
        assert tokyo.result["datetime"].endswith("+09:00")
        log = await registry.execute("git.git_log", {"repo_path": str(git_repo)})
        assert log.ok and "First commit" in str(log.result)
        added = await registry.execute("web.add", {"a": 2, "b": 3})
        assert added.ok and added.result == {"result": 5}


async def test_a_tool_error_is_an_error_observation_with_the_servers_text() -> None:
    async with connected(TIME) as registry:
        outcome = await registry.execute("time.get_current_time", {"timezone": "Mars/Olympus_Mons"})
        assert outcome.error is not None and outcome.error.kind is ToolErrorKind.FAILED
        assert "Invalid timezone" in outcome.error.message


async def test_arguments_breaking_the_mcp_schema_are_refused_before_the_call() -> None:
    async with connected(TIME) as registry:
        with pytest.raises(Exception, match=r"arguments: 'timezone' is a required property"):
            await registry.execute("time.get_current_time", {})


async def test_a_server_killed_mid_call_is_an_error_within_the_timeout_and_restarted_on_the_next_call(
    tmp_path: Path,
) -> None:
    async with connected(stdio_server(tmp_path)) as registry:
        first = await registry.execute("proc.pid")
        assert first.ok
        call = asyncio.create_task(registry.execute("proc.slow", {"seconds": 60}, timeout_seconds=20))
        await asyncio.sleep(0.5)
        os.kill(first.result["result"], signal.SIGKILL)
        outcome = await call
        assert outcome.error is not None and outcome.error.kind is ToolErrorKind.FAILED
        assert outcome.duration_seconds < 20
        assert "proc" in outcome.error.message

        again = await registry.execute("proc.pid")
        assert again.ok and again.result["result"] != first.result["result"]


async def test_a_call_past_its_limit_times_out_and_the_server_keeps_serving(http_url: str) -> None:
    async with connected(McpServerConfig(name="web", url=http_url)) as registry:
        outcome = await registry.execute("web.slow", timeout_seconds=0.5)
        assert outcome.error is not None and outcome.error.kind is ToolErrorKind.TIMEOUT
        assert (await registry.execute("web.add", {"a": 1, "b": 1})).result == {"result": 2}


async def test_a_slow_call_blocks_neither_other_servers_nor_its_own(http_url: str) -> None:
    async with connected(TIME, McpServerConfig(name="web", url=http_url)) as registry:
        slow = asyncio.create_task(registry.execute("web.slow", timeout_seconds=30))
        await asyncio.sleep(0.2)
        other_server = asyncio.create_task(registry.execute("time.get_current_time", {"timezone": "UTC"}))
        same_server = asyncio.create_task(registry.execute("web.add", {"a": 1, "b": 2}))
        done, _ = await asyncio.wait({slow, other_server, same_server}, timeout=25)
        assert done == {other_server, same_server}
        assert other_server.result().ok and same_server.result().result == {"result": 3}
        slow.cancel()


async def test_a_server_that_cannot_start_is_logged_and_the_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = McpServerConfig(name="missing", command=str(tmp_path / "no-such-server"))
    with caplog.at_level(logging.WARNING, logger="services.tools.mcp_client"):
        async with connected(missing, TIME) as registry:
            assert (await registry.execute("time.get_current_time", {"timezone": "UTC"})).ok
            assert not any(tool.name.startswith("missing.") for tool in registry.list())
    assert "MCP server 'missing': connection failed (FileNotFoundError" in caplog.text


async def test_a_tool_name_taken_by_a_registered_tool_is_left_out_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def mine(arguments: dict[str, Any]) -> str:
        return "mine"

    registry = ToolRegistry()
    registry.register(Tool("time.get_current_time", "Already here.", {"type": "object"}, mine))
    with caplog.at_level(logging.WARNING, logger="services.tools.mcp_client"):
        async with connected(TIME, registry=registry):
            assert (await registry.execute("time.get_current_time")).result == "mine"
            assert "time.convert_time" in registry
    assert "tool 'get_current_time' left out: a tool named 'time.get_current_time' is already registered" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        ({"name": "time"}, "tools.mcp_servers.0: Value error, MCP server 'time': set exactly one of command"),
        ({"name": "t", "command": "x", "url": "http://h/mcp"}, "set exactly one of command"),
        ({"name": "Time", "command": "x"}, "tools.mcp_servers.0.name: String should match pattern"),
        ({"name": "t", "cmd": "x"}, "tools.mcp_servers.0.cmd: Extra inputs are not permitted"),
        ({"name": "t", "url": "ftp://h"}, "must start with http:// or https://"),
        ({"name": "t", "url": "http://h/mcp", "args": ["-v"]}, "args and env apply to a command"),
        ({"name": "t", "command": "x", "timeout_seconds": 0}, "tools.mcp_servers.0.timeout_seconds"),
    ],
)
def test_a_malformed_server_config_is_a_config_error_naming_the_field(server: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tools={"mcp_servers": [server]})
    assert needle in str(raised.value)


def test_two_servers_with_one_name_are_a_config_error() -> None:
    servers = [{"name": "time", "command": "a"}, {"name": "time", "command": "b"}]
    with pytest.raises(ConfigError, match=r"mcp_servers\[1\]\.name 'time' is declared twice"):
        load_config(tools={"mcp_servers": servers})


async def test_execute_tool_through_the_tools_service_reaches_the_time_server(tmp_path: Path) -> None:
    config = MeshConfig(data_dir=tmp_path, tools=ToolsConfig(server=ServerConfig(port=0), mcp_servers=[TIME]))
    registry = default_registry(config, knowledge=None)
    async with connected(*config.tools.mcp_servers, registry=registry):
        server = create_server(config, registry=registry)
        await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = tools_pb2_grpc.ToolsServiceStub(channel)
                listed = await stub.ListTools(tools_pb2.ListToolsRequest())
                assert "time.get_current_time" in [tool.name for tool in listed.tools]
                request = tools_pb2.ExecuteToolRequest(call_id="c1", name="time.get_current_time")
                request.arguments.update({"timezone": "Asia/Tokyo"})
                response = await stub.ExecuteTool(request)
        finally:
            await server.stop(0)
    assert not response.HasField("error")
    result = json_format.MessageToDict(response.result)
    assert result["timezone"] == "Asia/Tokyo" and result["datetime"].endswith("+09:00")

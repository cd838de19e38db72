"""`meshpilot tools ...` against a real tools service (its event loop in a thread): list, call, add-mcp with the real
mcp-server-time, sources, remove, and the exit codes of bad command lines and failed calls."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshpilot.cli import app
from services.common import MeshConfig
from services.tools import ToolsService
from tests.conftest import free_port


class ServiceThread:
    """A ToolsService on its own event loop in a thread, so the CLI (which calls asyncio.run) can be invoked."""

    def __init__(self, config: MeshConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.config = config

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def _start(self) -> str:
        self.service = ToolsService(self.config)
        await self.service.start()
        return self.service.server.address

    def __enter__(self) -> str:
        self.thread.start()
        return self._call(self._start())

    def __exit__(self, *exc: object) -> None:
        self._call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[str]:
    config = MeshConfig(
        data_dir=tmp_path, tools={"server": {"port": 0, "metrics": False}, "mcp_endpoint": {"enabled": False}}
    )
    with ServiceThread(config) as target:
        yield target


def invoke(target: str, command: str, *args: str):
    return CliRunner().invoke(app, ["tools", command, "--tools", target, *args])


def test_list_shows_the_tools_and_json_their_schemas(tools: str) -> None:
    text = invoke(tools, "list")
    assert text.exit_code == 0, text.output
    assert "calculator" in text.output and "append_note" in text.output
    listed = json.loads(invoke(tools, "list", "--json").output)
    calculator = next(tool for tool in listed if tool["name"] == "calculator")
    assert calculator["input_schema"]["required"] == ["expression"]


def test_call_prints_the_result_as_json(tools: str) -> None:
    result = invoke(tools, "call", "calculator", '{"expression": "17 * 23"}')
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"result": 391}


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ("{not json", "ARGUMENTS is not JSON"),
        ("[1, 2]", "ARGUMENTS must be a JSON object, not list"),
        ('{"expression": NaN}', "NaN is not a JSON number"),
    ],
)
def test_call_with_arguments_that_are_not_a_json_object_exits_2(tools: str, arguments: str, needle: str) -> None:
    result = invoke(tools, "call", "calculator", arguments)
    assert result.exit_code == 2
    assert needle in result.output


@pytest.mark.parametrize(
    ("name", "arguments", "needle"),
    [
        ("calculator", '{"expr": "1"}', "INVALID_ARGUMENT: invalid arguments for tool 'calculator'"),
        ("nope", "{}", "NOT_FOUND: unknown tool 'nope'"),
        ("calculator", '{"expression": "1 / 0"}', "tool calculator failed:"),
    ],
    ids=["bad-arguments", "unknown-tool", "error-observation"],
)
def test_a_failed_call_exits_1_with_the_reason(tools: str, name: str, arguments: str, needle: str) -> None:
    result = invoke(tools, "call", name, arguments)
    assert result.exit_code == 1
    assert needle in result.output


@pytest.mark.slow
def test_add_mcp_then_call_list_sources_and_remove(tools: str) -> None:
    added = invoke(tools, "add-mcp", "clock", "--env", "TOKEN=secret", "--", sys.executable, "-m", "mcp_server_time")
    assert added.exit_code == 0, added.output
    assert "registered clock: 2 tools" in added.output and "clock.get_current_time" in added.output
    called = invoke(tools, "call", "clock.get_current_time", '{"timezone": "Asia/Tokyo"}')
    assert called.exit_code == 0, called.output
    assert json.loads(called.output)["datetime"].endswith("+09:00")
    listed = invoke(tools, "sources")
    assert "clock" in listed.output and "ready" in listed.output and "api" in listed.output
    assert "secret" not in invoke(tools, "sources", "--json").output
    removed = invoke(tools, "remove", "clock")
    assert removed.exit_code == 0 and "removed clock" in removed.output
    again = invoke(tools, "remove", "clock")
    assert again.exit_code == 1 and "NOT_FOUND" in again.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["add-mcp", "x"], "give either a command after -- (a stdio server) or --url"),
        (["add-mcp", "x", "--url", "http://127.0.0.1:9/mcp", "--", "python"], "give either a command"),
        (["add-mcp", "x", "--header", "novalue", "--url", "http://127.0.0.1:9/mcp"], "must be KEY=VALUE"),
        (["add-openapi", "x", "/nonexistent/api.yaml"], "cannot read /nonexistent/api.yaml"),
    ],
)
def test_a_bad_command_line_exits_2(tools: str, args: list[str], needle: str) -> None:
    result = invoke(tools, *args)
    assert result.exit_code == 2
    assert needle in result.output


def test_an_unreachable_tools_service_exits_1_with_a_hint() -> None:
    result = invoke(f"127.0.0.1:{free_port()}", "list")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.output and "meshpilot up" in result.output

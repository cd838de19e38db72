"""ToolRegistry: registration checks, argument validation before running, and failures as error observations."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from services.common import InvalidArgumentError, NotFoundError
from services.tools import Tool, ToolDefinitionError, ToolErrorKind, ToolFailure, ToolRegistry

SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["expression"],
    "additionalProperties": False,
}


class Recorder:
    """An async handler that records the arguments it was called with."""

    def __init__(self, result: Any = "ok") -> None:
        self.calls: list[dict[str, Any]] = []
        self.result = result

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        self.calls.append(arguments)
        return self.result


def make_tool(name: str = "echo", handler: Any = None, schema: dict[str, Any] | None = None, **kwargs: Any) -> Tool:
    return Tool(name, "Echo the arguments.", schema or SCHEMA, handler or Recorder(), **kwargs)


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry(default_timeout_seconds=5.0, max_timeout_seconds=10.0)


@pytest.mark.parametrize("name", ["", "Echo", "1tool", "with-dash", "with space", "x" * 65, "é"])
def test_register_refuses_bad_names(registry: ToolRegistry, name: str) -> None:
    with pytest.raises(ToolDefinitionError, match=r"must match \^\[a-z\]"):
        registry.register(make_tool(name))


def test_register_accepts_longest_name_and_refuses_duplicates(registry: ToolRegistry) -> None:
    registry.register(make_tool("a" + "b" * 63))
    registry.register(make_tool("echo"))
    with pytest.raises(ToolDefinitionError, match="'echo' is already registered"):
        registry.register(make_tool("echo"))
    assert [t.name for t in registry.list()] == ["a" + "b" * 63, "echo"]


def test_register_refuses_invalid_schema(registry: ToolRegistry) -> None:
    bad = {"type": "object", "properties": {"x": {"type": "strnig"}}}
    with pytest.raises(ToolDefinitionError, match="not a valid JSON Schema at properties/x/type"):
        registry.register(make_tool(schema=bad))
    with pytest.raises(ToolDefinitionError, match="of type 'object'"):
        registry.register(make_tool(schema={"type": "string"}))
    assert registry.list() == []


def test_register_refuses_sync_handler_and_empty_description(registry: ToolRegistry) -> None:
    with pytest.raises(ToolDefinitionError, match="handler must be an async function"):
        registry.register(make_tool(handler=lambda arguments: 1))
    with pytest.raises(ToolDefinitionError, match="needs a description"):
        registry.register(Tool("echo", " ", SCHEMA, Recorder()))
    with pytest.raises(ToolDefinitionError, match="timeout_seconds must be positive"):
        registry.register(make_tool(timeout_seconds=0))


async def test_register_accepts_async_callables(registry: ToolRegistry) -> None:
    async def handler(arguments: dict[str, Any], suffix: str) -> str:
        return arguments["expression"] + suffix

    registry.register(make_tool("partial", handler=functools.partial(handler, suffix="!")))
    registry.register(make_tool("instance", handler=Recorder()))
    outcome = await registry.execute("partial", {"expression": "hi"})
    assert outcome.result == "hi!"


async def test_unknown_tool_lists_available_tools(registry: ToolRegistry) -> None:
    registry.register(make_tool("calculator"))
    registry.register(make_tool("current_time"))
    with pytest.raises(NotFoundError, match=r"unknown tool 'calc'; available tools: calculator, current_time"):
        await registry.execute("calc", {"expression": "1"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"expression": 3}, "arguments.expression: 3 is not of type 'string'"),
        ({}, "arguments: 'expression' is a required property"),
        (
            {"expression": "1", "extra": True},
            r"arguments: Additional properties are not allowed \('extra' was unexpected\)",
        ),
        ({"expression": "1", "count": 2.5}, "arguments.count: 2.5 is not of type 'integer'"),
        ({"expression": "1", "count": "2"}, "arguments.count: '2' is not of type 'integer'"),
    ],
)
async def test_bad_arguments_name_the_path_and_nothing_runs(
    registry: ToolRegistry, arguments: dict[str, Any], message: str
) -> None:
    handler = Recorder()
    registry.register(make_tool(handler=handler))
    with pytest.raises(InvalidArgumentError, match=f"invalid arguments for tool 'echo': {message}"):
        await registry.execute("echo", arguments)
    assert handler.calls == []


async def test_nested_paths_use_dots_and_indexes(registry: ToolRegistry) -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "number"}}}}
        },
    }
    registry.register(make_tool(schema=schema))
    with pytest.raises(InvalidArgumentError, match=r"arguments\.items\[1\]\.n: 'x' is not of type 'number'"):
        await registry.execute("echo", {"items": [{"n": 1}, {"n": "x"}]})


async def test_integral_floats_become_ints(registry: ToolRegistry) -> None:
    """Struct sends every number as a double: 3.0 must pass an integer schema and reach the handler as 3."""
    handler = Recorder()
    registry.register(make_tool(handler=handler))
    outcome = await registry.execute("echo", {"expression": "x", "count": 3.0})
    assert outcome.ok
    assert handler.calls == [{"expression": "x", "count": 3}]
    assert type(handler.calls[0]["count"]) is int


async def test_long_offending_values_are_shortened_in_the_message(registry: ToolRegistry) -> None:
    registry.register(make_tool())
    with pytest.raises(InvalidArgumentError) as caught:
        await registry.execute("echo", {"expression": ["x" * 2000]})
    assert len(str(caught.value)) < 400
    assert "arguments.expression:" in str(caught.value)


async def test_success_returns_result_and_duration(registry: ToolRegistry) -> None:
    registry.register(make_tool(handler=Recorder({"answer": 42, "items": (1, 2)})))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.ok and outcome.error is None
    assert outcome.result == {"answer": 42, "items": [1, 2]}
    assert outcome.duration_seconds >= 0


async def test_tool_failure_becomes_failed_observation(registry: ToolRegistry) -> None:
    async def fails(arguments: dict[str, Any]) -> Any:
        raise ToolFailure("no country named 'Atlantis'")

    registry.register(make_tool(handler=fails))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert outcome.error.message == "no country named 'Atlantis'"
    assert outcome.duration_seconds >= 0


async def test_unexpected_exception_becomes_failed_observation(registry: ToolRegistry) -> None:
    async def crashes(arguments: dict[str, Any]) -> Any:
        raise KeyError("missing")

    registry.register(make_tool(handler=crashes))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert outcome.error.message == "tool 'echo' failed: KeyError: 'missing'"


async def test_timeout_error_raised_by_the_tool_is_a_failure_not_a_timeout(registry: ToolRegistry) -> None:
    async def socket_timeout(arguments: dict[str, Any]) -> Any:
        raise TimeoutError("upstream took too long")

    registry.register(make_tool(handler=socket_timeout))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert "upstream took too long" in outcome.error.message


@pytest.mark.parametrize(
    "result",
    [object(), {1, 2}, float("nan"), {"x": float("inf")}, b"bytes"],
    ids=["object", "set", "nan", "inf", "bytes"],
)
async def test_non_json_result_becomes_failed_observation(registry: ToolRegistry, result: Any) -> None:
    registry.register(make_tool(handler=Recorder(result)))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert "returned a result that is not valid JSON" in outcome.error.message


async def test_oversized_result_becomes_failed_observation(registry: ToolRegistry) -> None:
    registry.register(make_tool(handler=Recorder("x" * (2 * 1024 * 1024))))
    outcome = await registry.execute("echo", {"expression": "x"})
    assert outcome.error is not None
    assert "more than the 1048576 allowed" in outcome.error.message


class Sleeper:
    """Sleeps far past any test's limit and records whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_timeout_becomes_timeout_observation_and_cancels_the_tool(registry: ToolRegistry) -> None:
    sleeper = Sleeper()
    registry.register(make_tool(handler=sleeper))
    outcome = await registry.execute("echo", {"expression": "x"}, timeout_seconds=0.05)
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.TIMEOUT
    assert outcome.error.message == "tool 'echo' ran past its time limit of 0.05s"
    assert sleeper.cancelled


def test_effective_timeout_prefers_caller_then_tool_then_default_and_caps(registry: ToolRegistry) -> None:
    plain = registry.register(make_tool("plain"))
    slow = registry.register(make_tool("slow", timeout_seconds=8.0))
    very_slow = registry.register(make_tool("very_slow", timeout_seconds=600.0))
    assert registry.effective_timeout(plain, None) == 5.0
    assert registry.effective_timeout(slow, None) == 8.0
    assert registry.effective_timeout(very_slow, None) == 10.0
    assert registry.effective_timeout(plain, 2.0) == 2.0
    assert registry.effective_timeout(plain, 3600.0) == 10.0
    assert registry.effective_timeout(slow, 0) == 8.0


async def test_negative_timeout_is_invalid_argument(registry: ToolRegistry) -> None:
    handler = Recorder()
    registry.register(make_tool(handler=handler))
    with pytest.raises(InvalidArgumentError, match="timeout must be positive"):
        await registry.execute("echo", {"expression": "x"}, timeout_seconds=-1.0)
    assert handler.calls == []

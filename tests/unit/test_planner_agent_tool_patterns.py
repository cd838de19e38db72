"""Agent tool allowlists: exact names, "*" and "server.*" for every tool of one MCP server."""

from __future__ import annotations

import pytest

from services.common import InvalidArgumentError
from services.planner.agents import AgentDefinition, check_definition
from services.planner.types import ToolSpec

TOOLS = [
    ToolSpec(name, "A tool.", {"type": "object"})
    for name in ("calculator", "time.get_current_time", "time.convert_time", "git.git_log")
]


def agent(*tools: str) -> AgentDefinition:
    return AgentDefinition(instructions="Help.", tools=tools)


def test_a_server_pattern_allows_every_tool_of_that_server_and_no_other() -> None:
    definition = agent("time.*")
    assert definition.allows("time.get_current_time") and definition.allows("time.convert_time")
    assert not definition.allows("git.git_log")
    assert not definition.allows("calculator")


def test_exact_names_and_the_wildcard_still_work() -> None:
    assert agent("calculator", "git.git_log").allows("git.git_log")
    assert not agent("calculator").allows("time.get_current_time")
    assert agent("*").allows("time.get_current_time") and agent("*").allows("calculator")


def test_a_dotless_tool_is_not_matched_by_a_server_pattern() -> None:
    assert not agent("calculator.*").allows("calculator")


def test_check_definition_accepts_a_pattern_of_a_served_mcp_server() -> None:
    checked = check_definition("timekeeper", agent("time.*", "calculator"), TOOLS, [])
    assert checked.tools == ("time.*", "calculator")


@pytest.mark.parametrize(
    ("tools", "needle"),
    [
        (("weather.*",), "spec.tools[0]: unknown tool 'weather.*'"),
        (("calculator.*",), "spec.tools[0]: unknown tool 'calculator.*'"),
        (("time.get_weather",), "spec.tools[0]: unknown tool 'time.get_weather'"),
    ],
)
def test_check_definition_refuses_a_pattern_or_name_nothing_serves(tools: tuple[str, ...], needle: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        check_definition("timekeeper", agent(*tools), TOOLS, [])
    assert needle in str(raised.value) and '"server.*" for all of an MCP server' in str(raised.value)


def test_approval_required_takes_exact_names_only() -> None:
    definition = AgentDefinition(instructions="Help.", tools=("time.*",), approval_required=("time.*",))
    with pytest.raises(InvalidArgumentError, match=r"spec\.approval_required\[0\]: unknown tool 'time\.\*'"):
        check_definition("timekeeper", definition, TOOLS, [])

"""The Berkeley Function Calling Leaderboard's simple category as a suite, and the MCP server that offers its functions
as tools (``python -m services.eval.bfcl SUITE``): each task's agent gets exactly its function, through the tools
registry like any user's tool, and the check compares the call with BFCL's possible answers."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2
from services.eval.checks import ToolCalled
from services.eval.suite import EvalTask, Suite, load_suite

SOURCE = "bfcl"  # the tool source the functions are registered as: its tools are bfcl.<function>
CATEGORY = "bfcl_simple"
# BFCL's types are Python's; JSON Schema (what the tools registry validates arguments with) names them differently.
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def tool_name(function: str) -> str:
    """A BFCL function name as a tool name the registry accepts: "math.factorial" -> "math_factorial"."""
    name = re.sub(r"[^a-z0-9_]+", "_", function.lower()).strip("_")
    return (name if name[:1].isalpha() else f"f_{name}")[:63]


def agent_name(task_id: str) -> str:
    """The agent of one BFCL task: "simple_python_12" -> "bfcl-simple-python-12"."""
    return ("bfcl-" + re.sub(r"[^a-z0-9]+", "-", task_id.lower()).strip("-"))[:63]


def json_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """BFCL's parameter description as JSON Schema (types renamed, BFCL's own keys dropped)."""
    schema: dict[str, Any] = {}
    kind = parameters.get("type")
    if kind is not None and _TYPES.get(kind, kind) is not None:
        schema["type"] = _TYPES.get(kind, kind)
    for key in ("description", "enum", "required", "default"):
        if key in parameters:
            schema[key] = parameters[key]
    if "properties" in parameters:
        schema["properties"] = {name: json_schema(value) for name, value in parameters["properties"].items()}
    if "items" in parameters:
        schema["items"] = json_schema(parameters["items"])
    return schema


def task_number(task_id: str) -> int:
    """The number of a BFCL task: "simple_python_12" -> 12."""
    match = re.search(r"_([0-9]+)$", task_id)
    if match is None:
        raise ValueError(f"BFCL task id {task_id!r} does not end in _<number>")
    return int(match[1])


def split_by_function(tasks: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The fixed split of (task id, function) pairs: every task of a function goes where the function's lowest task
    number says, train when it is odd, test when it is even. BFCL repeats some functions across tasks; one function
    on both sides would put a test call's schema (and often its values) into training. Alternating by number spreads
    both halves over BFCL's topics, which come in runs (math, physics, finance ...)."""
    first: dict[str, int] = {}
    for task_id, function in tasks:
        first[function] = min(first.get(function, task_number(task_id)), task_number(task_id))
    return {task_id: "train" if first[function] % 2 else "test" for task_id, function in tasks}


def bfcl_solution(tool: str, possible: Mapping[str, Sequence[Any]], schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """BFCL's possible answers as a reference solution: one call of ``tool`` with each argument's first possible
    value (``first_values``)."""
    return [{"tool": tool, "arguments": first_values(possible, schema)}]


def first_values(possible: Mapping[str, Sequence[Any]], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Each argument's first possible value; an optional argument BFCL lets be omitted ("" among its values, or no
    values) is left out, a required one (``schema``'s) takes its first other value. A dict's values are BFCL's
    possible values in turn (also inside a list): {"department": ["Science"]} is the argument {"department":
    "Science"}."""
    required = set(schema.get("required", ()))
    properties = schema.get("properties") or {}
    arguments: dict[str, Any] = {}
    for name, accepted in possible.items():
        given = [value for value in accepted if value != ""]
        if not given or (len(given) < len(accepted) and name not in required):
            continue
        arguments[name] = _plain(given[0], properties.get(name) or {})
    return arguments


def _plain(value: Any, schema: Mapping[str, Any]) -> Any:
    """A possible value as an argument: dicts, also inside lists, hold possible values in turn."""
    if isinstance(value, dict):
        return first_values(value, schema)
    if isinstance(value, list):
        return [_plain(item, schema.get("items") or {}) for item in value]
    return value


def convert_bfcl(questions: str, answers: str) -> list[EvalTask]:
    """BFCL's question file and its possible-answer file (JSON lines) as tasks with a tool_call check each, split
    by ``split_by_function`` and with a ``meta.solution`` from the possible answers.

    A function name BFCL gives several different functions (calculate_bmi has four signatures) becomes one tool
    name per signature (calculate_bmi, calculate_bmi_2, ...): the tools are listed by name, and one name would give
    every task the last signature."""
    truth = {row["id"]: row["ground_truth"] for row in map(json.loads, answers.splitlines()) if row}
    rows = [json.loads(line) for line in questions.splitlines() if line.strip()]
    splits = split_by_function([(row["id"], tool_name(row["function"][0]["name"])) for row in rows])
    taken: dict[str, dict[str, Any]] = {}
    tasks = []
    for row in rows:
        (function,) = row["function"]
        ((expected_name, expected_arguments),) = truth[row["id"]][0].items()
        if tool_name(expected_name) != tool_name(function["name"]):
            raise ValueError(f"{row['id']}: the answer calls {expected_name}, the task offers {function['name']}")
        tool = {"name": "", "description": function.get("description", ""), "input_schema": json_schema(
            function["parameters"]
        )}  # fmt: skip
        tool["name"] = _unique_name(tool_name(function["name"]), tool, taken)
        question = " ".join(turn["content"] for turn in row["question"][0] if turn["role"] == "user")
        check = ToolCalled(f"{SOURCE}.{tool['name']}", {k: tuple(v) for k, v in expected_arguments.items()})
        meta = {"bfcl_id": row["id"], "function": function["name"], "tool": tool}
        meta["solution"] = bfcl_solution(check.tool, expected_arguments, tool["input_schema"])
        tasks.append(EvalTask(row["id"], question, (check,), CATEGORY, splits[row["id"]], agent_name(row["id"]), meta))
    return tasks


def _unique_name(name: str, tool: dict[str, Any], taken: dict[str, dict[str, Any]]) -> str:
    """``name``, or ``name_2``, ``name_3`` ...: the first that is free or names this very tool; recorded in
    ``taken``."""
    number = 1
    while True:
        candidate = name if number == 1 else f"{name[:58]}_{number}"
        if candidate not in taken or _same_tool(taken[candidate], tool):
            taken[candidate] = tool
            return candidate
        number += 1


def _same_tool(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["description"], a["input_schema"]) == (b["description"], b["input_schema"])


def bfcl_agent_spec(task: EvalTask) -> dict[str, Any]:
    """The agent a BFCL task runs with: the planner's guided policy, allowed exactly the task's function."""
    tool = task.meta["tool"]
    return {
        "instructions": "You call the one function that does what the user asks, with the arguments the user gives.",
        "tools": [f"{SOURCE}.{tool['name']}"],
    }


def has_functions(suite: Suite) -> bool:
    """Whether some task of ``suite`` runs with its own BFCL function (then ``prepare_bfcl`` must run first)."""
    return any(task.agent and "tool" in task.meta for task in suite.tasks)


def functions(suite: Suite) -> dict[str, dict[str, Any]]:
    """The functions the MCP server of ``suite`` offers, by tool name: {"name", "description", "input_schema"}."""
    return {task.meta["tool"]["name"]: task.meta["tool"] for task in suite.tasks if "tool" in task.meta}


def acknowledgement(function: str, arguments: Mapping[str, Any]) -> str:
    """What the MCP server answers a call with: the call itself, done (BFCL's simple category judges the call, not
    what the function would return)."""
    return json.dumps({"called": function, "arguments": dict(arguments), "status": "done"})


async def prepare_bfcl(channel: grpc.aio.Channel, suite: Suite, suite_path: Path, *, timeout_s: float = 60.0) -> int:
    """Registers the suite's functions as the tool source ``bfcl`` (this module as an MCP stdio server, started by
    the tools service) and creates each task's agent, both through the planner as the caller's tenant. A source
    registered already for this suite file is kept (for another file, it is registered again); an agent that exists
    keeps its spec, except that its tools are set to the task's function when they are not (a regenerated suite may
    have renamed it). Returns how many agents were created or updated."""
    source = tools_pb2.ToolSource(name=SOURCE)
    source.mcp.command = sys.executable
    source.mcp.args.extend(["-m", "services.eval.bfcl", str(suite_path.resolve())])
    sources = tool_sources_pb2_grpc.ToolSourceServiceStub(channel)
    register = tools_pb2.RegisterToolSourceRequest(source=source)
    try:
        await sources.RegisterToolSource(register, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        # Registered for another suite file (a subset, a newer BFCL), it would lack this suite's functions: the
        # source is registered again for this file.
        listed = (await sources.ListToolSources(tools_pb2.ListToolSourcesRequest(), timeout=timeout_s)).sources
        if any(s.name == SOURCE and list(s.mcp.args) != list(source.mcp.args) for s in listed):
            await sources.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name=SOURCE), timeout=timeout_s)
            await sources.RegisterToolSource(register, timeout=timeout_s)
    agents = agents_pb2_grpc.AgentServiceStub(channel)
    changed = 0
    for task in suite.tasks:
        if not task.agent or "tool" not in task.meta:
            continue
        spec = agents_pb2.AgentSpec(**bfcl_agent_spec(task))
        try:
            await agents.CreateAgent(agents_pb2.CreateAgentRequest(name=task.agent, spec=spec), timeout=timeout_s)
            changed += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            current = (await agents.GetAgent(agents_pb2.GetAgentRequest(name=task.agent), timeout=timeout_s)).spec
            if list(current.tools) != list(spec.tools):
                current.ClearField("tools")
                current.tools.extend(spec.tools)
                request = agents_pb2.UpdateAgentRequest(name=task.agent, spec=current)
                await agents.UpdateAgent(request, timeout=timeout_s)
                changed += 1
    return changed


def serve(suite_path: str) -> None:
    """An MCP stdio server whose tools are the functions of the suite's tasks; a call is acknowledged with its
    arguments (``acknowledgement``)."""
    import anyio
    import mcp_types as types
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    tools = {
        name: types.Tool(name=name, description=spec["description"] or name, input_schema=spec["input_schema"])
        for name, spec in functions(load_suite(Path(suite_path))).items()
    }

    async def list_tools(context: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(tools.values()))

    async def call_tool(context: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in tools:
            return types.CallToolResult(content=[types.TextContent(text=f"no function {params.name}")], is_error=True)
        text = acknowledgement(params.name, params.arguments or {})
        return types.CallToolResult(content=[types.TextContent(text=text)])

    server = Server("bfcl", on_list_tools=list_tools, on_call_tool=call_tool)

    async def run() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    anyio.run(run)


if __name__ == "__main__":
    serve(sys.argv[1])

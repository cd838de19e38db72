"""The Berkeley Function Calling Leaderboard's simple category as a suite, and the MCP server that offers its functions
as tools (``python -m services.eval.bfcl SUITE``): each task's agent gets exactly its function, through the tools
registry like any user's tool, and the check compares the call with BFCL's possible answers."""

from __future__ import annotations

import json
import re
import sys
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


def convert_bfcl(questions: str, answers: str) -> list[EvalTask]:
    """BFCL's question file and its possible-answer file (JSON lines) as tasks with a tool_call check each."""
    truth = {row["id"]: row["ground_truth"] for row in map(json.loads, answers.splitlines()) if row}
    tasks = []
    for line in questions.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        (function,) = row["function"]
        ((expected_name, expected_arguments),) = truth[row["id"]][0].items()
        name = tool_name(function["name"])
        tool = {"name": name, "description": function.get("description", ""), "input_schema": json_schema(
            function["parameters"]
        )}  # fmt: skip
        question = " ".join(turn["content"] for turn in row["question"][0] if turn["role"] == "user")
        check = ToolCalled(f"{SOURCE}.{tool_name(expected_name)}", {k: tuple(v) for k, v in expected_arguments.items()})
        meta = {"bfcl_id": row["id"], "function": function["name"], "tool": tool}
        tasks.append(EvalTask(row["id"], question, (check,), CATEGORY, "test", agent_name(row["id"]), meta))
    return tasks


def bfcl_agent_spec(task: EvalTask) -> dict[str, Any]:
    """The agent a BFCL task runs with: the planner's guided policy, allowed exactly the task's function."""
    tool = task.meta["tool"]
    return {
        "instructions": "You call the one function that does what the user asks, with the arguments the user gives.",
        "tools": [f"{SOURCE}.{tool['name']}"],
    }


async def prepare_bfcl(channel: grpc.aio.Channel, suite: Suite, suite_path: Path, *, timeout_s: float = 60.0) -> int:
    """Registers the suite's functions as the tool source ``bfcl`` (this module as an MCP stdio server, started by
    the tools service) and creates each task's agent, both through the planner as the caller's tenant; what exists
    already is kept. Returns how many agents were created."""
    source = tools_pb2.ToolSource(name=SOURCE)
    source.mcp.command = sys.executable
    source.mcp.args.extend(["-m", "services.eval.bfcl", str(suite_path.resolve())])
    try:
        await tool_sources_pb2_grpc.ToolSourceServiceStub(channel).RegisterToolSource(
            tools_pb2.RegisterToolSourceRequest(source=source), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    agents = agents_pb2_grpc.AgentServiceStub(channel)
    created = 0
    for task in suite.tasks:
        if not task.agent or "tool" not in task.meta:
            continue
        spec = agents_pb2.AgentSpec(**bfcl_agent_spec(task))
        try:
            await agents.CreateAgent(agents_pb2.CreateAgentRequest(name=task.agent, spec=spec), timeout=timeout_s)
            created += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    return created


def serve(suite_path: str) -> None:
    """An MCP stdio server whose tools are the functions of the suite's tasks; a call is acknowledged with its
    arguments (BFCL's simple category judges the call, not what the function would return)."""
    import anyio
    import mcp_types as types
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    tools = {}
    for task in load_suite(Path(suite_path)).tasks:
        if "tool" in task.meta:
            spec = task.meta["tool"]
            tools[spec["name"]] = types.Tool(
                name=spec["name"], description=spec["description"] or spec["name"], input_schema=spec["input_schema"]
            )

    async def list_tools(context: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(tools.values()))

    async def call_tool(context: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in tools:
            return types.CallToolResult(content=[types.TextContent(text=f"no function {params.name}")], is_error=True)
        text = json.dumps({"called": params.name, "arguments": params.arguments or {}, "status": "done"})
        return types.CallToolResult(content=[types.TextContent(text=text)])

    server = Server("bfcl", on_list_tools=list_tools, on_call_tool=call_tool)

    async def run() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    anyio.run(run)


if __name__ == "__main__":
    serve(sys.argv[1])

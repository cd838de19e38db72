"""`meshpilot tools ...`: list and call the tools, and add or remove tool sources (MCP servers, OpenAPI documents)
at runtime. Sources and the list go through the planner's ToolSourceService (the front door: the API key's tenant
owns what it registers); with --tools they go to the tools service directly (an operator's debugging, the default
tenant). `call` always dials the tools service: it runs a tool outside any agent run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from meshpilot.cli.options import (
    UNARY_TIMEOUT_S,
    ConfigOption,
    JsonOption,
    PlannerOption,
    call_service,
    fail,
    planner_target,
    service_target,
)
from meshpilot.planner.v1 import tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc

tools_app = typer.Typer(
    help="The tools service: list and call tools, add MCP servers and OpenAPI documents.", no_args_is_help=True
)

ToolsOption = Annotated[
    str | None, typer.Option("--tools", help="Tools service address HOST:PORT (default from config).")
]
DirectOption = Annotated[
    str | None,
    typer.Option(
        "--tools", help="Talk to the tools service at HOST:PORT directly instead of through the planner (operators)."
    ),
]
SourceName = Annotated[str, typer.Argument(help="The source's name, the prefix of its tools (e.g. time).")]
HeaderOption = Annotated[list[str] | None, typer.Option("--header", help="An HTTP header KEY=VALUE (repeatable).")]
TimeoutOption = Annotated[
    float, typer.Option(min=0, help="Default time limit of a call to its tools, seconds; 0: the service's.")
]
ApprovalOption = Annotated[
    list[str] | None,
    typer.Option("--approval-required", help="A tool of the source (without prefix) that needs approval; '*' for all."),
]
_STATES = {
    tools_pb2.ToolSource.STATE_CONNECTING: "connecting",
    tools_pb2.ToolSource.STATE_READY: "ready",
    tools_pb2.ToolSource.STATE_FAILED: "failed",
}
_ORIGINS = {tools_pb2.ToolSource.ORIGIN_CONFIG: "config", tools_pb2.ToolSource.ORIGIN_API: "api"}


def _target(tools: str | None, config: Path | None) -> str:
    return service_target("tools", tools, config)


def _stub(channel: grpc.aio.Channel) -> tools_pb2_grpc.ToolsServiceStub:
    return tools_pb2_grpc.ToolsServiceStub(channel)


def _route(
    planner: str | None, tools: str | None, config: Path | None
) -> tuple[str, Callable[[grpc.aio.Channel], Any]]:
    """Where source and listing calls go, and the stub that makes them (both services share the methods)."""
    if tools:
        return service_target("tools", tools, config), tools_pb2_grpc.ToolsServiceStub
    return planner_target(planner, config), tool_sources_pb2_grpc.ToolSourceServiceStub


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            fail(f"{option} {value!r} must be KEY=VALUE", 2)
        pairs[key] = rest
    return pairs


def _json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _first_line(text: str, width: int = 80) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


@tools_app.command("list")
def list_tools(
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    tools: DirectOption = None,
    config: ConfigOption = None,
) -> None:
    """List the tools with the first line of their descriptions (--json: with their input schemas)."""
    target, stub = _route(planner, tools, config)
    response = call_service(
        target, lambda ch: stub(ch).ListTools(tools_pb2.ListToolsRequest(), timeout=UNARY_TIMEOUT_S)
    )
    if json_output:
        typer.echo(json.dumps([_json(tool) for tool in response.tools], ensure_ascii=False))
        return
    table = Table("NAME", "APPROVAL", "DESCRIPTION", box=None)
    for tool in response.tools:
        table.add_row(tool.name, "required" if tool.requires_approval else "", _first_line(tool.description))
    Console(soft_wrap=True).print(table)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; tools take finite numbers only")


@tools_app.command()
def call(
    name: Annotated[str, typer.Argument(help="The tool, e.g. calculator or time.get_current_time.")],
    arguments: Annotated[
        str, typer.Argument(help='Its arguments as a JSON object, e.g. \'{"expression": "2+2"}\'.')
    ] = "{}",
    timeout: Annotated[float, typer.Option(min=0, help="Time limit of the call, seconds; 0: the tool's default.")] = 0,
    tools: ToolsOption = None,
    config: ConfigOption = None,
) -> None:
    """Call a tool once and print its result as JSON; an error observation is printed on stderr (exit 1)."""
    try:
        parsed = json.loads(arguments, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        fail(f"ARGUMENTS is not JSON ({e.msg} at position {e.pos}); pass an object such as '{{\"x\": 1}}'", 2)
    except ValueError as e:
        fail(f"ARGUMENTS: {e}", 2)
    if not isinstance(parsed, dict):
        fail(f"ARGUMENTS must be a JSON object, not {type(parsed).__name__}", 2)
    request = tools_pb2.ExecuteToolRequest(call_id="cli", name=name)
    try:
        request.arguments.update(parsed)
    except ValueError as e:
        fail(f"ARGUMENTS cannot be sent: {e}", 2)
    if timeout:
        request.timeout.FromNanoseconds(round(timeout * 1e9))
    response = call_service(
        _target(tools, config),
        lambda ch: _stub(ch).ExecuteTool(request, timeout=max(timeout, UNARY_TIMEOUT_S) + 5),
    )
    if response.WhichOneof("outcome") == "error":
        kind = tools_pb2.ToolError.Kind.Name(response.error.kind).removeprefix("KIND_").lower()
        fail(f"tool {name} {kind}: {response.error.message}", 1)
    value = json_format.MessageToDict(response.result) if response.HasField("result") else None
    typer.echo(json.dumps(value, ensure_ascii=False, indent=2))


def _register(
    route: tuple[str, Callable[[grpc.aio.Channel], Any]], source: tools_pb2.ToolSource, json_output: bool
) -> None:
    target, stub = route
    request = tools_pb2.RegisterToolSourceRequest(source=source)
    # An MCP server gets up to 30 s to start and list its tools.
    registered = call_service(target, lambda ch: stub(ch).RegisterToolSource(request, timeout=UNARY_TIMEOUT_S + 20))
    if json_output:
        typer.echo(json.dumps(_json(registered), ensure_ascii=False))
        return
    typer.echo(f"registered {registered.name}: {len(registered.tools)} tools")
    for tool in registered.tools:
        typer.echo(f"  {tool}")


def _source(name: str, timeout: float, approval_required: list[str] | None) -> tools_pb2.ToolSource:
    source = tools_pb2.ToolSource(name=name, approval_required=approval_required or [])
    if timeout:
        source.timeout.FromNanoseconds(round(timeout * 1e9))
    return source


@tools_app.command("add-mcp")
def add_mcp(
    name: SourceName,
    command: Annotated[
        list[str] | None, typer.Argument(help="After --: the stdio server's command and its arguments.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A streamable HTTP server instead, e.g. http://host:8000/mcp.")
    ] = None,
    header: HeaderOption = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="An environment variable KEY=VALUE of the command (repeatable).")
    ] = None,
    timeout: TimeoutOption = 0,
    approval_required: ApprovalOption = None,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    tools: DirectOption = None,
    config: ConfigOption = None,
) -> None:
    """Register an MCP server: `add-mcp time -- python -m mcp_server_time` or `add-mcp web --url URL`."""
    if bool(command) == bool(url):
        fail("give either a command after -- (a stdio server) or --url (a streamable HTTP server)", 2)
    source = _source(name, timeout, approval_required)
    if command:
        source.mcp.command, *args = command
        source.mcp.args.extend(args)
        source.mcp.env.update(_pairs(env, "--env"))
    else:
        source.mcp.url = url or ""
    source.mcp.headers.update(_pairs(header, "--header"))
    _register(_route(planner, tools, config), source, json_output)


@tools_app.command("add-openapi")
def add_openapi(
    name: SourceName,
    document: Annotated[Path, typer.Argument(help="The OpenAPI 3 document (JSON or YAML).")],
    base_url: Annotated[
        str | None, typer.Option(help="Which of the document's servers to call; default its first.")
    ] = None,
    header: HeaderOption = None,
    max_response_bytes: Annotated[int, typer.Option(min=0, help="Largest response body; 0: 1 MiB.")] = 0,
    timeout: TimeoutOption = 0,
    approval_required: ApprovalOption = None,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    tools: DirectOption = None,
    config: ConfigOption = None,
) -> None:
    """Register an HTTP API: each operation of DOCUMENT becomes the tool NAME.<operation>."""
    try:
        text = document.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {document}: {getattr(e, 'strerror', None) or e}", 2)
    source = _source(name, timeout, approval_required)
    source.openapi.document = text
    source.openapi.base_url = base_url or ""
    source.openapi.headers.update(_pairs(header, "--header"))
    source.openapi.max_response_bytes = max_response_bytes
    _register(_route(planner, tools, config), source, json_output)


@tools_app.command()
def sources(
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    tools: DirectOption = None,
    config: ConfigOption = None,
) -> None:
    """List the tool sources (configured and registered) with their state and tools."""
    target, stub = _route(planner, tools, config)
    response = call_service(
        target, lambda ch: stub(ch).ListToolSources(tools_pb2.ListToolSourcesRequest(), timeout=UNARY_TIMEOUT_S)
    )
    if json_output:
        typer.echo(json.dumps([_json(source) for source in response.sources], ensure_ascii=False))
        return
    table = Table("NAME", "KIND", "ORIGIN", "STATE", "TOOLS", "ENDPOINT", box=None)
    for source in response.sources:
        kind = source.WhichOneof("kind") or ""
        if kind == "mcp":
            endpoint = source.mcp.url or " ".join([source.mcp.command, *source.mcp.args])
        else:
            endpoint = source.openapi.base_url
        state = _STATES.get(source.state, "?") + (f": {_first_line(source.error, 60)}" if source.error else "")
        table.add_row(source.name, kind, _ORIGINS.get(source.origin, "?"), state, str(len(source.tools)), endpoint)
    Console(soft_wrap=True).print(table)


@tools_app.command()
def remove(
    name: SourceName, planner: PlannerOption = None, tools: DirectOption = None, config: ConfigOption = None
) -> None:
    """Unregister a source added with add-mcp or add-openapi, and its tools."""
    request = tools_pb2.UnregisterToolSourceRequest(name=name)
    target, stub = _route(planner, tools, config)
    call_service(target, lambda ch: stub(ch).UnregisterToolSource(request, timeout=UNARY_TIMEOUT_S))
    typer.echo(f"removed {name}")

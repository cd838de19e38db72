"""`meshpilot agents ...`: create, update, read, list and delete agent definitions on the planner's AgentService."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from meshpilot.cli.agent_file import AgentFile, AgentFileError, agent_summary, load_agent_file
from meshpilot.cli.options import (
    UNARY_TIMEOUT_S,
    ConfigOption,
    JsonOption,
    PlannerOption,
    call_service,
    fail,
    planner_target,
)
from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc

agents_app = typer.Typer(help="Agents as data: versioned definitions that `ask --agent` runs.", no_args_is_help=True)

FileOption = Annotated[
    Path, typer.Option("--file", "-f", help="Agent definition (YAML), e.g. deploy/agents/geo-react.yaml.")
]
NameArgument = Annotated[str, typer.Argument(help="The agent's name.")]


def _stub(channel: grpc.aio.Channel) -> agents_pb2_grpc.AgentServiceStub:
    return agents_pb2_grpc.AgentServiceStub(channel)


def _agent_json(agent: agents_pb2.Agent) -> dict[str, Any]:
    return json_format.MessageToDict(agent, preserving_proto_field_name=True)


def _read(path: Path) -> AgentFile:
    try:
        return load_agent_file(path)
    except AgentFileError as e:
        fail(str(e), 2)


def _print_saved(agent: agents_pb2.Agent, verb: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_agent_json(agent), ensure_ascii=False))
    else:
        typer.echo(f"{verb} agent {agent.name} version {agent.version}")


@agents_app.command()
def create(
    file: FileOption, json_output: JsonOption = False, planner: PlannerOption = None, config: ConfigOption = None
) -> None:
    """Create version 1 of the agent the file defines (a name in use fails: use `update`)."""
    definition = _read(file)
    request = agents_pb2.CreateAgentRequest(name=definition.name, spec=definition.to_spec())
    agent = call_service(
        planner_target(planner, config), lambda ch: _stub(ch).CreateAgent(request, timeout=UNARY_TIMEOUT_S)
    )
    _print_saved(agent, "created", json_output)


@agents_app.command()
def update(
    file: FileOption, json_output: JsonOption = False, planner: PlannerOption = None, config: ConfigOption = None
) -> None:
    """Store the file as a new version of its agent; earlier versions stay readable and runnable."""
    definition = _read(file)
    request = agents_pb2.UpdateAgentRequest(name=definition.name, spec=definition.to_spec())
    agent = call_service(
        planner_target(planner, config), lambda ch: _stub(ch).UpdateAgent(request, timeout=UNARY_TIMEOUT_S)
    )
    _print_saved(agent, "updated", json_output)


@agents_app.command()
def get(
    name: NameArgument,
    version: Annotated[int, typer.Option(min=0, help="The version; 0 selects the latest.")] = 0,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Print an agent as a definition file (edit it, then `agents update -f`), or as JSON."""
    request = agents_pb2.GetAgentRequest(name=name, version=version)
    agent = call_service(
        planner_target(planner, config), lambda ch: _stub(ch).GetAgent(request, timeout=UNARY_TIMEOUT_S)
    )
    if json_output:
        typer.echo(json.dumps(_agent_json(agent), ensure_ascii=False))
        return
    created = agent.create_time.ToDatetime().isoformat(timespec="seconds") if agent.HasField("create_time") else "?"
    builtin = ", built in" if agent.builtin else ""
    typer.echo(f"# {agent.name} version {agent.version}, created {created}Z{builtin}")
    typer.echo(AgentFile.from_agent(agent).to_yaml(), nl=False)


@agents_app.command("list")
def list_agents(json_output: JsonOption = False, planner: PlannerOption = None, config: ConfigOption = None) -> None:
    """List the latest version of every agent, the built-in default first."""
    response = call_service(
        planner_target(planner, config),
        lambda ch: _stub(ch).ListAgents(agents_pb2.ListAgentsRequest(), timeout=UNARY_TIMEOUT_S),
    )
    if json_output:
        typer.echo(json.dumps([_agent_json(agent) for agent in response.agents], ensure_ascii=False))
        return
    table = Table("NAME", "VERSION", "POLICY", "MODEL", "TOOLS", box=None)
    for agent in response.agents:
        row = agent_summary(agent)
        name = f"{row['name']} (built in)" if row["builtin"] else row["name"]
        table.add_row(name, str(row["version"]), row["policy"], row["model"], row["tools"])
    Console(soft_wrap=True).print(table)


@agents_app.command()
def delete(name: NameArgument, planner: PlannerOption = None, config: ConfigOption = None) -> None:
    """Delete every version of an agent; runs already made keep the version they ran."""
    request = agents_pb2.DeleteAgentRequest(name=name)
    call_service(planner_target(planner, config), lambda ch: _stub(ch).DeleteAgent(request, timeout=UNARY_TIMEOUT_S))
    typer.echo(f"deleted agent {name}")

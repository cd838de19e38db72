"""`meshpilot agents ...` against a recording fake AgentService: the YAML file, its mapping, and the exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from meshpilot.cli import app
from meshpilot.cli.agent_file import AgentFile, AgentFileError, load_agent_file, parse_agent_file
from meshpilot.planner.v1 import agents_pb2
from tests.unit.cli_fakes import FakeMesh

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "agents").glob("*.yaml"))

GEO = """
name: geo-react
instructions: You answer geography questions with the tools.
model: ""
tools: [country_facts, calculator]
approval_required: [append_note]
policy: {name: react, max_parallel_tool_calls: 4}
budget: {max_steps: 6, max_tokens: 16000, timeout_seconds: 120.5}
sampling: {temperature: 0.0, top_p: 1.0, seed: 7, step_max_tokens: 256}
history_turns: 4
"""


@pytest.fixture
def mesh():
    with FakeMesh() as running:
        yield running


def invoke(mesh: FakeMesh, *args: str):
    return CliRunner().invoke(app, [*args, "--planner", mesh.target])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_examples_parse(path: Path) -> None:
    definition = load_agent_file(path)
    assert definition.name == path.stem
    assert definition.to_spec().instructions


def test_examples_exist() -> None:
    assert "geo-react.yaml" in [path.name for path in EXAMPLES]


def test_create_maps_every_field_of_the_file(mesh, tmp_path) -> None:
    done = invoke(mesh, "agents", "create", "-f", str(write(tmp_path, GEO)))

    assert done.exit_code == 0, done.output
    assert "created agent geo-react version 1" in done.stdout
    [(method, request)] = mesh.agents.requests
    assert method == "CreateAgent" and request.name == "geo-react"
    spec = request.spec
    assert spec.instructions == "You answer geography questions with the tools."
    assert spec.model == ""
    assert list(spec.tools) == ["country_facts", "calculator"]
    assert list(spec.approval_required) == ["append_note"]
    assert spec.policy == agents_pb2.PolicySpec(name="react", max_parallel_tool_calls=4)
    assert (spec.budget.max_steps, spec.budget.max_tokens) == (6, 16000)
    assert spec.budget.timeout.ToTimedelta().total_seconds() == 120.5
    assert spec.sampling.HasField("seed") and spec.sampling.seed == 7
    assert (spec.sampling.top_p, spec.sampling.step_max_tokens) == (1.0, 256)
    assert spec.HasField("history_turns") and spec.history_turns == 4


def test_examples_map_to_the_spec_and_back() -> None:
    definition = load_agent_file(REPO / "deploy" / "agents" / "clock.yaml")
    spec = definition.to_spec()

    [example] = spec.examples
    assert (example.task, example.tool) == ("What time is it in Berlin?", "time.get_current_time")
    assert dict(example.arguments) == {"timezone": "Europe/Berlin"}
    assert example.observation.struct_value["is_dst"] is False
    assert example.answer.startswith("The datetime of Europe/Berlin")
    again = AgentFile.from_agent(agents_pb2.Agent(name=definition.name, version=1, spec=spec))
    assert again.examples == definition.examples
    assert "examples:" in again.to_yaml()
    assert "examples" not in parse_agent_file("name: a\ninstructions: be brief\n").to_yaml()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: a\ninstructions: x\nexamples: [{task: t}]\n", "examples.0.tool"),
        ("name: a\ninstructions: x\nexamples: [{task: t, tool: c, argument: {}}]\n", "examples.0.argument"),
    ],
)
def test_a_malformed_example_names_its_field(text: str, field: str) -> None:
    with pytest.raises(AgentFileError, match=re.escape(field)):
        parse_agent_file(text)


def test_unset_optional_fields_stay_unset_for_the_planner_to_default() -> None:
    spec = parse_agent_file("name: a\ninstructions: be brief\n").to_spec()

    assert not spec.HasField("history_turns") and not spec.HasField("builtin_examples")
    assert not spec.sampling.HasField("seed")
    assert spec.policy.name == "" and not spec.budget.HasField("timeout")
    assert list(spec.tools) == []


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (GEO.replace("max_steps: 6", "max_step: 6"), "budget.max_step"),
        (GEO.replace("max_steps: 6", "max_steps: lots"), "budget.max_steps"),
        (GEO.replace("name: react", "name: reactive"), "policy.name"),
        (GEO.replace("top_p: 1.0", "top_p: 1.5"), "sampling.top_p"),
        (GEO.replace("name: geo-react", "name: Geo React"), "name"),
        (GEO.replace("history_turns: 4", "histroy_turns: 4"), "histroy_turns"),
        (GEO + "builtin_examples: sometimes\n", "builtin_examples"),
        ("name: a\n", "instructions"),
    ],
)
def test_a_bad_field_exits_2_naming_it_and_calls_nothing(mesh, tmp_path, text, field) -> None:
    done = invoke(mesh, "agents", "create", "-f", str(write(tmp_path, text)))

    assert done.exit_code == 2
    assert f"field '{field}'" in done.stderr
    assert "agent.yaml" in done.stderr
    assert mesh.agents.requests == []


@pytest.mark.parametrize(
    ("text", "message"), [("name: [unclosed\n", "not valid YAML"), ("- a list\n", "expected a mapping")]
)
def test_a_file_that_is_no_mapping_exits_2(mesh, tmp_path, text, message) -> None:
    done = invoke(mesh, "agents", "update", "-f", str(write(tmp_path, text)))

    assert done.exit_code == 2 and message in done.stderr
    assert mesh.agents.requests == []


def test_a_missing_file_exits_2(mesh, tmp_path) -> None:
    done = invoke(mesh, "agents", "create", "-f", str(tmp_path / "nope.yaml"))

    assert done.exit_code == 2 and "cannot read" in done.stderr


def test_server_errors_exit_1_with_the_code(mesh, tmp_path) -> None:
    path = str(write(tmp_path, GEO))
    assert invoke(mesh, "agents", "create", "-f", path).exit_code == 0

    again = invoke(mesh, "agents", "create", "-f", path)
    assert again.exit_code == 1
    assert again.stderr.strip() == "error: ALREADY_EXISTS: agent 'geo-react' exists; update it"

    mesh.agents.error = (grpc.StatusCode.INVALID_ARGUMENT, "spec.tools: unknown tool 'calculater'")
    invalid = invoke(mesh, "agents", "update", "-f", path)
    assert invalid.exit_code == 1
    assert "error: INVALID_ARGUMENT: spec.tools: unknown tool 'calculater'" in invalid.stderr


def test_update_stores_a_new_version_and_get_reads_either(mesh, tmp_path) -> None:
    assert invoke(mesh, "agents", "create", "-f", str(write(tmp_path, GEO))).exit_code == 0
    changed = write(tmp_path, GEO.replace("max_steps: 6", "max_steps: 9"))

    updated = invoke(mesh, "agents", "update", "-f", str(changed), "--json")
    assert updated.exit_code == 0
    assert json.loads(updated.stdout)["version"] == 2

    latest = invoke(mesh, "agents", "get", "geo-react")
    first = invoke(mesh, "agents", "get", "geo-react", "--version", "1")
    assert latest.stdout.startswith("# geo-react version 2, created 2023-11-14T22:13:20Z")
    assert parse_agent_file(latest.stdout).budget.max_steps == 9
    assert parse_agent_file(first.stdout).budget.max_steps == 6
    assert mesh.agents.requests[-1][1].version == 1


def test_get_prints_a_file_that_round_trips(mesh, tmp_path) -> None:
    original = parse_agent_file(GEO)
    invoke(mesh, "agents", "create", "-f", str(write(tmp_path, GEO)))

    printed = invoke(mesh, "agents", "get", "geo-react")

    assert parse_agent_file(printed.stdout) == original


def test_from_agent_inverts_to_spec_for_every_example() -> None:
    for path in EXAMPLES:
        definition = load_agent_file(path)
        agent = agents_pb2.Agent(name=definition.name, version=1, spec=definition.to_spec())
        assert AgentFile.from_agent(agent) == definition


def test_get_unknown_exits_1_not_found(mesh) -> None:
    done = invoke(mesh, "agents", "get", "nobody")

    assert done.exit_code == 1
    assert "error: NOT_FOUND: no agent 'nobody'" in done.stderr


def test_list_and_delete(mesh, tmp_path) -> None:
    invoke(mesh, "agents", "create", "-f", str(write(tmp_path, GEO)))

    listed = invoke(mesh, "agents", "list", "--json")
    table = invoke(mesh, "agents", "list")
    deleted = invoke(mesh, "agents", "delete", "geo-react")
    gone = invoke(mesh, "agents", "delete", "geo-react")

    assert [agent["name"] for agent in json.loads(listed.stdout)] == ["geo-react"]
    assert "geo-react" in table.stdout and "country_facts, calculator" in table.stdout
    assert deleted.exit_code == 0 and deleted.stdout.strip() == "deleted agent geo-react"
    assert gone.exit_code == 1 and "NOT_FOUND" in gone.stderr


def test_parse_errors_list_every_bad_field() -> None:
    with pytest.raises(AgentFileError) as caught:
        parse_agent_file("name: a\ninstructions: x\nbudget: {max_steps: -1}\nsampling: {temprature: 1}\n", "f.yaml")

    assert "field 'budget.max_steps'" in str(caught.value)
    assert "field 'sampling.temprature'" in str(caught.value)


def test_builtin_examples_off_maps_to_the_spec_and_back() -> None:
    file = parse_agent_file("name: a\ninstructions: x\nbuiltin_examples: false\n")
    spec = file.to_spec()

    assert spec.HasField("builtin_examples") and not spec.builtin_examples
    again = AgentFile.from_agent(agents_pb2.Agent(name="a", spec=spec))
    assert again.builtin_examples is False and "builtin_examples: false" in again.to_yaml()

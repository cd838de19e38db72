"""The official openai client against the edge as a real process over the real inference service (SmolLM2-135M):
a streamed chat completion, a tool call that matches its function's parameters, a JSON-schema response that
validates, an OpenAI-style 400, and a clean SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import clean_env, free_port
from tests.integration.processes import ROOT, ServiceProcesses

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CAPITAL = {
    "type": "object",
    "properties": {"country": {"type": "string", "maxLength": 40}, "capital": {"type": "string", "maxLength": 40}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}


class EdgeMesh:
    def __init__(self, services: ServiceProcesses, edge: subprocess.Popen[bytes], url: str) -> None:
        self.services = services
        self.edge = edge
        self.url = url

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the edge exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the edge did not answer /healthz within {timeout:g}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeMesh]:
    data_dir = tmp_path_factory.mktemp("edge")
    port = free_port()
    # One torch thread: the machine is shared, and the answers do not depend on it.
    env = {"MESHPILOT_EDGE__PORT": str(port), "MESHPILOT_INFERENCE__THREADS": "1"}
    services = ServiceProcesses(data_dir, ("inference",), env=env)
    services.start_all()
    log = data_dir / "edge.log"
    with log.open("ab") as out:
        edge = subprocess.Popen(
            [sys.executable, "-m", "meshpilot", "serve", "edge"], cwd=ROOT, env=services.env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, edge, log)
        yield EdgeMesh(services, edge, url)
    finally:
        if edge.poll() is None:
            edge.send_signal(signal.SIGTERM)
            try:
                edge.wait(timeout=30)
            except subprocess.TimeoutExpired:
                edge.kill()
        services.stop_all()


def test_a_streamed_chat_completion(mesh: EdgeMesh) -> None:
    stream = mesh.client().chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the text arrives in several chunks"
    assert "".join(deltas).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"],
        ["length"],
    )
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any], str | None]:
    """A streamed completion collected: its text, its tool call deltas, its finish reason."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join(c.delta.content or "" for c in choices)
    calls = [call for c in choices for call in c.delta.tool_calls or []]
    return text, calls, next((c.finish_reason for c in choices if c.finish_reason), None)


@pytest.mark.parametrize(
    ("tool_choice", "stream"),
    [("required", False), ({"type": "function", "function": {"name": "get_weather"}}, True)],
)
def test_a_tool_call_matches_its_function_s_parameters(mesh: EdgeMesh, tool_choice: object, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
        "tools": [WEATHER],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 64,
    }
    if stream:
        _, [call], finish = streamed(mesh.client(), **request)
        name, arguments = call.function.name, call.function.arguments
    else:
        choice = mesh.client().chat.completions.create(**request).choices[0]
        [message_call] = choice.message.tool_calls or []
        name, arguments, finish = message_call.function.name, message_call.function.arguments, choice.finish_reason  # type: ignore[union-attr]
    assert finish == "tool_calls"
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_response_parses_and_validates(mesh: EdgeMesh, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}},
        "temperature": 0,
        "max_tokens": 64,
    }
    if stream:
        text, _, finish = streamed(mesh.client(), **request)
    else:
        choice = mesh.client().chat.completions.create(**request).choices[0]
        text, finish = choice.message.content or "", choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), CAPITAL)


def test_bad_input_is_an_openai_style_4xx(mesh: EdgeMesh) -> None:
    client = mesh.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    unbounded = httpx.post(f"{mesh.url}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), timeout=30)
    assert bad.value.param == "messages"
    assert missing.value.code == "model_not_found"
    assert unbounded.status_code == 413 and unbounded.json()["error"]["code"] == "request_too_large"


def test_sigterm_stops_the_edge_cleanly(mesh: EdgeMesh) -> None:
    # Last in the module: it stops the fixture's edge.
    models = httpx.get(f"{mesh.url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    mesh.edge.send_signal(signal.SIGTERM)
    assert mesh.edge.wait(timeout=30) == 0


def test_python_m_services_edge_names_the_setting_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env()
        env.update({"MESHPILOT_DATA_DIR": str(tmp_path), "MESHPILOT_EDGE__PORT": str(taken.getsockname()[1])})
        done = subprocess.run(
            [sys.executable, "-m", "services.edge"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 2
    assert "edge.port" in done.stderr and "Traceback" not in done.stderr

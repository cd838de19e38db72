"""The edge's OpenAI API against an in-process inference service on a scripted FakeEngine: the official openai client,
raw SSE, tool calls, JSON responses, tenants, authentication, and every error path as an OpenAI-style 4xx."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from inference_core import EngineError, GenerationRequest, QueueFullError
from inference_core.testing import FakeEngine
from meshpilot.inference.v1 import inference_pb2
from services.common import MeshConfig, load_config
from services.common.auth import ApiKeyStore
from services.edge.app import create_app
from services.edge.openai_api import _stream
from services.edge.openai_convert import ToolMode, _string_prefix, partial_answer
from services.inference import create_server, servicer_of
from tests.unit.test_edge_runs import client_of
from tests.unit.test_routing import Served

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def config(tmp_path: Path) -> MeshConfig:
    config = load_config(data_dir=str(tmp_path))
    config.inference.server.port = 0
    config.inference.server.metrics = False
    config.inference.model_id = "fake-model"
    config.edge.max_request_bytes = 64 * 1024
    return config


class Edge:
    """An inference server on port 0 over ``engine``, and the edge app over a channel to it, with its lifespan."""

    def __init__(self, engine: FakeEngine, config: MeshConfig) -> None:
        self.engine = engine
        self.config = config
        self.server = create_server(config, engine=engine)

    async def __aenter__(self) -> Edge:
        await self.server.start()
        await servicer_of(self.server).start_engines()
        await self.server.set_serving()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        self.app = create_app(self.config, inference_channel=self.channel, planner_channel=self.channel)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://edge")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self._lifespan.__aexit__(None, None, None)
        await self.channel.close()
        await self.server.stop(0)

    def openai(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://edge/v1", api_key=api_key, http_client=self.http, max_retries=0)

    async def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **extra}


async def sse_events(response: httpx.Response) -> list[str]:
    lines = response.text.split("\n\n")
    assert lines[-1] == ""
    assert all(line.startswith("data: ") for line in lines[:-1])
    return [line[len("data: ") :] for line in lines[:-1]]


async def test_the_openai_client_gets_a_chat_completion_with_usage(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["Paris is the capital."]), config) as edge:
        completion = await edge.openai().chat.completions.create(
            model="fake-model",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
            temperature=0,
            seed=7,
            max_completion_tokens=20,
        )
        request = edge.engine.requests[0]
    assert completion.choices[0].message.content == "Paris is the capital."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "fake-model"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert (request.sampling.temperature, request.sampling.seed, request.max_tokens) == (0, 7, 20)
    assert request.constraint is None
    assert request.tenant == "default"


async def test_the_openai_client_streams_deltas_then_usage(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["One two three four."]), config) as edge:
        stream = await edge.openai().chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "Count"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three four."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


async def test_the_sse_stream_is_openai_s_format_and_ends_with_done(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["a b"]), config) as edge:
        response = await edge.post(chat(stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_length_is_the_finish_reason_when_max_tokens_cuts(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["one two three four five"]), config) as edge:
        body = (await edge.post(chat(max_tokens=2))).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "one two"


async def test_stop_strings_reach_the_engine_and_cut(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["one two. three"]), config) as edge:
        body = (await edge.post(chat(stop="."))).json()
        assert edge.engine.requests[0].stop == ["."]
    assert body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "stop"


def constraint_of(request: GenerationRequest) -> dict[str, Any]:
    assert request.constraint is not None and request.constraint.kind == "json_schema"
    return json.loads(request.constraint.value)


async def test_a_tool_call_comes_back_as_tool_calls_under_the_tools_schemas(config: MeshConfig) -> None:
    output = '{"tool": "get_weather", "arguments": {"city": "Paris"}}'
    async with Edge(FakeEngine([output]), config) as edge:
        completion = await edge.openai().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME]
        )
        request = edge.engine.requests[0]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    options = constraint_of(request)["anyOf"]
    assert [o["properties"].get("tool", {}).get("const") for o in options] == ["get_weather", "get_time", None]
    assert options[0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert "final_answer" in options[2]["properties"]
    assert request.messages is not None and request.messages[0]["role"] == "system"
    assert "get_weather" in request.messages[0]["content"]


@pytest.mark.parametrize(
    ("choice", "tools"),
    [("required", ["get_weather", "get_time"]), ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])],
)
async def test_required_and_named_tool_choice_leave_no_answer_option(
    config: MeshConfig, choice: Any, tools: list[str]
) -> None:
    async with Edge(FakeEngine(['{"tool": "get_time", "arguments": {}}']), config) as edge:
        body = (await edge.post(chat(tools=[WEATHER, TIME], tool_choice=choice))).json()
        options = constraint_of(edge.engine.requests[0])["anyOf"]
    assert [o["properties"]["tool"]["const"] for o in options] == tools
    assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}


async def test_tool_choice_none_is_plain_text(config: MeshConfig) -> None:
    async with Edge(FakeEngine(["No tools."]), config) as edge:
        body = (await edge.post(chat(tools=[WEATHER], tool_choice="none"))).json()
        assert edge.engine.requests[0].constraint is None
    assert body["choices"][0]["message"]["content"] == "No tools."


async def test_an_answer_instead_of_a_call_is_content(config: MeshConfig) -> None:
    async with Edge(FakeEngine(['{"final_answer": "It is sunny."}']), config) as edge:
        body = (await edge.post(chat(tools=[WEATHER]))).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_a_streamed_tool_call_arrives_whole_with_finish_reason_tool_calls(config: MeshConfig) -> None:
    output = '{"tool": "get_weather", "arguments": {"city": "Oslo"}}'
    async with Edge(FakeEngine([output]), config) as edge:
        stream = await edge.openai().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], stream=True
        )
        chunks = [c async for c in stream]
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_history_is_rendered_for_the_model(config: MeshConfig) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
        {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
    ]
    async with Edge(FakeEngine(['{"final_answer": "Clear."}']), config) as edge:
        await edge.post({"model": "fake-model", "messages": messages, "tools": [WEATHER]})
        rendered = edge.engine.requests[0].messages
    assert rendered is not None
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "tool", "system"]
    assert json.loads(rendered[2]["content"]) == {"tool": "get_weather", "arguments": {"city": "Paris"}}
    assert rendered[4]["content"] == "Answer briefly."


async def test_json_schema_response_format_constrains_the_output(config: MeshConfig) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    async with Edge(FakeEngine(['{"capital": "Paris"}']), config) as edge:
        completion = await edge.openai().chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "Capital of France as JSON"}],
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
        )
        assert constraint_of(edge.engine.requests[0]) == schema
    assert json.loads(completion.choices[0].message.content or "") == {"capital": "Paris"}


async def test_json_object_response_format_asks_for_an_object(config: MeshConfig) -> None:
    async with Edge(FakeEngine(['{"a": 1}']), config) as edge:
        await edge.post(chat(response_format={"type": "json_object"}))
        assert constraint_of(edge.engine.requests[0]) == {"type": "object"}


async def test_tools_with_a_json_response_answer_with_the_schema(config: MeshConfig) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    async with Edge(FakeEngine(['{"final_answer": {"n": 3}}']), config) as edge:
        body = (await edge.post(chat(tools=[WEATHER], response_format=fmt))).json()
        answer = constraint_of(edge.engine.requests[0])["anyOf"][1]["properties"]["final_answer"]
    assert answer == schema
    assert json.loads(body["choices"][0]["message"]["content"]) == {"n": 3}


async def test_models_are_listed_from_the_inference_service(config: MeshConfig) -> None:
    async with Edge(FakeEngine(), config) as edge:
        models = [m async for m in edge.openai().models.list()]
        one = await edge.openai().models.retrieve("fake-model")
        with pytest.raises(openai.NotFoundError) as missing:
            await edge.openai().models.retrieve("gpt-9")
    assert [m.id for m in models] == ["fake-model"]
    assert one.owned_by == "meshpilot"
    assert missing.value.code == "model_not_found"


async def test_healthz(config: MeshConfig) -> None:
    async with Edge(FakeEngine(), config) as edge:
        assert (await edge.http.get("/healthz")).json() == {"status": "ok"}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    for word in words:
        assert word in error["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", ("Field required",)),
        ({"model": "fake-model", "messages": []}, "messages", ("at least 1",)),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", ()),
        (chat(temperature=3), "temperature", ("less than or equal to 2",)),
        (chat(top_p=0), "top_p", ()),
        (chat(max_tokens=0), "max_tokens", ()),
        (chat(seed=-1), "seed", ()),
        (chat(n=2), "n", ("set n to 1",)),
        (chat(logprobs=True), "logprobs", ()),
        (chat(presence_penalty=0.5), "presence_penalty", ()),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", ("at most 4",)),
        (chat(stop=[""]), "stop", ()),
        (chat(stream_options={"include_usage": True}), "stream_options", ("stream",)),
        (chat(tool_choice="auto"), "tool_choice", ("tools is empty",)),
        (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", ()),
        (chat(tools=[WEATHER, WEATHER]), "tools", ("twice",)),
        (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name", ()),
        (
            chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
            "tools[0].function.parameters",
            ("object",),
        ),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema",
            (),
        ),
        (chat(response_format={"type": "xml"}), "response_format.type", ()),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0].type",
            ("text",),
        ),
        (
            chat(
                messages=[
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}
                ]
            ),
            "messages[0].tool_calls[0].function.arguments",
            ("not JSON",),
        ),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    config: MeshConfig, body: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    async with Edge(FakeEngine(), config) as edge:
        response = await edge.post(body)
        assert edge.engine.requests == []
    assert_openai_error(response, 400, param, *words)


async def test_bodies_that_are_not_json_are_400(config: MeshConfig) -> None:
    async with Edge(FakeEngine(), config) as edge:
        response = await edge.http.post(
            "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
        )
    assert_openai_error(response, 400, None, "not valid JSON")


async def test_oversized_bodies_are_413_by_length_and_while_streaming(config: MeshConfig) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])

    async def chunks() -> AsyncIterator[bytes]:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    async with Edge(FakeEngine(), config) as edge:
        by_length = await edge.post(big)
        streamed = await edge.http.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
    assert_openai_error(by_length, 413, None, "65536")
    assert_openai_error(streamed, 413, None, "65536")
    assert "xxxx" not in by_length.text + streamed.text


@pytest.mark.parametrize(
    ("script", "body", "status", "param"),
    [
        ([], chat(model="gpt-9"), 404, "model"),
        ([QueueFullError("the queue is full")], chat(), 429, None),
        ([EngineError("the backend failed")], chat(), 502, None),
    ],
)
async def test_inference_errors_are_mapped(
    config: MeshConfig, script: list[Any], body: dict[str, Any], status: int, param: str | None
) -> None:
    async with Edge(FakeEngine(script), config) as edge:
        response = await edge.post(body)
    assert_openai_error(response, status, param)
    if status == 429:
        assert response.headers["retry-after"] == "1"


async def test_the_openai_client_raises_its_own_error_types(config: MeshConfig) -> None:
    async with Edge(FakeEngine([QueueFullError("busy")]), config) as edge:
        client = edge.openai()
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], n=3)
    assert bad.value.param == "n"


async def test_an_unavailable_inference_service_is_503(config: MeshConfig) -> None:
    async with Edge(FakeEngine(), config) as edge:
        await servicer_of(edge.server).shutdown_engines()
        response = await edge.post(chat())
    assert_openai_error(response, 503)


async def test_an_unexpected_failure_is_a_500_with_an_incident_and_no_trace(
    config: MeshConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(_: Any) -> Any:
        raise RuntimeError("internal detail")

    monkeypatch.setattr("services.edge.openai_api.to_generate_request", explode)
    async with Edge(FakeEngine(), config) as edge:
        edge.http._transport = httpx.ASGITransport(app=edge.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
        response = await edge.post(chat())
    assert_openai_error(response, 500, None, "incident")
    assert "internal detail" not in response.text


async def test_unknown_routes_are_openai_404s(config: MeshConfig) -> None:
    async with Edge(FakeEngine(), config) as edge:
        response = await edge.http.get("/v1/completions")
    assert_openai_error(response, 404, None, "/v1/completions")


def with_auth(config: MeshConfig) -> str:
    config.auth.enabled = True
    assert config.auth.keys_path is not None
    _, token = ApiKeyStore(config.auth.keys_path).create("acme", "test")
    return token


async def test_with_auth_every_route_but_healthz_needs_a_key_and_the_tenant_reaches_inference(
    config: MeshConfig,
) -> None:
    token = with_auth(config)
    async with Edge(FakeEngine(["ok"]), config) as edge:
        missing = await edge.post(chat())
        wrong = await edge.post(chat(), authorization="Bearer mpk_000000000000_" + "x" * 40)
        models = await edge.http.get("/v1/models")
        health = await edge.http.get("/healthz")
        console = await edge.http.get("/console/")
        completion = await edge.openai(token).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
        tenant = edge.engine.requests[0].tenant
    for refused in (missing, wrong, models):
        assert_openai_error(refused, 401, None, "meshpilot keys create")
        assert refused.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200
    assert console.status_code != 401
    assert completion.choices[0].message.content == "ok"
    assert tenant == "acme"


async def test_the_edge_requires_auth_when_it_binds_beyond_loopback(config: MeshConfig) -> None:
    config.edge.host = "0.0.0.0"
    async with Edge(FakeEngine(), config) as edge:
        response = await edge.post(chat())
    assert_openai_error(response, 401)


class RecordingCall:
    """A gRPC call's stand-in for _stream: records that the edge cancelled it."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def responses_then(error: BaseException | None, *texts: str) -> AsyncIterator[inference_pb2.GenerateResponse]:
    for text in texts:
        yield inference_pb2.GenerateResponse(text=text, model="fake-model")
    if error is not None:
        raise error


async def test_a_failure_mid_stream_is_an_error_event_and_the_call_is_cancelled() -> None:
    call = RecordingCall()
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="engine closed"
    )
    first = inference_pb2.GenerateResponse(text="Hel", model="fake-model")
    events = [
        e async for e in _stream(call, first, responses_then(error, "lo"), ToolMode(), model="x", include_usage=False)
    ]
    assert json.loads(events[1][len("data: ") :])["choices"][0]["delta"] == {"content": "Hel"}
    assert json.loads(events[2][len("data: ") :])["choices"][0]["delta"] == {"content": "lo"}
    last = json.loads(events[-1][len("data: ") :])
    assert last["error"]["code"] == "unavailable" and "engine closed" in last["error"]["message"]
    assert "[DONE]" not in "".join(events)
    assert call.cancelled


async def test_a_client_that_goes_away_cancels_the_generation() -> None:
    call = RecordingCall()
    stream = _stream(call, None, responses_then(None, "a", "b", "c"), ToolMode(), model="x", include_usage=False)
    await anext(stream)
    await stream.aclose()
    assert call.cancelled


async def test_a_generation_that_streams_nothing_still_ends_properly() -> None:
    events = [
        e async for e in _stream(RecordingCall(), None, responses_then(None), ToolMode(), model="x", include_usage=True)
    ]
    assert events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[-2][len("data: ") :])["usage"]["total_tokens"] == 0


async def test_every_request_leaves_an_audit_line(config: MeshConfig, caplog: pytest.LogCaptureFixture) -> None:
    token = with_auth(config)
    caplog.set_level(logging.INFO, logger="meshpilot.audit")
    async with Edge(FakeEngine(["ok"]), config) as edge:
        await edge.post(chat(), authorization=f"Bearer {token}")
        await edge.post(chat())
    lines = [r.getMessage() for r in caplog.records if r.name == "meshpilot.audit"]
    assert lines[0].startswith("tenant=acme key=") and lines[0].endswith(
        "method=POST resource=/v1/chat/completions code=200"
    )
    assert lines[1] == "tenant=- key=- method=POST resource=/v1/chat/completions code=401"


async def test_an_answer_under_tool_choice_auto_streams_as_it_is_decoded(config: MeshConfig) -> None:
    output = json.dumps({"final_answer": 'It is "sunny" and warm in Zürich 😀 today.'})
    async with Edge(FakeEngine([output]), config) as edge:
        stream = await edge.openai().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True
        )
        chunks = [c async for c in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 3
    assert "".join(contents) == 'It is "sunny" and warm in Zürich 😀 today.'
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


async def test_an_answer_cut_by_max_tokens_is_its_text_so_far(config: MeshConfig) -> None:
    async with Edge(FakeEngine(['{"final_answer": "one two three four"}'] * 2), config) as edge:
        whole = (await edge.post(chat(tools=[WEATHER], max_tokens=3))).json()
        streamed = await sse_events(await edge.post(chat(tools=[WEATHER], max_tokens=3, stream=True)))
    assert whole["choices"][0]["message"]["content"] == "one two"
    assert whole["choices"][0]["finish_reason"] == "length"
    chunks = [json.loads(e) for e in streamed[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "one two"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "decoded", "closed"),
    [
        ("abc", "abc", False),
        ("a\\", "a", False),
        ("a\\u00", "a", False),
        ('a\\u00e9x"rest', "aéx", True),
        ("x\\ud83d", "x", False),
        ("x\\ud83d\\ude00!", "x😀!", False),
        ('q\\"b"', 'q"b', True),
        ("line\\nnext", "line\nnext", False),
        ("bad \\x escape", "", False),
    ],
)
def test_a_json_string_is_decoded_as_far_as_it_is_complete(body: str, decoded: str, closed: bool) -> None:
    assert _string_prefix(body) == (decoded, closed)


def test_only_an_answer_action_has_a_partial_answer() -> None:
    assert partial_answer('{"tool": "get_weather", "arguments": {') is None
    assert partial_answer('{"final_') is None
    assert partial_answer('{"final_answer": "Hi') == "Hi"


async def test_a_prompt_over_the_context_is_a_400_saying_how_long_it_may_be(config: MeshConfig) -> None:
    async with Edge(FakeEngine(context_length=16), config) as edge:
        response = await edge.post(chat(messages=[{"role": "user", "content": "word " * 40}]))
    assert_openai_error(response, 400, None, "context", "shorten it")
    assert response.json()["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b"null",
        b"1",
        b'"text"',
        b"{}",
        b'{"model": 1, "messages": "hi"}',
        b'{"model": "m", "messages": {"role": "user"}}',
        b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
        b'{"model": "m", "messages": [null]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": "all"}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": 5}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": []}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\\udfff"}',
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        b'"function": {"name": "f", "description": "\\ud800"}}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", '
        b'"json_schema": {"name": "n", "schema": {"\\ud800": 1}}}}',
        b"[" * 100_00 + b"]" * 100_00,
        b"\xff\xfe not utf-8",
    ],
)
async def test_malformed_bodies_are_4xx_openai_errors_never_500(config: MeshConfig, content: bytes) -> None:
    async with Edge(FakeEngine(["ok"]), config) as edge:
        edge.http._transport = httpx.ASGITransport(app=edge.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
        response = await edge.http.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    assert 400 <= response.status_code < 500, response.text[:500]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert len(response.content) < 4000


async def test_a_lone_surrogate_in_a_message_is_a_400_naming_the_message(config: MeshConfig) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "ok \\ud800"}]}'
    async with Edge(FakeEngine(), config) as edge:
        response = await edge.http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert_openai_error(response, 400, "messages[0].content", "surrogate at character 3")


async def test_chat_completions_route_over_the_inference_replicas_and_fail_over(tmp_path) -> None:
    """With inference.replicas the edge routes as the planner does: one system prompt keeps its replica, and a
    replica that refuses (RESOURCE_EXHAUSTED) hands the call to the next."""
    replicas = [Served() for _ in range(2)]
    for replica in replicas:
        await replica.serving(True)
        await replica.server.start()
    config = load_config(data_dir=str(tmp_path), inference={"replicas": [r.target for r in replicas]})
    unused = grpc.aio.insecure_channel("127.0.0.1:1")
    body = {"model": "m", "messages": [{"role": "system", "content": "You are A."}, {"role": "user", "content": "q"}]}
    try:
        async with unused, client_of(create_app(config, planner_channel=unused)) as client:
            for _ in range(3):
                reply = await client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
            served = sorted(r.fake.calls for r in replicas)
            assert served == [0, 3], "one system prompt should keep one replica"
            home = next(r for r in replicas if r.fake.calls)
            home.fake.fail = grpc.StatusCode.RESOURCE_EXHAUSTED
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert sum(r.fake.calls for r in replicas) == 5  # refused on its replica, served by the other
            assert (await client.get("/v1/models")).json()["data"][0]["id"] == "m"
    finally:
        for replica in replicas:
            await replica.server.stop(0)

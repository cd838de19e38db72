"""InferenceService over an in-process server on port 0 with a scripted FakeEngine: conversion and every error path."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_core import EngineClosedError, EngineError, GenerationRequest, InvalidRequestError, QueueFullError
from inference_core.testing import FakeEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import load_config
from services.inference import SERVICE_NAME, create_server, servicer_of

pb = inference_pb2


@pytest.fixture
def config():
    config = load_config()
    config.inference.server.port = 0
    config.inference.model_id = "fake-model"
    config.inference.default_max_tokens = 7
    return config


class Harness:
    def __init__(self, engine: FakeEngine, config) -> None:
        self.engine = engine
        self.server = create_server(config, engine=engine)
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Harness:
        await self.server.start()
        await servicer_of(self.server).start_engines()
        await self.server.set_serving()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(0)

    async def generate(self, **kwargs) -> list[pb.GenerateResponse]:
        return [r async for r in self.stub.Generate(pb.GenerateRequest(**kwargs))]


async def expect_error(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value.details()


async def test_generate_streams_deltas_and_ends_with_usage(config) -> None:
    engine = FakeEngine(["The capital of France is Paris."])
    async with Harness(engine, config) as h:
        responses = await h.generate(prompt="Capital of France?", max_tokens=50)
    assert len(responses) > 2
    assert "".join(r.text for r in responses) == "The capital of France is Paris."
    assert all(r.model == "fake-model" for r in responses)
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not r.HasField("usage") for r in responses[:-1])
    assert last.usage.prompt_tokens == 3
    assert last.usage.completion_tokens == 6
    assert last.usage.total_tokens == 9
    assert last.HasField("timings")
    assert sum(len(r.token_ids) for r in responses) == 6


async def test_request_fields_reach_the_engine(config) -> None:
    engine = FakeEngine(["ok"])
    async with Harness(engine, config) as h:
        await h.generate(
            chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hi")]),
            sampling=pb.SamplingParams(temperature=0.0, top_p=0.9, top_k=5, seed=42, repetition_penalty=1.1),
            stop=["\n"],
            constraint=pb.OutputConstraint(json_schema='{"type": "object"}'),
        )
    request: GenerationRequest = engine.requests[0]
    assert request.prompt is None and request.messages == [{"role": "user", "content": "hi"}]
    assert request.max_tokens == 7, "max_tokens 0 selects the configured default"
    s = request.sampling
    assert (s.temperature, round(s.top_p, 5), s.top_k, s.seed, round(s.repetition_penalty, 5)) == (0.0, 0.9, 5, 42, 1.1)
    assert request.stop == ["\n"]
    assert (request.constraint.kind, request.constraint.value) == ("json_schema", '{"type": "object"}')


async def test_unset_sampling_takes_service_defaults_and_constraint_kinds_map(config) -> None:
    engine = FakeEngine(["a", "b"])
    async with Harness(engine, config) as h:
        await h.generate(prompt="x", constraint=pb.OutputConstraint(regex="[a-z]"))
        await h.generate(prompt="x", constraint=pb.OutputConstraint(ebnf_grammar='root ::= "a"'))
    s = engine.requests[0].sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.repetition_penalty) == (1.0, 1.0, 0, None, 1.0)
    assert [r.constraint.kind for r in engine.requests] == ["regex", "ebnf"]


async def test_stop_strings_and_max_tokens_set_the_finish_reason(config) -> None:
    engine = FakeEngine(["Thought: search\nObservation: found", "one two three four"])
    async with Harness(engine, config) as h:
        stopped = await h.generate(prompt="x", stop=["Observation:"])
        cut = await h.generate(prompt="x", max_tokens=2)
    assert "".join(r.text for r in stopped) == "Thought: search\n"
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP_STRING
    assert "".join(r.text for r in cut) == "one two"
    assert cut[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({}, ["no input", "set prompt"]),
        ({"prompt": ""}, ["prompt is empty"]),
        ({"chat": pb.ChatInput()}, ["chat has no messages"]),
        ({"prompt": "x", "max_tokens": -1}, ["max_tokens must be >= 0", "got -1"]),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=-0.5)}, ["sampling.temperature must be >= 0"]),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=0.0)}, ["sampling.top_p must be in (0, 1]", "got 0"]),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=1.5)}, ["sampling.top_p must be in (0, 1]", "got 1.5"]),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_k=-3)}, ["sampling.top_k must be >= 0", "got -3"]),
        ({"prompt": "x", "sampling": pb.SamplingParams(repetition_penalty=0)}, ["repetition_penalty must be > 0"]),
        ({"prompt": "x", "stop": ["ok", ""]}, ["stop[1] is an empty string"]),
        ({"prompt": "x", "constraint": pb.OutputConstraint(regex="")}, ["constraint.regex is empty"]),
    ],
)
async def test_invalid_generate_requests_get_invalid_argument(config, kwargs, fragments) -> None:
    engine = FakeEngine(["never"])
    async with Harness(engine, config) as h:
        await expect_error(h.generate(**kwargs), grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert engine.requests == [], "nothing reaches the engine"


async def test_unknown_model_is_not_found_and_lists_the_served_ones(config) -> None:
    async with Harness(FakeEngine(), config) as h:
        await expect_error(
            h.generate(model="gpt-9", prompt="x"),
            grpc.StatusCode.NOT_FOUND,
            "model 'gpt-9' is not served; ListModels shows: fake-model",
        )
        await expect_error(
            h.stub.CountTokens(pb.CountTokensRequest(model="gpt-9", prompt="x")), grpc.StatusCode.NOT_FOUND, "gpt-9"
        )


async def test_model_named_explicitly_is_served(config) -> None:
    async with Harness(FakeEngine(["hi"]), config) as h:
        responses = await h.generate(model="fake-model", prompt="x")
    assert responses[-1].model == "fake-model"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("prompt has 9000 tokens but the model's context is 8192; shorten it"), "INVALID_ARGUMENT"),
        (QueueFullError("the engine queue is full (64 requests waiting); retry later"), "RESOURCE_EXHAUSTED"),
        (EngineClosedError("the engine has shut down; retry on another replica"), "UNAVAILABLE"),
        (EngineError("the Triton server answered: model tensorrt_llm failed"), "INTERNAL"),
    ],
)
async def test_engine_errors_map_to_status_codes_with_their_message(config, error, code) -> None:
    async with Harness(FakeEngine([error]), config) as h:
        await expect_error(h.generate(prompt="x"), getattr(grpc.StatusCode, code), str(error))


async def test_prompt_over_the_context_is_invalid_argument_with_the_numbers(config) -> None:
    async with Harness(FakeEngine(["x"], context_length=4), config) as h:
        await expect_error(
            h.generate(prompt="one two three four five"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt has 5 tokens but the model's context is 4",
        )


async def test_unexpected_engine_failure_is_internal_without_a_trace(config) -> None:
    def explode(request):
        raise RuntimeError("secret stack detail")

    async with Harness(FakeEngine(explode), config) as h:
        details = await expect_error(h.generate(prompt="x"), grpc.StatusCode.INTERNAL, "incident")
    assert "secret" not in details and "Traceback" not in details


async def test_client_cancel_aborts_the_engine_request(config) -> None:
    engine = FakeEngine(["word " * 10_000], delay_s=0.01)
    async with Harness(engine, config) as h:
        call = h.stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=4000))
        first = await call.read()
        assert first.text
        call.cancel()
        for _ in range(500):
            if engine.aborted:
                break
            await asyncio.sleep(0.01)
        assert engine.aborted == [engine.requests[0].request_id]


async def test_list_models_describes_the_engine(config) -> None:
    async with Harness(FakeEngine(context_length=2048), config) as h:
        response = await h.stub.ListModels(pb.ListModelsRequest())
    assert [(m.id, m.backend, m.context_length, m.device, m.is_default) for m in response.models] == [
        ("fake-model", "fake", 2048, "cpu", True)
    ]


async def test_count_tokens_for_prompt_and_chat(config) -> None:
    engine = FakeEngine(context_length=1000)
    async with Harness(engine, config) as h:
        prompt = await h.stub.CountTokens(pb.CountTokensRequest(prompt="a b c"))
        chat = await h.stub.CountTokens(
            pb.CountTokensRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="a b")]))
        )
        await expect_error(h.stub.CountTokens(pb.CountTokensRequest()), grpc.StatusCode.INVALID_ARGUMENT, "no input")
        await expect_error(
            h.stub.CountTokens(pb.CountTokensRequest(prompt="")), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"
        )
    assert (prompt.token_count, prompt.context_length, prompt.model) == (3, 1000, "fake-model")
    assert chat.token_count == engine.count_tokens(messages=[{"role": "user", "content": "a b"}])


async def test_engine_not_ready_is_unavailable_and_health_not_serving(config) -> None:
    engine = FakeEngine()
    await engine.shutdown()
    server = create_server(config, engine=engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await expect_error(
                stub.Generate(pb.GenerateRequest(prompt="x")).read(), grpc.StatusCode.UNAVAILABLE, "is not ready"
            )
            await expect_error(stub.ListModels(pb.ListModelsRequest()), grpc.StatusCode.UNAVAILABLE, "retry when")
    finally:
        await server.stop(0)


class SlowStartEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__(["loaded"])
        self.release = asyncio.Event()
        self.loaded = False

    async def start(self) -> None:
        await self.release.wait()
        self.loaded = True

    @property
    def is_ready(self) -> bool:
        return self.loaded and super().is_ready


async def test_health_is_not_serving_until_the_engine_has_loaded_and_shutdown_closes_it(config) -> None:
    from services.common import serve

    config.inference.server.grace_seconds = 0.5
    engine = SlowStartEngine()
    server = create_server(config, engine=engine)
    servicer = servicer_of(server)
    stop = asyncio.Event()
    serving = asyncio.create_task(
        serve(server, startup=servicer.start_engines, shutdown=servicer.shutdown_engines, stop_event=stop)
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            status = await health.Check(check, wait_for_ready=True)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await expect_error(stub.CountTokens(pb.CountTokensRequest(prompt="x")), grpc.StatusCode.UNAVAILABLE)
            engine.release.set()
            while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.01)
            responses = [r async for r in stub.Generate(pb.GenerateRequest(prompt="x"))]
            assert responses[-1].text == "loaded"
    finally:
        stop.set()
        await serving
    assert not engine.is_ready, "shutdown closed the engine"


async def test_an_engine_lost_while_serving_stops_the_service_so_that_a_new_one_starts(config) -> None:
    """The openvino backend's pipeline process died: the engine is no longer ready, so the service must not stay
    SERVING while it answers UNAVAILABLE; serve_watched stops it and says so (main exits 1 for its supervisor)."""
    from services.inference.server import serve_watched

    config.inference.server.grace_seconds = 0.2
    engine = FakeEngine(["ok"])
    server = create_server(config, engine=engine)
    running = asyncio.create_task(serve_watched(server, engine, every_s=0.05))
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while (await health.Check(check, wait_for_ready=True)).status != health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.01)
        await engine.shutdown()  # what the engine does when its pipeline process dies
        assert await asyncio.wait_for(running, 10) is False


async def test_a_service_stopped_by_its_signal_reports_no_lost_engine(config) -> None:
    from services.inference.server import serve_watched

    config.inference.server.grace_seconds = 0.2
    engine = FakeEngine(["ok"])
    server = create_server(config, engine=engine)
    stop = asyncio.Event()
    running = asyncio.create_task(serve_watched(server, engine, stop_event=stop, every_s=0.05))
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while (await health.Check(check, wait_for_ready=True)).status != health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(running, 10) is True
    assert not engine.is_ready, "shutdown closed the engine"

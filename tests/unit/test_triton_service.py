"""The inference service with `backend: triton` over a scripted in-process Triton: config wiring, streaming, status
codes and client cancellation reaching Triton."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from inference_core.triton_engine import TritonEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import ConfigError, MeshConfig, load_config
from services.inference import create_engine, create_server, servicer_of
from tests.unit.triton_fakes import Fail, FakeTriton, Hang, decode_inputs, repository_configs, start_fake
from tests.unit.triton_fakes import write_word_tokenizer as write_tokenizer

pb = inference_pb2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def triton_config(url: str, tokenizer_dir: Path) -> MeshConfig:
    config = load_config()
    config.inference.server.port = 0
    config.inference.backend = "triton"
    config.inference.triton_url = url
    config.inference.triton_model = "tensorrt_llm_bls"
    config.inference.model_path = str(tokenizer_dir)
    config.inference.max_seq_len = 128
    return config


def test_create_engine_builds_a_triton_engine_from_config(tokenizer_dir: Path) -> None:
    engine = create_engine(triton_config("triton.internal:8001", tokenizer_dir))
    assert isinstance(engine, TritonEngine)
    assert (engine._url, engine._model, engine._context) == ("triton.internal:8001", "tensorrt_llm_bls", 128)


def test_missing_tritonclient_is_a_config_error(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "inference_core.triton_engine", None)
    with pytest.raises(ConfigError, match=r"backend 'triton' needs tritonclient .*pip install 'meshpilot\[triton\]'"):
        create_engine(triton_config("127.0.0.1:1", tokenizer_dir))


@pytest.fixture
async def service(tokenizer_dir: Path) -> AsyncIterator[tuple[inference_pb2_grpc.InferenceServiceStub, FakeTriton]]:
    fake = FakeTriton(repository_configs())
    triton, url = await start_fake(fake)
    config = triton_config(url, tokenizer_dir)
    server = create_server(config)
    await server.start()
    await servicer_of(server).start_engines()
    await server.set_serving()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield inference_pb2_grpc.InferenceServiceStub(channel), fake
    finally:
        await channel.close()
        await server.stop(0)
        await servicer_of(server).shutdown_engines()
        await triton.stop(None)


async def test_generate_streams_through_triton(service) -> None:
    stub, fake = service
    fake.script = lambda request: ["Paris", " is", " the capital", "."]
    request = pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Hello world")]),
        max_tokens=16,
        sampling=pb.SamplingParams(temperature=0.0),
        constraint=pb.OutputConstraint(regex="[A-Za-z .]+"),
    )
    responses = [r async for r in stub.Generate(request)]
    assert "".join(r.text for r in responses) == "Paris is the capital."
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 4), "as Triton counted them"
    sent = decode_inputs(fake.requests[0])
    assert sent["text_input"] == ["<s>user: Hello world\n<s>assistant:"]
    assert sent["guided_decoding_guide_type"] == ["regex"] and sent["top_k"] == 1
    models = await stub.ListModels(pb.ListModelsRequest())
    assert models.models[0].backend == "triton" and models.models[0].context_length == 128
    counted = await stub.CountTokens(pb.CountTokensRequest(prompt="Hello world"))
    assert counted.token_count == 2


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "beam_width > 1 is not supported; send 1", grpc.StatusCode.INVALID_ARGUMENT),
        (grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (grpc.StatusCode.UNAVAILABLE, "model is unloading", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_triton_refusals_become_status_codes(
    service, code: grpc.StatusCode, message: str, status: grpc.StatusCode
) -> None:
    stub, fake = service
    fake.script = lambda request: [Fail(code, message)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=4))]
    assert caught.value.code() == status
    assert message in caught.value.details()


async def test_bad_requests_are_refused_before_triton(service) -> None:
    stub, fake = service
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Generate(pb.GenerateRequest(prompt="Hello " * 200, max_tokens=4))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt has 200 tokens but the model's context is 128; shorten it" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        request = pb.GenerateRequest(prompt="Hello", constraint=pb.OutputConstraint(json_schema='{"type": "nope"}'))
        [r async for r in stub.Generate(request)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'Unsupported type "nope"' in caught.value.details()
    assert fake.requests == []


async def test_client_cancel_cancels_the_triton_request(service) -> None:
    stub, fake = service
    fake.script = lambda request: ["Hello", Hang()]
    call = stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=64))
    assert (await call.read()).text == "Hello"
    call.cancel()
    for _ in range(500):
        if fake.cancelled:
            break
        await asyncio.sleep(0.01)
    assert fake.cancelled == [fake.requests[0].id]

"""The torch engine and the service on the real SmolLM2-135M-Instruct (slow: loads the packaged GGUF once)."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import pytest
import pytest_asyncio
import torch

from inference_core import Constraint, FinishReason, GenerationRequest, SamplingParams, TorchEngine
from inference_core.model_loading import default_model_path, load_model
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import load_config
from services.inference import create_server, servicer_of

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
pb = inference_pb2
GREEDY = SamplingParams(temperature=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    engine = TorchEngine(max_queue=1)
    await engine.start()
    yield engine
    await engine.shutdown()


async def generate(engine: TorchEngine, **kwargs):
    chunks = [c async for c in engine.generate(GenerationRequest(**kwargs))]
    return "".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids], chunks[-1]


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def full_decode(engine: TorchEngine, ids: list[int]) -> str:
    return engine._loaded.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def hf_model():
    """The same model loaded apart for HF's own ``generate``: the engine keeps only its packed copies of the weights."""
    return load_model(default_model_path(), dtype="float32", device="cpu").model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"messages": chat("What is the capital of France?")},
        {"messages": chat("Write a haiku about autumn leaves.")},
        {"prompt": "def fibonacci(n):\n    "},
    ],
)
async def test_greedy_equals_hf_generate_token_for_token(engine: TorchEngine, hf_model, request_kwargs) -> None:
    text, ids, last = await generate(engine, max_tokens=40, sampling=GREEDY, **request_kwargs)
    prompt = engine._encode(request_kwargs.get("prompt"), request_kwargs.get("messages"))
    assert ids == hf_greedy(hf_model, prompt, 40)
    assert text == full_decode(engine, ids)
    assert last.finish_reason is (FinishReason.STOP if ids[-1] in engine._loaded.eos_token_ids else FinishReason.LENGTH)


async def test_real_answer_and_spaces(engine: TorchEngine) -> None:
    text, _, last = await generate(
        engine, messages=chat("What is the capital of France?"), max_tokens=30, sampling=GREEDY
    )
    assert "Paris" in text
    assert " " in text.strip()
    assert last.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"messages": chat("Translate to Chinese: I love my family very much.")},
        {
            "prompt": "Chinese: 你好世界。 English: Hello world.\nChinese: 我爱我的家人。 English: I love my family.\nChinese:"
        },
        # 30 tokens end inside a multi-token emoji sequence: the last chunk shows the cut-off character as U+FFFD.
        {"prompt": "Party emojis: 🎉🥳🎈 Birthday emojis:"},
    ],
)
async def test_stream_equals_full_decode_with_multibyte_characters(engine: TorchEngine, request_kwargs) -> None:
    request = GenerationRequest(max_tokens=30, sampling=GREEDY, **request_kwargs)
    chunks = [c async for c in engine.generate(request)]
    text = "".join(c.text for c in chunks)
    ids = [i for c in chunks for i in c.token_ids]
    assert any(ord(ch) > 0x2E80 and ch != "\ufffd" for ch in text), f"expected CJK or emoji in {text!r}"
    assert text == full_decode(engine, ids)
    assert not any(c.text.endswith("\ufffd") for c in chunks[:-1])


async def test_stop_string_ends_before_it(engine: TorchEngine) -> None:
    kwargs = {"messages": chat("List three fruits, one per line."), "max_tokens": 60, "sampling": GREEDY}
    full, _, _ = await generate(engine, **kwargs)
    lines = full.split("\n")
    assert len(lines) >= 2, full
    stop = lines[1][:4]
    text, _, last = await generate(engine, stop=[stop], **kwargs)
    assert text == full[: full.index(stop)]
    assert last.finish_reason is FinishReason.STOP_STRING


async def test_seeds(engine: TorchEngine) -> None:
    def kwargs(seed: int):
        return {"messages": chat("Tell me a story."), "max_tokens": 24, "sampling": SamplingParams(seed=seed)}

    first, _, _ = await generate(engine, **kwargs(11))
    assert (await generate(engine, **kwargs(11)))[0] == first
    assert (await generate(engine, **kwargs(12)))[0] != first


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "calculator", "final_answer"]},
            "arguments": {
                "type": "object",
                "properties": {"query": {"type": "string", "maxLength": 40}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_json_schema_output_parses_and_validates(engine: TorchEngine, schema) -> None:
    text, _, last = await generate(
        engine,
        messages=chat("Answer in JSON about Alice, 31, who wants to know the capital of Spain."),
        max_tokens=80,
        sampling=GREEDY,
        constraint=Constraint("json_schema", json.dumps(schema)),
    )
    assert last.finish_reason is FinishReason.STOP, text
    jsonschema.validate(json.loads(text), schema)


async def test_regex_output_matches(engine: TorchEngine) -> None:
    regex = r"(yes|no), because [a-z ]{5,40}\."
    text, _, last = await generate(
        engine, messages=chat("Is the sky blue?"), max_tokens=40, sampling=GREEDY, constraint=Constraint("regex", regex)
    )
    assert re.fullmatch(regex, text), text
    assert last.finish_reason is FinishReason.STOP


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: TorchEngine):
    config = load_config()
    config.inference.server.port = 0
    server = create_server(config, engine=engine)
    await server.start()
    await servicer_of(server).start_engines()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    await server.stop(0)


async def test_service_rejects_a_prompt_over_the_context_with_the_numbers(engine: TorchEngine, server) -> None:
    prompt = "apple " * 9000
    n = engine.count_tokens(prompt=prompt)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=5)).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt has {n} tokens but the model's context is {engine.info.context_length}" in info.value.details()
    count = await server.CountTokens(pb.CountTokensRequest(prompt=prompt))
    assert (count.token_count, count.context_length) == (n, engine.info.context_length)


async def test_service_queue_overflow_then_cancel_frees_the_engine(engine: TorchEngine, server) -> None:
    # A regex of 4000 digits keeps the first request running (no EOS allowed) until it is cancelled.
    endless = pb.GenerateRequest(prompt="Digits:", max_tokens=4000, constraint=pb.OutputConstraint(regex="[0-9]{4000}"))
    running = server.Generate(endless)
    assert (await running.read()).token_ids
    queued = server.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3))
    queued_first = asyncio.ensure_future(queued.read())
    for _ in range(3000):
        if engine.queue_depth >= 1:
            break
        await asyncio.sleep(0.01)
    # The second request waits only until the next step admits it: a poll delayed past that (a machine under heavy
    # load) misses it, and this fails here rather than waiting forever.
    assert engine.queue_depth == 1, "the second request was admitted before it was seen waiting (machine too busy?)"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3)).read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()
    running.cancel()
    await asyncio.wait_for(queued_first, 120)
    last = await queued_first
    while (response := await queued.read()) != grpc.aio.EOF:
        last = response
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    after = [r async for r in server.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2))]
    assert after[-1].usage.completion_tokens <= 2


async def test_service_models_and_invalid_schema(server) -> None:
    models = await server.ListModels(pb.ListModelsRequest())
    assert [(m.id, m.backend, m.context_length, m.is_default) for m in models.models] == [
        ("smollm2-135m-instruct", "torch", 4096, True)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.Generate(
            pb.GenerateRequest(prompt="x", constraint=pb.OutputConstraint(json_schema='{"type": 5}'))
        ).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid JSON schema" in info.value.details()

"""Continuous batching on the real default model: parity with HF generate, seeds, cancellation, admission, budgets."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import jsonschema
import pytest
import torch

from inference_core import (
    BatchingConfig,
    Constraint,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    TorchEngine,
)

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0)
SYSTEM = "You are MeshPilot, a concise assistant. Answer in one or two sentences. " * 8
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "写一句关于月亮的话",
    "What is a KV cache?",
    "Name a famous painter.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
]
NEW_TOKENS = 32


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def start(**batching) -> TorchEngine:
    engine = TorchEngine(batching=BatchingConfig(**batching), max_queue=batching.get("max_queue", 64))
    await engine.start()
    return engine


@pytest.fixture(scope="module")
def hf_reference() -> dict[str, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_core import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference = {}
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            messages(question), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        reference[question] = out[0, ids.shape[1] :].tolist()
    return reference


async def run(engine: TorchEngine, request: GenerationRequest, delay: float = 0.0) -> tuple[list[int], str, object]:
    await asyncio.sleep(delay)
    ids, text, last = [], "", None
    async for chunk in engine.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        last = chunk
    return ids, text, last


@pytest.mark.parametrize("batch", [1, 4, 8])
async def test_greedy_output_equals_hf_generate_with_requests_joining_mid_flight(hf_reference, batch: int) -> None:
    engine = await start(max_batch_size=batch, prefill_chunk_tokens=48)
    try:
        requests = [
            GenerationRequest(request_id=f"r{i}", messages=messages(q), max_tokens=NEW_TOKENS, sampling=GREEDY)
            for i, q in enumerate(QUESTIONS)
        ]
        # Staggered arrivals: later requests join while earlier ones are decoding.
        outputs = await asyncio.gather(*(run(engine, r, delay=0.15 * i) for i, r in enumerate(requests)))
        for question, (ids, _, last) in zip(QUESTIONS, outputs, strict=True):
            expected = hf_reference[question]
            assert ids[: len(expected)] == expected, question
            assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        # The shared system prompt was computed once and reused by the later requests.
        assert engine.stats().prefix_cache_hit_rate > 0.3
        assert sum(last.usage.cached_prompt_tokens for _, _, last in outputs) > 0
    finally:
        await engine.shutdown()


async def test_seeded_sampling_reproduces_alone_and_inside_a_batch() -> None:
    engine = await start(max_batch_size=6)
    try:
        seeded = GenerationRequest(
            request_id="seeded",
            messages=messages("Invent a name for a cat."),
            max_tokens=24,
            sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
        )
        alone = await run(engine, seeded)
        neighbours = [
            GenerationRequest(
                request_id=f"n{i}",
                messages=messages(q),
                max_tokens=24,
                sampling=SamplingParams(temperature=1.0, seed=i),
            )
            for i, q in enumerate(QUESTIONS[:5])
        ]
        together = await asyncio.gather(
            run(engine, dataclasses.replace(seeded, request_id="again")),
            *(run(engine, n) for n in neighbours),
        )
        assert together[0][0] == alone[0]
        other_seed = await run(
            engine,
            dataclasses.replace(
                seeded, request_id="other", sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=99)
            ),
        )
        assert other_seed[0] != alone[0]
    finally:
        await engine.shutdown()


async def test_cancelling_a_stream_frees_its_slot_for_the_next_request() -> None:
    engine = await start(max_batch_size=1)
    try:
        long = engine.generate(
            GenerationRequest(request_id="long", prompt="Tell me a very long story.", max_tokens=400)
        )
        await long.__anext__()
        await long.aclose()
        for _ in range(100):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running == 0
        ids, _, last = await run(
            engine, GenerationRequest(request_id="next", prompt="Hello", max_tokens=4, sampling=GREEDY)
        )
        assert last.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and 0 < len(ids) <= 4
    finally:
        await engine.shutdown()


async def test_a_full_queue_refuses_at_once_and_keeps_serving() -> None:
    engine = await start(max_batch_size=1, max_queue=1)
    try:
        running = asyncio.ensure_future(
            run(engine, GenerationRequest(request_id="a", prompt="Count to fifty:", max_tokens=60))
        )
        while engine.stats().running == 0:
            await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(run(engine, GenerationRequest(request_id="b", prompt="Hi", max_tokens=4)))
        while engine.stats().waiting == 0:
            await asyncio.sleep(0.02)
        with pytest.raises(QueueFullError, match="queue is full"):
            await run(engine, GenerationRequest(request_id="c", prompt="Hi", max_tokens=4))
        assert (await running)[2].finish_reason is not None
        assert (await waiting)[2].finish_reason is not None
    finally:
        await engine.shutdown()


SCHEMAS = [
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    },
    {
        "type": "object",
        "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}},
        "required": ["numbers"],
    },
    {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}},
        "required": ["answer", "confidence"],
    },
]


async def test_constrained_rows_validate_inside_a_mixed_batch() -> None:
    engine = await start(max_batch_size=6)
    try:
        constrained = [
            GenerationRequest(
                request_id=f"json{i}",
                messages=messages(f"Reply in JSON. {q}"),
                max_tokens=64,
                sampling=GREEDY if i % 2 else SamplingParams(temperature=0.8, seed=i),
                constraint=Constraint("json_schema", json.dumps(schema)),
            )
            for i, (schema, q) in enumerate(zip(SCHEMAS, QUESTIONS, strict=False))
        ]
        free = [
            GenerationRequest(request_id=f"free{i}", messages=messages(q), max_tokens=32, sampling=GREEDY)
            for i, q in enumerate(QUESTIONS[3:6])
        ]
        results = await asyncio.gather(*(run(engine, r, delay=0.05 * i) for i, r in enumerate([*constrained, *free])))
        for schema, (_, text, last) in zip(SCHEMAS, results, strict=False):
            assert last.finish_reason is FinishReason.STOP, text
            jsonschema.validate(json.loads(text), schema)
    finally:
        await engine.shutdown()


async def test_kv_budget_is_never_exceeded_and_memory_is_preallocated() -> None:
    engine = await start(max_batch_size=3, max_seq_len=128, prefix_cache_tokens=64)
    try:
        scheduler = engine._scheduler
        before = (scheduler.slots.keys.data_ptr(), scheduler.kv_bytes)
        seen = []

        async def sample() -> None:
            while True:
                seen.append(engine.stats())
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        # Digits only, and more than fit: no row can end before its slot is full, so the batch does fill up (a row that
        # ended early on an end-of-sequence token could leave the third slot never used at the same time).
        requests = [
            GenerationRequest(
                request_id=f"k{i}",
                prompt=f"{q} Explain at length.",
                max_tokens=200,
                constraint=Constraint("regex", "[0-9]{200}"),
            )
            for i, q in enumerate(QUESTIONS[:4])  # one more than the slots
        ]
        results = await asyncio.gather(*(run(engine, r) for r in requests))
        sampler.cancel()
        assert all(last.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for _, _, last in results)
        assert all(len(ids) + last.usage.prompt_tokens <= 128 for ids, _, last in results)
        assert max(s.running for s in seen) == 3
        assert all(s.kv_tokens_used <= s.kv_tokens_capacity == 3 * 128 for s in seen)
        assert all(s.prefix_cache_blocks_used <= s.prefix_cache_blocks_capacity for s in seen)
        assert (scheduler.slots.keys.data_ptr(), scheduler.kv_bytes) == before
    finally:
        await engine.shutdown()

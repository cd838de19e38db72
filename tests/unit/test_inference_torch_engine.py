"""TorchEngine end to end on a tiny random-weight Llama with the real SmolLM2 tokenizer (fast, no real model)."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest

from inference_core import (
    Constraint,
    EngineClosedError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
    TorchEngine,
)
from inference_core.testing import write_tiny_llama

CONTEXT = 256
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-engine"), context_length=CONTEXT)


@pytest.fixture
async def engine(tiny_dir):
    engine = TorchEngine(tiny_dir, model_id="tiny", max_queue=1)
    await engine.start()
    yield engine
    await engine.shutdown()


async def collect(engine: TorchEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks: list[GenerationChunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


def decode(engine: TorchEngine, ids: list[int]) -> str:
    tokenizer = engine._loaded.tokenizer
    eos = engine._loaded.eos_token_ids
    return tokenizer.decode(
        [i for i in ids if i not in eos], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


class StepGate:
    """Makes the engine loop wait for the test before each step, so interleavings are deterministic."""

    def __init__(self, engine: TorchEngine) -> None:
        runner = engine._scheduler._runner
        self.steps = threading.Semaphore(0)
        self.prefill_started = threading.Event()
        original_step = runner.step

        def step(cache, tokens, lengths, chunks=(), shared=0):
            if chunks:
                self.prefill_started.set()
            self.steps.acquire()
            return original_step(cache, tokens, lengths, chunks, shared)

        runner.step = step

    def release(self, n: int = 1_000_000) -> None:
        for _ in range(n):
            self.steps.release()


async def test_info_describes_the_loaded_model(engine: TorchEngine) -> None:
    info = engine.info
    assert (info.id, info.backend, info.context_length, info.device, info.dtype) == (
        "tiny",
        "torch",
        CONTEXT,
        "cpu",
        "float32",
    )
    assert engine.is_ready


async def test_stream_concatenates_to_the_decode_of_its_tokens(engine: TorchEngine) -> None:
    chunks = await collect(engine, GenerationRequest(prompt="Once upon a time", max_tokens=40, sampling=GREEDY))
    last = chunks[-1]
    assert last.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert text_of(chunks) == decode(engine, ids_of(chunks))
    assert last.usage.completion_tokens == len(ids_of(chunks))
    assert last.usage.prompt_tokens == engine.count_tokens(prompt="Once upon a time")
    if last.finish_reason is FinishReason.LENGTH:
        assert last.usage.completion_tokens == 40
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_greedy_is_deterministic(engine: TorchEngine) -> None:
    request = GenerationRequest(prompt="The answer is", max_tokens=20, sampling=GREEDY)
    assert ids_of(await collect(engine, request)) == ids_of(await collect(engine, request))


async def test_same_seed_same_tokens_different_seed_different_tokens(engine: TorchEngine) -> None:
    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt="Pick words:", max_tokens=16, sampling=SamplingParams(temperature=1.0, seed=seed)
        )

    first = ids_of(await collect(engine, request(1)))
    assert ids_of(await collect(engine, request(1))) == first
    assert ids_of(await collect(engine, request(2))) != first


async def test_chat_messages_use_the_chat_template(engine: TorchEngine) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = engine._loaded.tokenizer
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert engine.count_tokens(messages=messages) == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    chunks = await collect(engine, GenerationRequest(messages=messages, max_tokens=4, sampling=GREEDY))
    assert chunks[-1].usage.prompt_tokens == engine.count_tokens(messages=messages)


async def test_generation_ends_at_the_context_with_length(engine: TorchEngine) -> None:
    prompt = "word " * 250
    prompt_tokens = engine.count_tokens(prompt=prompt)
    assert CONTEXT - 20 < prompt_tokens < CONTEXT
    chunks = await collect(engine, GenerationRequest(prompt=prompt, max_tokens=100, sampling=GREEDY))
    completion = chunks[-1].usage.completion_tokens
    assert completion <= CONTEXT - prompt_tokens
    if chunks[-1].finish_reason is FinishReason.LENGTH:
        assert completion == CONTEXT - prompt_tokens


async def test_prompt_over_the_context_is_rejected_with_the_numbers(engine: TorchEngine) -> None:
    prompt = "word " * 400
    n = engine.count_tokens(prompt=prompt)
    with pytest.raises(InvalidRequestError, match=f"prompt has {n} tokens but the model's context is {CONTEXT}"):
        await collect(engine, GenerationRequest(prompt=prompt, max_tokens=5))


@pytest.mark.parametrize(
    ("request_kwargs", "fragment"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({}, "send exactly one of prompt or messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "send exactly one of prompt or messages"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "message 0 has role 'wizard'"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"prompt": "a", "sampling": SamplingParams(top_p=2)}, r"top_p must be in \(0, 1\]"),
        ({"prompt": "a", "constraint": Constraint("regex", "(")}, "invalid regex"),
    ],
)
async def test_invalid_requests_are_rejected_before_any_chunk(engine: TorchEngine, request_kwargs, fragment) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        await collect(engine, GenerationRequest(**request_kwargs))


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


async def test_json_schema_constraint_gives_valid_json(engine: TorchEngine) -> None:
    for seed in range(3):
        request = GenerationRequest(
            prompt="JSON:",
            max_tokens=60,
            sampling=SamplingParams(temperature=1.0, seed=seed),
            constraint=Constraint("json_schema", json.dumps(PERSON_SCHEMA)),
        )
        chunks = await collect(engine, request)
        assert chunks[-1].finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(text_of(chunks)), PERSON_SCHEMA)


async def test_regex_and_ebnf_constraints_are_matched(engine: TorchEngine) -> None:
    regex = r"[0-9]{3}-[a-c]{2}"
    chunks = await collect(
        engine, GenerationRequest(prompt="Code:", max_tokens=30, constraint=Constraint("regex", regex))
    )
    assert re.fullmatch(regex, text_of(chunks))
    assert chunks[-1].finish_reason is FinishReason.STOP
    ebnf = 'root ::= "yes" | "no" | "maybe"'
    chunks = await collect(
        engine, GenerationRequest(prompt="Answer:", max_tokens=10, constraint=Constraint("ebnf", ebnf))
    )
    assert text_of(chunks) in ("yes", "no", "maybe")


async def test_queue_overflow_is_refused_at_once_and_queued_requests_still_complete(engine: TorchEngine) -> None:
    gate = StepGate(engine)
    running = asyncio.create_task(collect(engine, GenerationRequest(prompt="a", max_tokens=3)))
    await asyncio.to_thread(gate.prefill_started.wait, 10)
    queued = asyncio.create_task(collect(engine, GenerationRequest(prompt="b", max_tokens=3)))
    while engine.queue_depth < 1:
        await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError, match="queue is full"):
        await collect(engine, GenerationRequest(prompt="c", max_tokens=3))
    gate.release()
    for task in (running, queued):
        assert (await task)[-1].finish_reason is not None


async def test_closing_the_stream_aborts_and_frees_the_engine(engine: TorchEngine) -> None:
    gate = StepGate(engine)
    stream = engine.generate(GenerationRequest(prompt="Tell me a long story", max_tokens=200, sampling=GREEDY))
    first = asyncio.ensure_future(stream.__anext__())
    gate.release(30)
    await first
    await stream.aclose()
    gate.release()
    while engine._scheduler.in_flight:
        await asyncio.sleep(0.01)
    chunks = await collect(engine, GenerationRequest(prompt="next", max_tokens=3, sampling=GREEDY))
    assert chunks[-1].finish_reason is not None


async def test_abort_ends_the_stream_with_cancelled(engine: TorchEngine) -> None:
    gate = StepGate(engine)
    request = GenerationRequest(prompt="Tell me a long story", max_tokens=200, sampling=GREEDY)
    task = asyncio.create_task(collect(engine, request))
    await asyncio.to_thread(gate.prefill_started.wait, 10)
    gate.release(5)
    await engine.abort(request.request_id)
    gate.release()
    chunks = await task
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert chunks[-1].usage.completion_tokens <= 5


async def test_abort_of_a_queued_request_cancels_it_without_running(engine: TorchEngine) -> None:
    gate = StepGate(engine)
    running = asyncio.create_task(collect(engine, GenerationRequest(prompt="a", max_tokens=3)))
    await asyncio.to_thread(gate.prefill_started.wait, 10)
    queued_request = GenerationRequest(prompt="b", max_tokens=3)
    queued = asyncio.create_task(collect(engine, queued_request))
    while engine.queue_depth < 1:
        await asyncio.sleep(0.01)
    await engine.abort(queued_request.request_id)
    chunks = await queued
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert chunks[-1].usage.completion_tokens == 0
    gate.release()
    await running


async def test_shutdown_cancels_in_flight_and_refuses_new_work(tiny_dir) -> None:
    engine = TorchEngine(tiny_dir)
    await engine.start()
    gate = StepGate(engine)
    task = asyncio.create_task(collect(engine, GenerationRequest(prompt="a", max_tokens=50)))
    await asyncio.to_thread(gate.prefill_started.wait, 10)
    gate.release()
    await engine.shutdown()
    assert (await task)[-1].finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH, FinishReason.STOP)
    assert not engine.is_ready
    with pytest.raises(EngineClosedError, match="shut down"):
        await collect(engine, GenerationRequest(prompt="a"))
    with pytest.raises(EngineClosedError):
        engine.count_tokens(prompt="a")


async def test_calls_before_start_say_the_model_is_loading(tiny_dir) -> None:
    engine = TorchEngine(tiny_dir)
    assert not engine.is_ready
    with pytest.raises(EngineClosedError, match="still loading"):
        engine.count_tokens(prompt="a")


async def test_a_requests_tenant_reaches_the_scheduled_sequence(engine: TorchEngine) -> None:
    submitted: list[str] = []
    original = engine._scheduler.submit

    def submit(seq):
        submitted.append(seq.tenant)
        return original(seq)

    engine._scheduler.submit = submit  # type: ignore[method-assign]
    request = GenerationRequest(prompt="hello", max_tokens=2, sampling=GREEDY, tenant="acme")
    await collect(engine, request)
    assert submitted == ["acme"]

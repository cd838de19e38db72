"""FakeEngine behaves like an Engine (other services' unit tests rely on it), and inference_core's exports are pinned."""

from __future__ import annotations

import asyncio

import pytest

import inference_core
from inference_core import (
    Engine,
    EngineClosedError,
    EngineError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)
from inference_core.testing import FakeEngine


def test_exported_members() -> None:
    assert sorted(inference_core.__all__) == [
        "BatchingConfig",
        "Constraint",
        "Engine",
        "EngineClosedError",
        "EngineError",
        "FinishReason",
        "GenerationChunk",
        "GenerationRequest",
        "InvalidRequestError",
        "ModelInfo",
        "QueueFullError",
        "SamplingParams",
        "Timings",
        "TorchEngine",
        "Usage",
        "default_model_path",
    ]
    for name in inference_core.__all__:
        assert getattr(inference_core, name) is not None


async def collect(engine: Engine, request: GenerationRequest):
    return [chunk async for chunk in engine.generate(request)]


async def test_scripted_outputs_are_streamed_in_order_with_usage() -> None:
    engine = FakeEngine(["first answer here", "second"])
    assert engine.is_ready
    chunks = await collect(engine, GenerationRequest(prompt="q one", max_tokens=10))
    assert [c.text for c in chunks] == ["first", " answer", " here"]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 3)
    assert "".join(c.text for c in await collect(engine, GenerationRequest(prompt="q"))) == "second"
    assert [r.prompt for r in engine.requests] == ["q one", "q"]
    with pytest.raises(EngineError, match="scripted only 2 outputs"):
        await collect(engine, GenerationRequest(prompt="q"))


async def test_output_can_be_a_function_of_the_request() -> None:
    engine = FakeEngine(lambda request: f"echo {request.messages[-1]['content']}")
    chunks = await collect(engine, GenerationRequest(messages=[{"role": "user", "content": "ping"}]))
    assert "".join(c.text for c in chunks) == "echo ping"


async def test_scripted_exceptions_are_raised() -> None:
    engine = FakeEngine([QueueFullError("busy"), "ok"])
    with pytest.raises(QueueFullError, match="busy"):
        await collect(engine, GenerationRequest(prompt="q"))
    assert (await collect(engine, GenerationRequest(prompt="q")))[-1].text == "ok"


async def test_stop_strings_and_max_tokens() -> None:
    engine = FakeEngine(["a b STOP c", "a b c d"])
    stopped = await collect(engine, GenerationRequest(prompt="q", stop=["STOP"]))
    assert "".join(c.text for c in stopped) == "a b "
    assert stopped[-1].finish_reason is FinishReason.STOP_STRING
    cut = await collect(engine, GenerationRequest(prompt="q", max_tokens=2))
    assert "".join(c.text for c in cut) == "a b"
    assert cut[-1].finish_reason is FinishReason.LENGTH


async def test_validates_like_the_real_engine() -> None:
    engine = FakeEngine(["x"] * 5, context_length=3)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        await collect(engine, GenerationRequest(prompt=""))
    with pytest.raises(InvalidRequestError, match="temperature must be >= 0"):
        await collect(engine, GenerationRequest(prompt="q", sampling=SamplingParams(temperature=-1)))
    with pytest.raises(InvalidRequestError, match="prompt has 4 tokens but the model's context is 3"):
        await collect(engine, GenerationRequest(prompt="a b c d"))
    assert engine.count_tokens(prompt="a b c d") == 4


async def test_abort_and_close_are_recorded() -> None:
    engine = FakeEngine(["w " * 1000, "w " * 1000], delay_s=0.001)
    request = GenerationRequest(prompt="q", max_tokens=1000)
    stream = engine.generate(request)
    await stream.__anext__()
    await stream.aclose()
    assert engine.aborted == [request.request_id]
    second = GenerationRequest(prompt="q", max_tokens=1000)
    task = asyncio.create_task(collect(engine, second))
    await asyncio.sleep(0.01)
    await engine.abort(second.request_id)
    assert (await task)[-1].finish_reason is FinishReason.CANCELLED
    assert engine.aborted == [request.request_id, second.request_id]


async def test_shutdown_closes_it() -> None:
    engine = FakeEngine()
    await engine.shutdown()
    assert not engine.is_ready
    with pytest.raises(EngineClosedError):
        await collect(engine, GenerationRequest(prompt="q"))
    with pytest.raises(EngineClosedError):
        await engine.start()

"""The openvino backend's loop thread on a scripted stand-in for ContinuousBatchingPipeline that behaves as the real one
does here (one token per request per step, the end-of-sequence token read like any other, a cancelled request gone
after the next step): streaming, stop strings, aborts, admission bounds, fair order, and failures of the pipeline."""

from __future__ import annotations

import threading
import zlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("openvino", reason="openvino is not installed (`make install` adds the openvino extra)")

from inference_core import FinishReason, SamplingParams
from inference_core.admission import FairQueue, FifoQueue
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.errors import EngineError, QueueFullError
from inference_core.openvino_loop import OpenVINOStepLoop, PrefixIndex
from inference_core.sampling import RowSampler
from inference_core.sequence import Sequence
from inference_core.stop_strings import StopStringMatcher
from inference_core.types import GenerationChunk

VOCAB = 97
EOS = 0


def next_token(history: list[int]) -> int:
    return 1 + zlib.crc32(repr(history).encode()) % (VOCAB - 1)


class FakeHandle:
    def __init__(self, prompt: list[int], config: Any) -> None:
        self.history = list(prompt)
        self.max_new_tokens = config.max_new_tokens
        self.eos_after = getattr(config, "eos_after", None)
        self.generated: list[int] = []
        self.unread: list[int] = []
        self.status = "RUNNING"
        self.finish = "NONE"

    def can_read(self) -> bool:
        return bool(self.unread)

    def read(self) -> dict[int, Any]:
        assert self.unread, "read() blocks when nothing is pending"
        ids, self.unread = self.unread, []
        return {0: SimpleNamespace(generated_ids=ids, finish_reason=SimpleNamespace(name=self.finish))}

    def read_all(self) -> list[Any]:
        return []

    def get_status(self) -> Any:
        return SimpleNamespace(name=self.status)

    def cancel(self) -> None:
        if self.status == "RUNNING":
            self.status = "CANCEL"


class FakePipeline:
    """Decodes next_token(history) for every running request each step; EOS after ``eos_after`` tokens if set."""

    def __init__(self, fail_on_step: int | None = None, refuse_add: bool = False) -> None:
        self.handles: list[FakeHandle] = []
        self.steps = 0
        self.fail_on_step = fail_on_step
        self.refuse_add = refuse_add
        self.max_live = 0

    def add_request(self, request_id: int, ids: Any, config: Any) -> FakeHandle:
        if self.refuse_add and request_id > 1:  # 1 is the warm-up
            raise RuntimeError("bad grammar")
        handle = FakeHandle([int(t) for t in ids.data[0]], config)
        self.handles.append(handle)
        return handle

    def has_non_finished_requests(self) -> bool:
        return any(h.status in ("RUNNING", "CANCEL") for h in self.handles)

    def step(self) -> None:
        self.steps += 1
        if self.fail_on_step is not None and self.steps == self.fail_on_step:
            raise RuntimeError("out of memory")
        live = [h for h in self.handles if h.status in ("RUNNING", "CANCEL")]
        self.max_live = max(self.max_live, len(live))
        for handle in live:
            if handle.status == "CANCEL":
                handle.status = "IGNORED"
                continue
            eos = handle.eos_after is not None and len(handle.generated) == handle.eos_after
            token = EOS if eos else next_token(handle.history)
            handle.history.append(token)
            handle.generated.append(token)
            handle.unread.append(token)
            if eos or len(handle.generated) >= handle.max_new_tokens:
                handle.status = "FINISHED"
                handle.finish = "STOP" if eos else "LENGTH"
        self.handles = [h for h in self.handles if h.status in ("RUNNING", "CANCEL")] + [
            h for h in self.handles if h.status not in ("RUNNING", "CANCEL", "IGNORED")
        ]

    def live(self) -> int:
        return sum(h.status == "RUNNING" for h in self.handles)

    def get_metrics(self) -> Any:
        return SimpleNamespace(cache_usage=10.0)


class DigitsTokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(f" {i}" for i in ids if not (skip_special_tokens and i == EOS))


class Request:
    def __init__(self, name: str, prompt: list[int], new_tokens: int, stop: list[str] | None = None, tenant="default"):
        self.chunks: list[GenerationChunk] = []
        self.errors: list[EngineError] = []
        self.done = threading.Event()
        self.seq = Sequence(
            request_id=name,
            prompt_ids=prompt,
            max_new_tokens=new_tokens,
            sampler=RowSampler(SamplingParams(temperature=0.0), VOCAB, torch.device("cpu")),
            detokenizer=IncrementalDetokenizer(DigitsTokenizer(), prompt),
            stop=StopStringMatcher(stop or []),
            constraint=None,
            eos_token_ids=frozenset({EOS}),
            sink=self._sink,
            arrival=0.0,
            tenant=tenant,
        )
        self.config = SimpleNamespace(max_new_tokens=new_tokens)

    def _sink(self, item) -> None:
        if isinstance(item, EngineError):
            self.errors.append(item)
            self.done.set()
            return
        self.chunks.append(item)
        if item.finish_reason is not None:
            self.done.set()

    @property
    def output(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.token_ids]

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.chunks[-1].finish_reason if self.chunks else None


def alone(prompt: list[int], n: int) -> list[int]:
    history, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(history))
        history.append(out[-1])
    return out


def make_loop(pipeline: FakePipeline, max_num_seqs: int = 4, waiting=None) -> OpenVINOStepLoop:
    queue = waiting if waiting is not None else FifoQueue(8)
    return OpenVINOStepLoop(pipeline, queue, max_num_seqs, PrefixIndex(4, 1024))


def run(loop: OpenVINOStepLoop, requests: list[Request]) -> None:
    for request in requests:
        loop.submit(request.seq, request.config)
    loop.start()
    try:
        for request in requests:
            assert request.done.wait(10), f"{request.seq.request_id} did not finish"
    finally:
        loop.close(timeout=10)


def test_batched_requests_stream_their_own_tokens_and_end_by_length() -> None:
    pipeline = FakePipeline()
    requests = [Request(f"r{i}", [i + 1, 2, 3, 4, 5], 6) for i in range(6)]
    run(make_loop(pipeline, max_num_seqs=4), requests)
    for i, request in enumerate(requests):
        assert request.output == alone([i + 1, 2, 3, 4, 5], 6)
        assert request.finish_reason is FinishReason.LENGTH
        assert request.chunks[-1].usage is not None and request.chunks[-1].usage.completion_tokens == 6
    assert pipeline.max_live <= 4  # the other two waited in our queue


def test_end_of_sequence_finishes_with_stop() -> None:
    request = Request("r", [1, 2, 3], 10)
    request.config.eos_after = 3  # type: ignore[attr-defined]
    run(make_loop(FakePipeline()), [request])
    assert request.finish_reason is FinishReason.STOP
    assert request.output[-1] == EOS and len(request.output) == 4


def test_a_stop_string_ends_the_request_and_frees_it_in_the_pipeline() -> None:
    prompt = [1, 2, 3]
    tokens = alone(prompt, 8)
    pipeline = FakePipeline()
    request = Request("r", prompt, 50, stop=[f" {tokens[2]}"])
    loop = make_loop(pipeline)
    run(loop, [request])
    assert request.finish_reason is FinishReason.STOP_STRING
    assert request.text == "".join(f" {t}" for t in tokens[:2])
    assert pipeline.live() == 0 and loop.in_flight == 0


def test_abort_of_a_running_request_cancels_it_before_the_next_step() -> None:
    pipeline = FakePipeline()
    loop = make_loop(pipeline)
    request = Request("r", [1, 2, 3], 10_000)
    first = threading.Event()
    sink = request.seq.sink
    request.seq.sink = lambda item: (sink(item), first.set())  # type: ignore[method-assign]
    loop.submit(request.seq, request.config)
    loop.start()
    try:
        assert first.wait(10)
        loop.abort("r")
        assert request.done.wait(10)
    finally:
        loop.close(timeout=10)
    assert request.finish_reason is FinishReason.CANCELLED
    assert pipeline.live() == 0
    assert len(request.output) < 10_000


def test_abort_of_a_waiting_request_never_reaches_the_pipeline() -> None:
    pipeline = FakePipeline()
    loop = make_loop(pipeline)
    request = Request("r", [1, 2, 3], 5)
    loop.submit(request.seq, request.config)
    loop.abort("r")
    loop.start()
    loop.close(timeout=10)
    assert request.finish_reason is FinishReason.CANCELLED
    assert pipeline.handles == [] or all(len(h.history) == 4 + 2 for h in pipeline.handles)  # only the warm-up


def test_a_full_queue_refuses_at_submit() -> None:
    loop = make_loop(FakePipeline(), waiting=FifoQueue(2))
    for i in range(2):
        request = Request(f"r{i}", [1, 2], 3)
        loop.submit(request.seq, request.config)
    with pytest.raises(QueueFullError, match="queue is full"):
        extra = Request("r2", [1, 2], 3)
        loop.submit(extra.seq, extra.config)
    loop.close(timeout=1)


def test_a_freed_place_goes_to_the_tenant_holding_fewest() -> None:
    pipeline = FakePipeline()
    order: list[str] = []
    flood = [Request(f"flood{i}", [1, 2, i], 4, tenant="flood") for i in range(4)]
    guest = Request("guest", [7, 7, 7], 4, tenant="guest")
    for request in [*flood, guest]:
        sink = request.seq.sink
        request.seq.sink = lambda item, s=sink, name=request.seq.request_id: (  # type: ignore[method-assign]
            order.append(name) if getattr(item, "usage", None) else None,
            s(item),
        )
    run(make_loop(pipeline, max_num_seqs=1, waiting=FairQueue(8, 8)), [*flood, guest])
    assert order.index("guest") == 1  # right after the flood's first, not after all four


def test_a_failed_step_fails_what_runs_and_keeps_serving() -> None:
    pipeline = FakePipeline(fail_on_step=3)  # step 1 is the warm-up's
    loop = make_loop(pipeline)
    broken = Request("broken", [1, 2, 3], 10)
    loop.submit(broken.seq, broken.config)
    loop.start()
    try:
        assert broken.done.wait(10)
        assert broken.errors and "failed a step: out of memory" in str(broken.errors[0])
        later = Request("later", [4, 5, 6], 3)
        loop.submit(later.seq, later.config)
        assert later.done.wait(10)
        assert later.finish_reason is FinishReason.LENGTH
    finally:
        loop.close(timeout=10)


def test_a_request_the_pipeline_refuses_fails_alone() -> None:
    request = Request("r", [1, 2, 3], 4)
    run(make_loop(FakePipeline(refuse_add=True)), [request])
    assert request.errors and "OpenVINO refused the request: bad grammar" in str(request.errors[0])


def test_close_cancels_waiting_and_running() -> None:
    pipeline = FakePipeline()
    loop = make_loop(pipeline, max_num_seqs=1)
    running, waiting = Request("a", [1, 2], 10_000), Request("b", [3, 4], 10)
    loop.submit(running.seq, running.config)
    loop.submit(waiting.seq, waiting.config)
    loop.start()
    loop.close(timeout=10)
    assert running.done.wait(10) and waiting.done.wait(10)
    assert running.finish_reason is FinishReason.CANCELLED
    assert waiting.finish_reason is FinishReason.CANCELLED
    assert pipeline.live() == 0


def test_stats_report_hits_tokens_and_places() -> None:
    loop = make_loop(FakePipeline())
    requests = [Request(f"r{i}", [1, 2, 3, 4, 5, 6, 7, 8, 9], 3) for i in range(2)]
    for request in requests:
        loop.submit(request.seq, request.config)
    loop.start()
    try:
        for request in requests:
            assert request.done.wait(10)
    finally:
        loop.close(timeout=10)
    stats = loop.stats()
    assert stats.generated_tokens == 6
    assert stats.running == 0 and stats.waiting == 0
    assert requests[1].chunks[-1].usage.cached_prompt_tokens == 8  # type: ignore[union-attr]
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 18)
    assert stats.kv_tokens_capacity == 1024 and stats.kv_tokens_used == 102

"""The openvino backend's loop thread over the pipeline's process loop (serve() on a thread, or a real process where
one is killed) and a scripted stand-in for ContinuousBatchingPipeline (test_openvino_stepper.FakePipeline): streaming,
stop strings, aborts, admission bounds, fair order, failures of the pipeline, and the pipeline's process dying."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection

import pytest
import torch

pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (`make install` adds the openvino extra)")

from inference_core import FinishReason, SamplingParams
from inference_core.admission import FairQueue, FifoQueue
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.errors import EngineClosedError, EngineError, QueueFullError
from inference_core.openvino_loop import OpenVINOStepLoop, PipelineConfig, PrefixIndex
from inference_core.openvino_stepper import Orders, Ready, StepperProcess, serve
from inference_core.sampling import RowSampler
from inference_core.sequence import Sequence
from inference_core.stop_strings import StopStringMatcher
from inference_core.types import GenerationChunk
from tests.unit.test_openvino_stepper import EOS, VOCAB, FakePipeline, alone


class StepperThread:
    """The pipeline's process's loop, serve(), on a thread over an in-process pipe: the same messages, no process."""

    def __init__(self, pipeline: FakePipeline) -> None:
        self.connection, theirs = multiprocessing.Pipe()
        self._thread = threading.Thread(target=self._serve, args=(theirs, pipeline), daemon=True)
        self._thread.start()
        assert isinstance(self.connection.recv(), Ready)

    @staticmethod
    def _serve(connection: Connection, pipeline: FakePipeline) -> None:
        with connection:
            serve(connection, lambda: pipeline)

    def ended(self) -> str:
        return "stopped"

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(Orders(shutdown=True))
        self._thread.join(timeout)
        self.connection.close()


class DigitsTokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(f" {i}" for i in ids if not (skip_special_tokens and i == EOS))


class Request:
    def __init__(
        self,
        name: str,
        prompt: list[int],
        new_tokens: int,
        stop: list[str] | None = None,
        tenant: str = "default",
        stop_token: int = EOS,
    ) -> None:
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
            eos_token_ids=frozenset({stop_token}),
            sink=self._sink,
            arrival=0.0,
            tenant=tenant,
        )
        self.config: PipelineConfig = ({"max_new_tokens": new_tokens, "stop_token_ids": {stop_token}}, None)

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


def make_loop(pipeline: FakePipeline, max_num_seqs: int = 4, waiting=None) -> OpenVINOStepLoop:
    queue = waiting if waiting is not None else FifoQueue(8)
    return OpenVINOStepLoop(StepperThread(pipeline), queue, max_num_seqs, PrefixIndex(4, 1024))


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
    eos = alone([1, 2, 3], 4)[3]
    request = Request("r", [1, 2, 3], 10, stop_token=eos)
    pipeline = FakePipeline()
    run(make_loop(pipeline), [request])
    assert request.finish_reason is FinishReason.STOP
    assert request.output == alone([1, 2, 3], 4)
    assert pipeline.live() == 0


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


def test_a_dead_pipeline_process_fails_every_request_and_the_loop_stops_taking_more() -> None:
    stepper = StepperProcess(FakePipeline)
    stepper.wait_ready()
    loop = OpenVINOStepLoop(stepper, FifoQueue(8), 1, PrefixIndex(4, 1024))
    running, waiting = Request("a", [1, 2], 10**9), Request("b", [3, 4], 10)
    first = threading.Event()
    sink = running.seq.sink
    running.seq.sink = lambda item: (sink(item), first.set())  # type: ignore[method-assign]
    loop.submit(running.seq, running.config)
    loop.submit(waiting.seq, waiting.config)
    loop.start()
    try:
        assert first.wait(10)
        os.kill(stepper.pid, signal.SIGKILL)
        assert running.done.wait(10) and waiting.done.wait(10)
        for request in (running, waiting):
            assert isinstance(request.errors[0], EngineClosedError)
            assert "the OpenVINO pipeline's process was killed by SIGKILL" in str(request.errors[0])
        assert loop.failure is running.errors[0]
        assert loop.stats().running == 0 and loop.in_flight == 0
        with pytest.raises(EngineClosedError):
            later = Request("c", [5], 3)
            loop.submit(later.seq, later.config)
    finally:
        loop.close(timeout=10)

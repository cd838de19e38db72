"""One request's generation state, independent of how the scheduler batches it: tokens, sampler, grammar,
detokenizer, stop strings, timings, and the chunks it emits."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.errors import EngineError
from inference_core.sampling import RowSampler
from inference_core.speculation import NgramProposer
from inference_core.stop_strings import StopStringMatcher
from inference_core.structured import RowConstraint
from inference_core.types import DEFAULT_TENANT, FinishReason, GenerationChunk, Timings, Usage

ChunkSink = Callable[[GenerationChunk | EngineError], None]


class Sequence:
    """A request admitted to the engine. The scheduler calls ``select_token`` with the sequence's logits row and
    ``append_token`` with the result until ``finished``; the sequence turns tokens into chunks and hands them to
    ``sink`` (which must be thread-safe: the engine loop thread calls it).
    """

    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampler: RowSampler,
        detokenizer: IncrementalDetokenizer,
        stop: StopStringMatcher,
        constraint: RowConstraint | None,
        eos_token_ids: frozenset[int],
        sink: ChunkSink,
        arrival: float,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.stop = stop
        self.constraint = constraint
        self.eos_token_ids = eos_token_ids
        self.sink = sink
        self.output_ids: list[int] = []
        self.finished = False
        self.abort_requested = False
        self.cached_prompt_tokens = 0
        """Prompt tokens whose KV came from the prefix cache (set by the scheduler on admission)."""
        self._unreported_ids: list[int] = []
        self._arrival = arrival
        self._started: float | None = None
        self._first_token: float | None = None
        self.sampler.observe(prompt_ids)
        # Drafts are checked by exact comparison with the chosen token, which only greedy selection makes lossless.
        # The index is built on the first draft: the openvino backend never asks for one.
        self._drafts = sampler.params.is_greedy
        self._proposer: NgramProposer | None = None

    def mark_started(self) -> None:
        """Records when the sequence first got a slot (a preempted sequence that gets one again keeps the first)."""
        if self._started is None:
            self._started = time.perf_counter()

    def select_token(self, logits: torch.Tensor) -> int:
        """Chooses the next token from this sequence's logits row (masked in place by the grammar, if any)."""
        if self.constraint is not None:
            self.constraint.mask(logits)
        return self.sampler.sample(logits)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` guessed next tokens after the one about to be chosen (greedy sequences only), never more than
        the sequence may still generate."""
        if not self._drafts or self.finished:
            return []
        if self._proposer is None:
            self._proposer = NgramProposer([*self.prompt_ids, *self.output_ids])
        room = self.max_new_tokens - len(self.output_ids) - 1
        return self._proposer.propose(min(k, room))

    def append_token(self, token_id: int) -> None:
        """Records a generated token, emits any text it completes and finishes the sequence when it should end."""
        if self._first_token is None:
            self._first_token = time.perf_counter()
        self.output_ids.append(token_id)
        self._unreported_ids.append(token_id)
        self.sampler.observe(token_id)
        if self._proposer is not None:
            self._proposer.append(token_id)
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if token_id in self.eos_token_ids or (self.constraint is not None and self.constraint.is_terminated):
            self.finish(FinishReason.STOP)
            return
        text, stopped = self.stop.feed(self.detokenizer.add(token_id))
        if stopped:
            self.finish(FinishReason.STOP_STRING, text)
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish(FinishReason.LENGTH, text)
        elif text:
            self._emit(GenerationChunk(text=text, token_ids=self._take_ids()))

    def finish(self, reason: FinishReason, text: str = "") -> None:
        """Emits the last chunk (what is still held back unless a stop string cut it, usage, timings)."""
        if self.finished:
            return
        self.finished = True
        if reason is not FinishReason.STOP_STRING:
            emitted, _ = self.stop.feed(self.detokenizer.flush())
            text += emitted + self.stop.flush()
        usage = Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
        self._emit(
            GenerationChunk(
                text=text, token_ids=self._take_ids(), finish_reason=reason, usage=usage, timings=self._timings()
            )
        )

    def fail(self, error: EngineError) -> None:
        if not self.finished:
            self.finished = True
            self.sink(error)

    def _take_ids(self) -> list[int]:
        ids, self._unreported_ids = self._unreported_ids, []
        return ids

    def _emit(self, chunk: GenerationChunk) -> None:
        self.sink(chunk)

    def _timings(self) -> Timings:
        now = time.perf_counter()
        started = self._started if self._started is not None else now
        first = self._first_token if self._first_token is not None else now
        decoded_after_first = max(len(self.output_ids) - 1, 0)
        decode_seconds = now - first
        return Timings(
            queue_ms=(started - self._arrival) * 1000,
            time_to_first_token_ms=(first - self._arrival) * 1000,
            total_ms=(now - self._arrival) * 1000,
            decode_tokens_per_second=decoded_after_first / decode_seconds if decode_seconds > 0 else 0.0,
        )

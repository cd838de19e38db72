"""Continuous (in-flight) batching: sequences join and leave the running batch at every step.

One loop thread owns the model. Each iteration it (1) ends aborted sequences, (2) admits the next waiting sequence if a
slot is free, restoring its longest cached prompt prefix, (3) computes one prefill chunk of the admitting sequence, so
a long prompt never stalls the running streams for more than a chunk, and (4) runs one decode step for every running
sequence at once. A finished sequence leaves the batch in the same iteration and its slot is reused at once; running
rows stay packed in slots 0..B-1 (the last row moves into a hole) so a decode step reads the cache without a gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from inference_core.admission import AdmissionQueue
from inference_core.errors import EngineError, InvalidRequestError
from inference_core.kv_cache import PrefixCache, SlotKVCache
from inference_core.llama import LlamaRunner
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


@dataclass
class BatchingConfig:
    """Sizes of the continuous batcher; together they fix its KV memory (see inference_core.kv_cache)."""

    max_batch_size: int = 8
    """Sequences decoded together (KV slots)."""
    max_seq_len: int = 4096
    """Prompt plus output tokens of one sequence (positions per slot)."""
    prefix_cache_tokens: int = 16384
    """Prompt-prefix tokens kept for reuse (0 disables prefix caching)."""
    prefix_block_size: int = 16
    """Granularity of prefix reuse, in tokens."""
    prefill_chunk_tokens: int = 256
    """Prompt tokens computed per loop iteration while other sequences decode."""
    max_queue: int = 64
    """Sequences waiting for a slot beyond this are refused with QueueFullError."""


@dataclass
class EngineStats:
    """A snapshot of the batcher for metrics."""

    waiting: int = 0
    running: int = 0
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_blocks_used: int = 0
    prefix_cache_blocks_capacity: int = 0
    generated_tokens: int = 0
    steps: int = 0


@dataclass
class _Row:
    seq: Sequence
    length: int  # positions filled in its slot
    last_token: int = -1
    prefilled: int = 0
    cached: int = 0
    prompt: list[int] = field(default_factory=list)


class ContinuousBatchScheduler(AdmissionQueue):
    """Batches every running sequence; admission, abort and close: see AdmissionQueue."""

    def __init__(self, runner: LlamaRunner, config: BatchingConfig) -> None:
        super().__init__(config.max_queue, "inference-batch-loop")
        self._runner = runner
        self.config = config
        shape = runner.kv_shape()
        self.slots = SlotKVCache(shape, config.max_batch_size, config.max_seq_len)
        blocks = config.prefix_cache_tokens // config.prefix_block_size
        self.prefix = PrefixCache(shape, blocks, config.prefix_block_size) if blocks > 0 else None
        self._running: list[_Row] = []
        self._admitting: _Row | None = None
        self._generated = 0
        self._steps = 0

    @property
    def kv_bytes(self) -> int:
        return self.slots.nbytes + (self.prefix.nbytes if self.prefix else 0)

    def _warm_up(self) -> None:
        logits = self._runner.prefill([0, 1, 2, 3], 0, self.slots, 0)
        self._runner.decode([int(logits.argmax())], [4], self.slots)

    def stats(self) -> EngineStats:
        with self._cv:
            rows = [*self._running, *([self._admitting] if self._admitting else [])]
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                kv_tokens_used=sum(row.length for row in rows),
                kv_tokens_capacity=self.config.max_batch_size * self.config.max_seq_len,
                prefix_cache_hit_rate=self.prefix.hit_rate if self.prefix else 0.0,
                prefix_cache_blocks_used=self.prefix.used_blocks if self.prefix else 0,
                prefix_cache_blocks_capacity=self.prefix.num_blocks if self.prefix else 0,
                generated_tokens=self._generated,
                steps=self._steps,
            )

    def submit(self, seq: Sequence) -> None:
        if len(seq.prompt_ids) + seq.max_new_tokens > self.config.max_seq_len:
            raise InvalidRequestError(
                f"prompt ({len(seq.prompt_ids)} tokens) plus max_tokens ({seq.max_new_tokens}) exceeds the engine's "
                f"max_seq_len of {self.config.max_seq_len}; shorten the prompt or lower max_tokens"
            )
        super().submit(seq)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._admitting or self._closed):
                    self._cv.wait()
                if self._closed and not (self._running or self._admitting):
                    return
                admit = None
                if self._admitting is None and self._waiting and len(self._running) < self.config.max_batch_size:
                    admit = self._waiting.popleft()
            try:
                self._step(admit)
            except Exception as e:
                log.exception("engine step failed")
                self._fail_all(EngineError(f"generation failed inside the engine: {type(e).__name__}: {e}"))

    @torch.inference_mode()
    def _step(self, admit: Sequence | None) -> None:
        self._end_aborted()
        if admit is not None:
            self._admit(admit)
        if self._admitting is not None:
            self._prefill_chunk(self._admitting)
        if self._running:
            self._decode()
        self._steps += 1

    def _admit(self, seq: Sequence) -> None:
        seq.mark_started()
        slot = len(self._running)
        row = _Row(seq=seq, length=0, prompt=seq.prompt_ids)
        if self.prefix is not None:
            row.length = row.cached = self.prefix.restore(self.prefix.lookup(row.prompt), self.slots, slot)
        seq.cached_prompt_tokens = row.cached
        self._admitting = row

    def _prefill_chunk(self, row: _Row) -> None:
        if row.seq.abort_requested:
            self._retire_admitting(FinishReason.CANCELLED)
            return
        slot = len(self._running)
        chunk = row.prompt[row.length : row.length + self.config.prefill_chunk_tokens]
        logits = self._runner.prefill(chunk, row.length, self.slots, slot)
        row.length += len(chunk)
        if row.length < len(row.prompt):
            return
        if self.prefix is not None:
            self.prefix.insert(row.prompt, self.slots, slot)
        token = row.seq.select_token(logits)
        row.seq.append_token(token)
        self._generated += 1
        with self._cv:
            self._admitting = None
            if row.seq.finished:
                self._forget(row.seq)
            else:
                row.last_token = token
                self._running.append(row)

    def _decode(self) -> None:
        rows = self._running
        logits = self._runner.decode([row.last_token for row in rows], [row.length for row in rows], self.slots)
        for row, row_logits in zip(rows, logits, strict=True):
            row.length += 1
            token = row.seq.select_token(row_logits)
            row.seq.append_token(token)
            row.last_token = token
        self._generated += len(rows)
        self._retire([i for i, row in enumerate(rows) if row.seq.finished])

    def _end_aborted(self) -> None:
        aborted = [i for i, row in enumerate(self._running) if row.seq.abort_requested]
        for i in aborted:
            self._running[i].seq.finish(FinishReason.CANCELLED)
        self._retire(aborted)

    def _retire(self, indices: list[int]) -> None:
        """Removes finished rows, moving the last rows into the holes so slots 0..B-1 stay packed."""
        if not indices:
            return
        with self._cv:
            for index in sorted(indices, reverse=True):
                self._forget(self._running[index].seq)
                last = len(self._running) - 1
                if index != last:
                    self.slots.move(last, index, self._running[last].length)
                    self._running[index] = self._running[last]
                self._running.pop()
            if self._admitting is not None:
                # The admitting sequence sits right after the running rows; follow them down.
                self.slots.move(len(self._running) + len(indices), len(self._running), self._admitting.length)

    def _retire_admitting(self, reason: FinishReason) -> None:
        assert self._admitting is not None
        self._admitting.seq.finish(reason)
        with self._cv:
            self._forget(self._admitting.seq)
            self._admitting = None

    def _fail_all(self, error: EngineError) -> None:
        with self._cv:
            rows = [*self._running, *([self._admitting] if self._admitting else [])]
            self._running, self._admitting = [], None
            for row in rows:
                row.seq.fail(error)
                self._forget(row.seq)

"""Continuous (in-flight) batching: sequences join and leave the running batch at every step.

One loop thread owns the model. Each iteration is one *step*, one pass over the weights:

1. aborted sequences end;
2. if no admission is under way, waiting sequences are admitted while slots are free and their prompts (after the
   longest cached prefix is restored into their slot) fit this step's prefill budget. The waiting queue's policy picks
   who is next and may hand a running slot over to another tenant (see inference_core.admission.FairQueue): the row
   it takes goes back to the front of its tenant's line and resumes later from the prefix cache;
3. the step computes a decode token for every running sequence *and* up to ``prefill_chunk_tokens`` prompt tokens of
   the admitting ones (first come, first served), so a long prompt never stalls running streams for more than a chunk
   and short prompts ride along with the decode at little extra cost. The step that completes the prompt of a
   sequence the policy favours (a tenant below its share) computes prompts only, so that sequence's first token does
   not wait for the other tenants' decode; never two such steps in a row;
4. an admitting sequence whose prompt is complete samples its first token and joins the running rows; finished rows
   leave at once and their slots are reused.

Running rows stay packed in slots 0..B-1 and admitting rows follow them in arrival order (a row moves into a hole when
another leaves), so a decode step reads the cache without a gather. The longest prompt prefix that all running rows
share is handed to the runner, which attends to it once for the whole batch (see inference_core.llama).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from inference_core.admission import AdmissionQueue, FairQueue, FifoQueue, WaitingQueue
from inference_core.errors import EngineError, InvalidRequestError
from inference_core.kv_cache import PrefixCache, SlotKVCache, common_prefix_length
from inference_core.llama import Chunk, LlamaRunner
from inference_core.sequence import Sequence
from inference_core.types import FinishReason

log = logging.getLogger(__name__)


@dataclass
class BatchingConfig:
    """Sizes of the continuous batcher; together they fix its KV memory (see inference_core.kv_cache)."""

    max_batch_size: int = 16
    """Sequences decoded together (KV slots)."""
    max_seq_len: int = 4096
    """Prompt plus output tokens of one sequence (positions per slot)."""
    prefix_cache_tokens: int = 16384
    """Prompt-prefix tokens kept for reuse (0 disables prefix caching)."""
    prefix_block_size: int = 16
    """Granularity of prefix reuse, in tokens."""
    prefill_chunk_tokens: int = 256
    """Prompt tokens computed per step (shared by the sequences being admitted) alongside the decoding rows."""
    max_queue: int = 64
    """Sequences waiting for a slot beyond this are refused with QueueFullError."""
    speculative_tokens: int = 4
    """Draft tokens per greedy row (prompt lookup, see inference_core.speculation); 0 switches speculation off. Drafts
    only fill a step up to ``max_batch_size`` tokens, where a decode step is bound by reading the weights, not by
    arithmetic, so they cost little; a full batch does not speculate."""
    fair_share: bool = True
    """Share the queue and the slots between tenants (FairQueue); False serves everyone first come, first served."""
    max_queue_per_tenant: int = 16
    """With fair_share: sequences of one tenant waiting beyond this are refused with QueueFullError."""
    tenant_weights: dict[str, int] = field(default_factory=dict)
    """With fair_share: a tenant's share of turns and slots relative to others (1 when not listed)."""

    def waiting_queue(self) -> WaitingQueue:
        """The waiting queue these settings describe."""
        if not self.fair_share:
            return FifoQueue(self.max_queue)
        return FairQueue(self.max_queue, self.max_queue_per_tenant, self.tenant_weights)


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
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    preemptions: int = 0
    waiting_by_tenant: dict[str, int] = field(default_factory=dict)
    slots_by_tenant: dict[str, int] = field(default_factory=dict)


@dataclass
class _Row:
    seq: Sequence
    slot: int
    length: int = 0  # positions filled in its slot
    last_token: int = -1
    prompt: list[int] = field(default_factory=list)  # what admission computes: the prompt, plus output when resumed
    resumed: bool = False  # preempted earlier: its next token is chosen already
    favoured: bool = False  # its first token goes before the running rows' next ones
    joined: int = 0  # order of joining the running rows

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - self.length


class ContinuousBatchScheduler(AdmissionQueue):
    """Batches every running sequence; admission, abort and close: see AdmissionQueue."""

    def __init__(self, runner: LlamaRunner, config: BatchingConfig) -> None:
        super().__init__(config.waiting_queue(), "inference-batch-loop")
        self._runner = runner
        self.config = config
        shape = runner.kv_shape()
        self.slots = SlotKVCache(shape, config.max_batch_size, config.max_seq_len)
        blocks = config.prefix_cache_tokens // config.prefix_block_size
        self.prefix = PrefixCache(shape, blocks, config.prefix_block_size) if blocks > 0 else None
        self._running: list[_Row] = []
        self._admitting: list[_Row] = []
        self._shared = 0  # prompt prefix common to all running rows
        self._generated = 0
        self._steps = 0
        self._drafted = 0
        self._accepted = 0
        self._joins = 0
        self._preemptions = 0
        self._prompts_only = False  # the last step decoded no running row

    @property
    def kv_bytes(self) -> int:
        return self.slots.nbytes + (self.prefix.nbytes if self.prefix else 0)

    def _warm_up(self) -> None:
        logits = self._runner.prefill([0, 1, 2, 3], 0, self.slots, 0)
        self._runner.decode([int(logits.argmax())], [4], self.slots)

    def stats(self) -> EngineStats:
        with self._cv:
            rows = [*self._running, *self._admitting]
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
                draft_tokens=self._drafted,
                accepted_draft_tokens=self._accepted,
                preemptions=self._preemptions,
                waiting_by_tenant=self._waiting.waiting_by_tenant(),
                slots_by_tenant=self._held(),
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
            try:
                self._step()
            except Exception as e:
                log.exception("engine step failed")
                self._fail_all(EngineError(f"generation failed inside the engine: {type(e).__name__}: {e}"))

    @torch.inference_mode()
    def _step(self) -> None:
        self._end_aborted()
        if not self._admitting:
            self._admit()
        prompts = self._plan_chunks()
        if not self._running and not prompts:
            return
        decoding = [] if self._prompts_first(prompts) else self._running
        drafts = self._plan_drafts(sum(len(chunk.tokens) for chunk in prompts)) if decoding else {}
        logits = self._runner.step(
            self.slots,
            [row.last_token for row in decoding],
            [row.length for row in decoding],
            [*prompts, *drafts.values()],
            self._shared if decoding else 0,
        )
        self._steps += 1
        self._prompts_only = not decoding
        batch = len(decoding)
        prompt_logits = logits[batch : batch + len(prompts)]
        draft_logits = logits[batch + len(prompts) :]
        for index, row in enumerate(decoding):
            row.length += 1
            self._append(row, logits[index])
            draft = drafts.get(index)
            if draft is not None:
                self._verify(row, draft.tokens, draft_logits[: len(draft.tokens)])
                draft_logits = draft_logits[len(draft.tokens) :]
        joined = []
        for row, chunk, row_logits in zip(self._admitting, prompts, prompt_logits, strict=False):
            row.length += len(chunk.tokens)
            if row.to_prefill == 0:
                if row.resumed:
                    # Its next token was chosen before it was preempted: these logits go unused.
                    row.last_token = row.seq.output_ids[-1]
                else:
                    if self.prefix is not None:
                        self.prefix.insert(row.prompt, self.slots, row.slot)
                    self._append(row, row_logits)
                joined.append(row)
        with self._cv:
            # Rows complete in arrival order (the budget goes first come, first served), so the ones that joined sit
            # right after the running rows and the running rows stay packed.
            for row in joined:
                self._joins += 1
                row.joined = self._joins
            self._running += joined
            del self._admitting[: len(joined)]
            finished = [row for row in self._running if row.seq.finished]
            self._remove(finished)
        if joined or finished:
            self._shared = self._common_prefix()

    def _prompts_first(self, prompts: list[Chunk]) -> bool:
        """Whether this step leaves the running rows out: it completes a favoured row's prompt, and the last step did
        decode (so running rows advance at least every other step, however many favoured rows arrive)."""
        if not self._running or self._prompts_only:
            return False
        return any(
            row.favoured and chunk.start + len(chunk.tokens) == len(row.prompt)
            for row, chunk in zip(self._admitting, prompts, strict=False)
        )

    def _plan_drafts(self, prompt_tokens: int) -> dict[int, Chunk]:
        """Drafts for greedy running rows (by row index), while the step holds fewer than max_batch_size tokens."""
        room = self.config.max_batch_size - len(self._running) - prompt_tokens
        drafts: dict[int, Chunk] = {}
        for index, row in enumerate(self._running):
            if room <= 0 or self.config.speculative_tokens <= 0:
                break
            tokens = row.seq.draft(min(self.config.speculative_tokens, room))
            if tokens:
                # Right after the token this step decodes: positions length+1.. of the row's own slot.
                drafts[index] = Chunk(row.slot, row.length + 1, tokens, all_logits=True)
                room -= len(tokens)
        return drafts

    def _verify(self, row: _Row, draft: list[int], logits: torch.Tensor) -> None:
        """Keeps the drafted tokens the row would have chosen anyway. Draft token i stands where the row's next
        token goes and was computed in the context of the tokens before it, so while each choice equals the draft the
        next logits row is exact; the first mismatch ends it (that choice too came from exact logits), and the keys
        of the rest of the draft are overwritten by later steps."""
        self._drafted += len(draft)
        for token, token_logits in zip(draft, logits, strict=True):
            if row.seq.finished or row.last_token != token:
                return
            row.length += 1
            self._accepted += 1
            self._append(row, token_logits)

    def _append(self, row: _Row, logits: torch.Tensor) -> None:
        token = row.seq.select_token(logits)
        # Counted before the token is handed on: its chunk may end the request, and a client that then reads the
        # metrics must find it counted.
        self._generated += 1
        row.seq.append_token(token)
        row.last_token = token

    def _admit(self) -> None:
        """Admits waiting sequences, in the order the waiting queue's policy gives, while the prompts admitted so far
        fit one step's budget: into free slots, or into a slot the policy takes from another tenant. After a favoured
        sequence only favoured ones join, so the prompts-only step that gives its first token stays short."""
        planned = 0
        preempted = favoured_in = False
        while planned < self.config.prefill_chunk_tokens:
            with self._cv:
                held = self._held()
                tenant = self._waiting.next_tenant(held)
                if tenant is None:
                    break
                favoured = self._waiting.favours(tenant, held)
                if favoured_in and not favoured:
                    break
                if len(self._running) + len(self._admitting) >= self.config.max_batch_size:
                    victim = self._waiting.tenant_to_preempt(tenant, held)
                    if victim is None or not self._preempt(victim):
                        break
                    preempted = True
                seq = self._waiting.pop(tenant)
                resumed = bool(seq.output_ids)
                # A resumed row's slot is rebuilt from its prompt and all its output but the last token, which the
                # next decode step feeds as usual.
                tokens = [*seq.prompt_ids, *seq.output_ids[:-1]] if resumed else seq.prompt_ids
                row = _Row(
                    seq=seq,
                    slot=len(self._running) + len(self._admitting),
                    prompt=tokens,
                    resumed=resumed,
                    favoured=favoured and not resumed,
                )
                favoured_in = favoured_in or row.favoured
                self._admitting.append(row)
            seq.mark_started()
            if self.prefix is not None:
                row.length = self.prefix.restore(self.prefix.lookup(row.prompt), self.slots, row.slot)
            if not resumed:
                seq.cached_prompt_tokens = row.length
            planned += row.to_prefill
        if preempted:
            self._shared = self._common_prefix()

    def _held(self) -> dict[str, int]:
        """Slots held per tenant (running and admitting rows)."""
        return dict(Counter(row.seq.tenant for row in [*self._running, *self._admitting]))

    def _preempt(self, tenant: str) -> bool:
        """Sends ``tenant``'s most recently joined running row back to the front of its line (caller holds the lock).
        Its KV goes into the prefix cache first, so when admitted again it restores its prompt and output so far and
        computes only the last partial block; without a prefix cache it computes them all again. False when the
        tenant has no running row (only rows still admitting)."""
        rows = [row for row in self._running if row.seq.tenant == tenant]
        if not rows:
            return False
        row = max(rows, key=lambda row: row.joined)
        if self.prefix is not None:
            self.prefix.insert([*row.seq.prompt_ids, *row.seq.output_ids[:-1]], self.slots, row.slot)
        self._drop([row])
        self._waiting.requeue(row.seq)
        self._preemptions += 1
        return True

    def _plan_chunks(self) -> list[Chunk]:
        budget = self.config.prefill_chunk_tokens
        chunks = []
        for row in self._admitting:
            take = min(row.to_prefill, budget)
            if take == 0:
                break
            chunks.append(Chunk(row.slot, row.length, row.prompt[row.length : row.length + take]))
            budget -= take
        return chunks

    def _common_prefix(self) -> int:
        prompts = [row.prompt for row in self._running]
        return common_prefix_length(prompts) if len(prompts) > 1 else 0

    def _end_aborted(self) -> None:
        aborted = [row for row in [*self._running, *self._admitting] if row.seq.abort_requested]
        if not aborted:
            return
        for row in aborted:
            row.seq.finish(FinishReason.CANCELLED)
        with self._cv:
            self._remove(aborted)
        self._shared = self._common_prefix()

    def _remove(self, rows: list[_Row]) -> None:
        """Drops the rows of finished sequences (running or admitting; caller holds the lock and then updates the
        shared prefix) and forgets their sequences."""
        for row in rows:
            self._forget(row.seq)
        self._drop(rows)

    def _drop(self, rows: list[_Row]) -> None:
        """Takes ``rows`` out of the batch and repacks the slots: running rows left in slots past the new batch size
        move into the holes, then the admitting rows move down behind them in order."""
        if not rows:
            return
        gone = {id(row) for row in rows}
        self._running = [row for row in self._running if id(row) not in gone]
        self._admitting = [row for row in self._admitting if id(row) not in gone]
        batch = len(self._running)
        holes = sorted(set(range(batch)) - {row.slot for row in self._running})
        for row in [row for row in self._running if row.slot >= batch]:
            self._move(row, holes.pop(0))
        self._running.sort(key=lambda row: row.slot)  # list index = slot: decode row b is slot b
        for index, row in enumerate(self._admitting):
            self._move(row, batch + index)

    def _move(self, row: _Row, slot: int) -> None:
        if row.slot != slot:
            self.slots.move(row.slot, slot, row.length)
            row.slot = slot

    def _fail_all(self, error: EngineError) -> None:
        with self._cv:
            rows = [*self._running, *self._admitting]
            self._running, self._admitting = [], []
            for row in rows:
                row.seq.fail(error)
                self._forget(row.seq)

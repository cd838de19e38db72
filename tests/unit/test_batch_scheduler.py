"""The continuous batcher's bookkeeping, on a model-free runner whose next token is a function of the history it reads
back from the KV slot. A row decoded from the wrong slot, a chunk written to the wrong positions, a prefix restored
wrongly or a false shared-prefix claim all change the output, so "batched output equals each sequence alone" checks
every slot move, join, retire and abort of the scheduler (the real model's parity with HF: test_continuous_batching)."""

from __future__ import annotations

import threading
import zlib

import pytest
import torch

from inference_core import FinishReason, SamplingParams
from inference_core.continuous import BatchingConfig, ContinuousBatchScheduler
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.kv_cache import KVShape, SlotKVCache, common_prefix_length
from inference_core.llama import Chunk
from inference_core.sampling import RowSampler
from inference_core.sequence import Sequence
from inference_core.speculation import NgramProposer
from inference_core.stop_strings import StopStringMatcher
from inference_core.types import GenerationChunk

VOCAB = 97
GREEDY = SamplingParams(temperature=0.0)
EOS = VOCAB + 1  # never produced: sequences end by length or abort


def next_token(history: list[int]) -> int:
    return zlib.crc32(repr(history).encode()) % VOCAB


def alone(prompt: list[int], new_tokens: int, rule=next_token) -> list[int]:
    history, out = list(prompt), []
    for _ in range(new_tokens):
        out.append(rule(history))
        history.append(out[-1])
    return out


class HistoryRunner:
    """Stands in for LlamaRunner: the KV cache holds token ids, logits pick next_token(history read from the slot)."""

    def __init__(self, max_len: int, rule=next_token) -> None:
        self.max_len = max_len
        self.next_token = rule
        self.steps: list[tuple[int, list[Chunk]]] = []  # (decode rows, chunks) of each step after warm-up
        self.shared_claims: list[int] = []  # the shared prefix handed in with each step that decodes
        self.on_step = lambda step: None
        self.warm = False

    def kv_shape(self) -> KVShape:
        return KVShape(1, 1, 1, torch.float64, torch.device("cpu"))

    def _history(self, cache: SlotKVCache, slot: int, length: int) -> list[int]:
        return [int(t) for t in cache.keys[0, slot, 0, :length, 0].tolist()]

    def _logits(self, history: list[int]) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[self.next_token(history)] = 1.0
        return logits

    def step(self, cache, tokens, lengths, chunks=(), shared=0) -> torch.Tensor:
        rows = []
        for b, (token, length) in enumerate(zip(tokens, lengths, strict=True)):
            cache.keys[0, b, 0, length, 0] = token
            rows.append(self._history(cache, b, length + 1))
        if shared:
            assert len(rows) > 1 and all(row[:shared] == rows[0][:shared] for row in rows), "false shared prefix"
        for chunk in chunks:
            end = chunk.start + len(chunk.tokens)
            cache.keys[0, chunk.slot, 0, chunk.start : end, 0] = torch.tensor(chunk.tokens, dtype=torch.float64)
            firsts = range(chunk.start + 1, end + 1) if chunk.all_logits else [end]
            rows += [self._history(cache, chunk.slot, stop) for stop in firsts]
        if self.warm:
            self.steps.append((len(tokens), list(chunks)))
            if tokens:
                self.shared_claims.append(shared)
            self.on_step(len(self.steps))
        return torch.stack([self._logits(history) for history in rows])

    def prefill(self, tokens, start, cache, slot) -> torch.Tensor:
        return self.step(cache, [], [], [Chunk(slot, start, tokens)])[0]

    def decode(self, tokens, lengths, cache, shared=0) -> torch.Tensor:
        logits = self.step(cache, tokens, lengths, shared=shared)
        self.warm = True  # decode is the warm-up's last call; the scheduler calls step
        return logits


class DigitsTokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(f" {i}" for i in ids)


class Request:
    def __init__(self, name: str, prompt: list[int], new_tokens: int, sampling: SamplingParams = GREEDY) -> None:
        self.chunks: list[GenerationChunk] = []
        self.done = threading.Event()
        self.seq = Sequence(
            request_id=name,
            prompt_ids=prompt,
            max_new_tokens=new_tokens,
            sampler=RowSampler(sampling, VOCAB, torch.device("cpu")),
            detokenizer=IncrementalDetokenizer(DigitsTokenizer(), prompt),
            stop=StopStringMatcher([]),
            constraint=None,
            eos_token_ids=frozenset({EOS}),
            sink=self._sink,
            arrival=0.0,
        )

    def _sink(self, item) -> None:
        assert isinstance(item, GenerationChunk), item
        self.chunks.append(item)
        if item.finish_reason is not None:
            self.done.set()

    @property
    def output(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.token_ids]

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.chunks[-1].finish_reason if self.chunks else None


def scheduler(runner: HistoryRunner, **config) -> ContinuousBatchScheduler:
    defaults = {"max_batch_size": 4, "max_seq_len": 128, "prefix_cache_tokens": 256, "prefix_block_size": 4}
    return ContinuousBatchScheduler(runner, BatchingConfig(**{**defaults, **config}))  # type: ignore[arg-type]


def serve(batcher: ContinuousBatchScheduler, requests: list[Request]) -> None:
    """Submits every request before the loop starts (so the first step sees them all) and waits for all to end."""
    for request in requests:
        batcher.submit(request.seq)
    batcher.start()
    try:
        for request in requests:
            assert request.done.wait(30), f"{request.seq.request_id} did not finish"
    finally:
        batcher.close(5)


SYSTEM = list(range(1, 21))  # a 20-token shared prefix


def test_batched_outputs_equal_each_sequence_alone_through_joins_retires_and_aborts() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, prefill_chunk_tokens=8)
    requests = []
    for i in range(14):
        prompt = (SYSTEM if i % 3 else SYSTEM[:6]) + [30 + i] * (1 + i % 5)
        requests.append(Request(f"r{i}", prompt, new_tokens=3 + (i * 7) % 11))
    doomed = {"r4", "r9"}

    def abort_some(step: int) -> None:
        if step == 6:
            for name in doomed:
                batcher.abort(name)

    runner.on_step = abort_some
    serve(batcher, requests)
    for request in requests:
        expected = alone(request.seq.prompt_ids, request.seq.max_new_tokens)
        if request.seq.request_id in doomed:
            assert request.finish_reason is FinishReason.CANCELLED
            assert request.output == expected[: len(request.output)]
        else:
            assert request.finish_reason is FinishReason.LENGTH
            assert request.output == expected, request.seq.request_id
    assert max(rows + len(chunks) for rows, chunks in runner.steps) <= 4, "never more rows than slots"
    assert any(rows > 1 and chunks for rows, chunks in runner.steps), "prompts were computed alongside decode rows"
    assert batcher.prefix is not None and batcher.prefix.hit_rate > 0.3


def test_waiting_short_prompts_are_admitted_together_up_to_the_prefill_budget() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, prefill_chunk_tokens=16, prefix_cache_tokens=0)
    requests = [Request(f"r{i}", [50 + i] * 5, new_tokens=2) for i in range(5)]
    serve(batcher, requests)
    rows, chunks = runner.steps[0]
    # 5 + 5 + 5 tokens leave room, so a fourth is admitted and gets the last token of the budget; the fifth waits.
    assert rows == 0
    assert [(c.slot, c.start, len(c.tokens)) for c in chunks] == [(0, 0, 5), (1, 0, 5), (2, 0, 5), (3, 0, 1)]
    assert all(request.output == alone(request.seq.prompt_ids, 2) for request in requests)


def test_a_cold_prompt_longer_than_the_budget_is_admitted_alone_so_followers_reuse_its_prefix() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, prefill_chunk_tokens=8)
    requests = [Request(f"r{i}", [*SYSTEM, 60 + i], new_tokens=2) for i in range(3)]
    serve(batcher, requests)
    first_chunks = [chunks for _, chunks in runner.steps[:3]]
    assert [[c.slot for c in chunks] for chunks in first_chunks] == [[0], [0], [0]], "21 tokens: three steps alone"
    # The followers restore the 20 cached tokens and compute one token each.
    assert all(request.seq.cached_prompt_tokens == 20 for request in requests[1:])
    assert all(request.output == alone(request.seq.prompt_ids, 2) for request in requests)


def test_the_shared_prefix_handed_to_the_runner_is_the_running_rows_common_prompt_prefix() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, prefill_chunk_tokens=64)
    requests = [Request(f"r{i}", [*SYSTEM, 70 + i, 71], new_tokens=6) for i in range(3)]
    serve(batcher, requests)
    assert common_prefix_length([r.seq.prompt_ids for r in requests]) == 20
    assert max(runner.shared_claims) == 20  # the HistoryRunner asserts every claim is true


@pytest.mark.parametrize("new_tokens", [1, 2])
def test_a_sequence_that_ends_on_its_first_token_leaves_its_slot_at_once(new_tokens: int) -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, max_batch_size=1, prefill_chunk_tokens=64)
    requests = [Request(f"r{i}", [80 + i, 3], new_tokens=new_tokens) for i in range(3)]
    serve(batcher, requests)
    assert all(request.output == alone(request.seq.prompt_ids, new_tokens) for request in requests)
    assert batcher.stats().running == 0 and batcher.stats().kv_tokens_used == 0


def cyclic(history: list[int]) -> int:
    """A rule that repeats itself: the next token depends on the last two only, so prompt lookup guesses it."""
    return (history[-1] * 7 + history[-2]) % 11


@pytest.mark.parametrize("speculative_tokens", [0, 4])
def test_drafts_change_how_many_steps_not_the_output(speculative_tokens: int) -> None:
    runner = HistoryRunner(128, rule=cyclic)
    batcher = scheduler(runner, max_batch_size=4, prefill_chunk_tokens=64, speculative_tokens=speculative_tokens)
    requests = [Request(f"r{i}", [1, 2 + i, 3, 4 + i], new_tokens=40) for i in range(2)]
    serve(batcher, requests)
    for request in requests:
        assert request.output == alone(request.seq.prompt_ids, 40, cyclic)
    stats = batcher.stats()
    if speculative_tokens:
        # Two rows in four slots leave two draft tokens a step; once the cycle shows, both are right.
        assert stats.accepted_draft_tokens > 0.5 * stats.draft_tokens > 0
        assert stats.steps < 30
        assert max(rows + sum(len(c.tokens) for c in chunks if c.all_logits) for rows, chunks in runner.steps) <= 4
    else:
        assert stats.draft_tokens == 0 and stats.steps >= 40


def test_rows_that_sample_are_never_drafted() -> None:
    runner = HistoryRunner(128, rule=cyclic)
    batcher = scheduler(runner, max_batch_size=4, prefill_chunk_tokens=64)
    request = Request("hot", [1, 2, 3, 4], new_tokens=20, sampling=SamplingParams(temperature=0.7, seed=1))
    serve(batcher, [request])
    assert batcher.stats().draft_tokens == 0
    assert len(request.output) == 20


def test_the_proposer_drafts_what_followed_the_latest_earlier_occurrence_of_the_tail() -> None:
    proposer = NgramProposer([5, 6, 7, 8, 9, 5, 6, 7])
    assert proposer.propose(3) == [8, 9, 5]
    proposer.append(1)  # (6, 7, 1) and (7, 1) never occurred before
    assert proposer.propose(2) == []
    proposer = NgramProposer([1, 2, 3, 1, 2, 4, 1, 2])  # no earlier (4, 1, 2); the latest earlier (1, 2) -> 4
    assert proposer.propose(2) == [4, 1]
    assert proposer.propose(0) == []

"""Fair share between tenants: the waiting queue's turns, per-tenant places, abort and close, and running slots handed
over to a newcomer (on the model-free runner of test_batch_scheduler, so a slot restored wrongly changes the output)."""

from __future__ import annotations

import pytest

from inference_core import FinishReason, QueueFullError
from inference_core.admission import FairQueue, FifoQueue
from inference_core.continuous import ContinuousBatchScheduler
from inference_core.sequence import Sequence
from tests.unit.test_batch_scheduler import HistoryRunner, Request, alone, scheduler


def request(name: str, tenant: str, prompt: list[int] | None = None, new_tokens: int = 3) -> Request:
    made = Request(name, prompt or [1, 2, 3], new_tokens)
    made.seq.tenant = tenant
    return made


def seq(name: str, tenant: str) -> Sequence:
    return request(name, tenant).seq


def pop_all(queue: FairQueue | FifoQueue) -> list[str]:
    names = []
    while (next_seq := queue.pop_next()) is not None:
        names.append(next_seq.request_id)
    return names


def test_tenants_take_turns_each_in_its_own_arrival_order() -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16)
    for name in ("a1", "a2", "a3", "a4", "b1", "b2", "c1"):
        queue.push(seq(name, name[0]))
    assert queue.waiting_by_tenant() == {"a": 4, "b": 2, "c": 1}
    assert pop_all(queue) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert len(queue) == 0 and queue.next_tenant() is None


def test_fifo_serves_in_arrival_order_whatever_the_tenant() -> None:
    queue = FifoQueue(max_queue=64)
    for name in ("a1", "a2", "b1", "a3"):
        queue.push(seq(name, name[0]))
    assert pop_all(queue) == ["a1", "a2", "b1", "a3"]


def test_a_weight_is_the_number_of_sequences_in_a_turn() -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16, weights={"gold": 3})
    for i in range(5):
        queue.push(seq(f"gold{i}", "gold"))
        queue.push(seq(f"free{i}", "free"))
    assert pop_all(queue) == ["gold0", "gold1", "gold2", "free0", "gold3", "gold4", "free1", "free2", "free3", "free4"]


def test_a_newcomer_joins_the_turns_at_the_back() -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16)
    for name in ("a1", "a2", "a3", "b1"):
        queue.push(seq(name, name[0]))
    assert queue.pop_next().request_id == "a1"
    queue.push(seq("c1", "c"))
    assert pop_all(queue) == ["b1", "a2", "c1", "a3"]


def test_a_flooding_tenant_is_refused_its_own_extra_places_and_others_still_get_in() -> None:
    queue = FairQueue(max_queue=5, max_queue_per_tenant=2)
    queue.push(seq("a1", "a"))
    queue.push(seq("a2", "a"))
    with pytest.raises(QueueFullError, match="tenant 'a' has 2 requests waiting"):
        queue.push(seq("a3", "a"))
    queue.push(seq("b1", "b"))
    queue.push(seq("c1", "c"))
    queue.push(seq("c2", "c"))
    with pytest.raises(QueueFullError, match="the engine queue is full"):
        queue.push(seq("d1", "d"))
    assert len(queue) == 5


def test_a_preempted_sequence_goes_back_first_in_its_line_and_is_never_refused() -> None:
    queue = FairQueue(max_queue=2, max_queue_per_tenant=1)
    queue.push(seq("a2", "a"))
    queue.push(seq("b1", "b"))
    queue.requeue(seq("a1", "a"))
    assert len(queue) == 3
    assert pop_all(queue) == ["a1", "b1", "a2"]


def test_a_free_slot_goes_to_the_waiting_tenant_holding_fewest_slots_per_weight() -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16, weights={"gold": 2})
    for name in ("a1", "gold1", "c1"):
        queue.push(seq(name, name.rstrip("1")))
    assert queue.next_tenant({"a": 1, "gold": 2, "c": 3}) == "a", "a 1 and gold 2/2 slots per weight: turns decide"
    assert queue.next_tenant({"a": 2, "gold": 2, "c": 3}) == "gold"
    assert queue.next_tenant({"a": 3, "gold": 2, "c": 0}) == "c"
    assert queue.pop("c").request_id == "c1"
    assert pop_all(queue) == ["a1", "gold1"]


@pytest.mark.parametrize(
    ("held", "newcomer", "expected"),
    [
        ({"a": 8}, "b", "a"),
        ({"a": 7, "b": 1}, "b", "a"),
        ({"a": 4, "b": 3, "c": 1}, "c", "a"),
        ({"a": 5, "b": 3}, "b", "a"),  # 4 and 4 afterwards
        ({"a": 4, "b": 3}, "b", None),  # 3 and 4 afterwards: b would be the richer one, and a would take it back
        ({"a": 4, "b": 4}, "b", None),
        ({"b": 3}, "b", None),
        ({"gold": 6, "b": 2}, "b", None),  # gold's weight 3: 6/3 = 2 slots per weight, b's would be 3
        ({"gold": 8}, "b", "gold"),
    ],
)
def test_a_slot_is_taken_only_from_a_tenant_that_keeps_at_least_the_newcomers_share(
    held: dict[str, int], newcomer: str, expected: str | None
) -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16, weights={"gold": 3})
    assert queue.tenant_to_preempt(newcomer, held) == expected
    assert FifoQueue(64).tenant_to_preempt(newcomer, held) is None


@pytest.mark.parametrize(
    ("held", "tenant", "expected"),
    [
        ({"a": 8}, "b", True),
        ({"a": 6, "b": 1}, "b", True),
        ({"a": 4, "b": 3}, "b", False),  # 4 and 4 with it
        ({"a": 8}, "a", False),
        ({}, "a", False),
        ({"gold": 3}, "b", False),  # gold's weight 3: 1 slot per weight, as b's would be
        ({"gold": 6}, "b", True),
        ({"b": 2}, "gold", True),  # one slot is 1/3 per weight for gold
    ],
)
def test_a_tenant_below_the_others_share_is_favoured_for_its_first_token(
    held: dict[str, int], tenant: str, expected: bool
) -> None:
    queue = FairQueue(max_queue=64, max_queue_per_tenant=16, weights={"gold": 3})
    assert queue.favours(tenant, held) is expected
    assert FifoQueue(64).favours(tenant, held) is False


def test_queue_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue_per_tenant must be >= 1"):
        FairQueue(max_queue=4, max_queue_per_tenant=0)
    with pytest.raises(ValueError, match="weights must be >= 1"):
        FairQueue(max_queue=4, max_queue_per_tenant=2, weights={"a": 0})
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        FifoQueue(0)


def unstarted(**config) -> ContinuousBatchScheduler:
    """A scheduler whose loop never runs: what is submitted stays waiting."""
    return scheduler(HistoryRunner(128), max_queue_per_tenant=2, **config)


def test_aborting_a_waiting_request_cancels_it_and_leaves_the_others_turns() -> None:
    batcher = unstarted()
    requests = {name: request(name, name[0]) for name in ("a1", "a2", "b1", "b2")}
    for made in requests.values():
        batcher.submit(made.seq)
    batcher.abort("a1")
    assert requests["a1"].finish_reason is FinishReason.CANCELLED
    assert batcher.queue_depth == 3 and batcher.in_flight == 3
    assert batcher.stats().waiting_by_tenant == {"a": 1, "b": 2}
    batcher.submit(request("a3", "a").seq)  # a's place is free again
    with pytest.raises(QueueFullError, match="tenant 'b'"):
        batcher.submit(request("b3", "b").seq)
    assert pop_all(batcher._waiting) == ["a2", "b1", "a3", "b2"]


def test_close_cancels_the_waiting_requests_of_every_tenant() -> None:
    batcher = unstarted()
    requests = [request(name, name[0]) for name in ("a1", "a2", "b1", "c1")]
    for made in requests:
        batcher.submit(made.seq)
    batcher.close(5)
    assert all(made.finish_reason is FinishReason.CANCELLED for made in requests)
    assert batcher.queue_depth == 0 and batcher.in_flight == 0


def first_step_with(runner: HistoryRunner, made: Request) -> int:
    """The number (1-based) of the first step that computed part of ``made``'s prompt."""
    for number, (_, chunks) in enumerate(runner.steps, start=1):
        if any(chunk.tokens and chunk.tokens == made.seq.prompt_ids[: len(chunk.tokens)] for chunk in chunks):
            return number
    raise AssertionError(f"{made.seq.request_id} was never admitted")


@pytest.mark.parametrize("prefix_cache_tokens", [256, 0])
def test_a_newcomer_takes_a_slot_from_a_flood_at_once_and_the_flood_resumes_exactly(prefix_cache_tokens: int) -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(
        runner,
        max_batch_size=4,
        prefill_chunk_tokens=64,
        prefix_cache_tokens=prefix_cache_tokens,
        max_queue_per_tenant=8,
    )
    flood = [request(f"a{i}", "a", [40 + i, 41, 42 + i, 43, 44], new_tokens=12 + i) for i in range(6)]
    newcomer = request("b0", "b", [90, 91, 92], new_tokens=5)
    submitted_at: list[int] = []

    def arrive(step: int) -> None:
        if step == 3:
            submitted_at.append(step)
            batcher.submit(newcomer.seq)

    runner.on_step = arrive
    for made in flood:
        batcher.submit(made.seq)
    batcher.start()
    try:
        for made in [*flood, newcomer]:
            assert made.done.wait(30), f"{made.seq.request_id} did not finish"
    finally:
        batcher.close(5)
    admitted = first_step_with(runner, newcomer)
    assert admitted == submitted_at[0] + 1, "admitted in the step after it arrived"
    rows, chunks = runner.steps[admitted - 1]
    assert rows == 0 and len(chunks) == 1, "its prompt alone: the flood's three rows wait one step"
    assert runner.steps[admitted][0] == 4, "then all four rows decode"
    assert batcher.stats().preemptions >= 1
    for made in [*flood, newcomer]:
        assert made.output == alone(made.seq.prompt_ids, made.seq.max_new_tokens), made.seq.request_id
        assert made.finish_reason is FinishReason.LENGTH
    assert max(rows + len(chunks) for rows, chunks in runner.steps) <= 4


def test_first_come_first_served_makes_a_newcomer_wait_behind_the_flood() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, max_batch_size=4, prefill_chunk_tokens=64, fair_share=False)
    flood = [request(f"a{i}", "a", [40 + i, 41, 42 + i, 43, 44], new_tokens=12) for i in range(6)]
    newcomer = request("b0", "b", [90, 91, 92], new_tokens=5)

    def arrive(step: int) -> None:
        if step == 3:
            batcher.submit(newcomer.seq)

    runner.on_step = arrive
    for made in flood:
        batcher.submit(made.seq)
    batcher.start()
    try:
        for made in [*flood, newcomer]:
            assert made.done.wait(30)
    finally:
        batcher.close(5)
    # The first four run 12 tokens; the two flood requests still waiting go first, then the newcomer.
    assert first_step_with(runner, newcomer) > 12
    assert batcher.stats().preemptions == 0


def test_the_step_that_gives_a_newcomer_its_first_token_computes_its_prompt_alone() -> None:
    runner = HistoryRunner(128)
    batcher = scheduler(runner, max_batch_size=4, prefill_chunk_tokens=64, max_queue_per_tenant=8)
    # a0 and a1 end in step 3 and free two slots just as the newcomer arrives; a4 and a5 wait for slots.
    flood = [request(f"a{i}", "a", [40 + i, 41, 42 + i, 43, 44], new_tokens=3 if i < 2 else 20) for i in range(6)]
    newcomer = request("b0", "b", [90, 91, 92], new_tokens=5)

    def arrive(step: int) -> None:
        if step == 3:
            batcher.submit(newcomer.seq)

    runner.on_step = arrive
    for made in flood:
        batcher.submit(made.seq)
    batcher.start()
    try:
        for made in [*flood, newcomer]:
            assert made.done.wait(30)
    finally:
        batcher.close(5)
    assert first_step_with(runner, newcomer) == 4
    rows, chunks = runner.steps[3]
    assert rows == 0 and len(chunks) == 1, "b0's prompt, nothing else"
    rows, chunks = runner.steps[4]
    assert rows == 3 and len(chunks) == 1, "then a4 joins while the others decode"
    assert first_step_with(runner, flood[4]) == 5
    for made in [*flood, newcomer]:
        assert made.output == alone(made.seq.prompt_ids, made.seq.max_new_tokens), made.seq.request_id

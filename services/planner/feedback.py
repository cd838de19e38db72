"""Ratings of runs: the 1-5 scale, its checks, the satisfaction metric and the reward the training loop reads."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram

from services.common import FailedPreconditionError, InvalidArgumentError
from services.common.errors import quoted

if TYPE_CHECKING:
    from services.planner.store import JournalStore, RunRecord

# Five stars, as people already rate answers: 1 wrong or useless, 3 partly right, 5 exactly right. An integer scale
# keeps ratings of different people comparable; the reward maps it linearly onto 0.0 .. 1.0.
MIN_SCORE = 1
MAX_SCORE = 5
# A sentence or a paragraph of why; longer is pasted text, and comments are stored with every run and listed.
MAX_FEEDBACK_COMMENT_CHARS = 1000


@dataclass(frozen=True)
class Feedback:
    """One rating of a run: ``score`` from MIN_SCORE to MAX_SCORE, the rater's words, who rated and when."""

    score: int
    comment: str = ""
    rater: str = ""
    rate_time: float = 0.0

    @property
    def reward(self) -> float:
        """The score as a reward: 0.0 for 1, 1.0 for 5, linear between."""
        return (self.score - MIN_SCORE) / (MAX_SCORE - MIN_SCORE)


def validate_feedback(score: int, comment: str, rater: str, *, now: float | None = None) -> Feedback:
    """A Feedback from a caller's values; InvalidArgumentError saying what to change when they are out of bounds."""
    if not MIN_SCORE <= score <= MAX_SCORE:
        raise InvalidArgumentError(
            f"score is {score}; use {MIN_SCORE} (wrong or useless) to {MAX_SCORE} (exactly right)"
        )
    if len(comment) > MAX_FEEDBACK_COMMENT_CHARS:
        raise InvalidArgumentError(
            f"comment has {len(comment)} characters; shorten it to at most {MAX_FEEDBACK_COMMENT_CHARS}"
        )
    return Feedback(score, comment, rater, time.time() if now is None else now)


class FeedbackBook:
    """Rates runs in the journal and counts the ratings in the ``meshpilot_run_satisfaction`` histogram.

    The histogram has no labels: agent names are tenants' data, and a label per agent would let any tenant grow the
    metrics without bound; per-agent satisfaction is a query over the journal (``rated_runs``).
    """

    def __init__(self, store: JournalStore, metrics: CollectorRegistry | None = None) -> None:
        self.store = store
        self.satisfaction = Histogram(
            "meshpilot_run_satisfaction",
            f"Ratings of runs (RateRun), {MIN_SCORE} wrong or useless to {MAX_SCORE} exactly right.",
            buckets=tuple(float(score) for score in range(MIN_SCORE, MAX_SCORE + 1)),
            registry=metrics,
        )

    async def rate(self, run_id: str, feedback: Feedback, *, tenant: str) -> RunRecord:
        """Stores ``feedback`` as the tenant's run's rating (replacing an earlier one) and returns the run.
        NotFoundError for an unknown run or another tenant's; FailedPreconditionError for a run still going."""
        record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
        if not record.state.ended:
            raise FailedPreconditionError(
                f"run {quoted(run_id, 64)} is {record.state.value.lower()}; rate it once it has ended (GetRun shows its state)"
            )
        await self.store.rate_run(run_id, feedback, tenant=tenant)
        self.satisfaction.observe(feedback.score)
        return await self.store.get_run(run_id, tenant=tenant)


@dataclass(frozen=True)
class RatedRun:
    """A rated run's task, answer and reward: what a training loop turns into a weighted example."""

    run_id: str
    agent: str
    agent_version: int
    task: str
    answer: str
    reward: float


async def rated_runs(store: JournalStore, *, tenant: str, agent: str = "", limit: int = 500) -> list[RatedRun]:
    """The tenant's rated runs (of ``agent`` if given), newest first, each with its reward (0.0 .. 1.0)."""
    records: Sequence[RunRecord] = await store.list_runs(agent=agent, limit=limit, tenant=tenant, rated=True)
    return [
        RatedRun(r.run_id, r.agent, r.agent_version, r.task, r.answer, r.feedback.reward)
        for r in records
        if r.feedback is not None
    ]

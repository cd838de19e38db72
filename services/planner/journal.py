"""A run's journal: each transition's events and snapshot stored in one transaction, then published to watchers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from prometheus_client import Histogram

from meshpilot.planner.v1 import planner_pb2
from services.planner.convert import run_event
from services.planner.state import RunSnapshot
from services.planner.store import JournalStore, RunState
from services.planner.types import AgentEvent


class EventBus:
    """Live events by run id for the watchers of this process. A watcher subscribes before it reads the journal and
    skips sequences it has seen, so journal + bus give every event once, with no gap. ``poke`` tells watchers that
    the journal changed without handing them the events (another replica committed them): they read it again."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[planner_pb2.RunEvent | None]]] = {}

    def subscribe(self, run_id: str) -> asyncio.Queue[planner_pb2.RunEvent | None]:
        queue: asyncio.Queue[planner_pb2.RunEvent | None] = asyncio.Queue()
        self._queues.setdefault(run_id, set()).add(queue)
        return queue

    def unsubscribe(self, run_id: str, queue: asyncio.Queue[planner_pb2.RunEvent | None]) -> None:
        queues = self._queues.get(run_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._queues[run_id]

    def publish(self, run_id: str, events: Sequence[planner_pb2.RunEvent]) -> None:
        for queue in self._queues.get(run_id, ()):
            for event in events:
                queue.put_nowait(event)

    def poke(self, run_id: str) -> None:
        for queue in self._queues.get(run_id, ()):
            queue.put_nowait(None)


class RunJournal:
    """Commits the transitions of one run. Callers change ``snapshot`` and commit while holding ``lock``, so the
    stored snapshot always matches the events before it. A commit that was started finishes even if the caller is
    cancelled meanwhile: an event is never journaled without being published, nor half-applied."""

    def __init__(
        self, store: JournalStore, bus: EventBus, snapshot: RunSnapshot, commit_seconds: Histogram | None = None
    ) -> None:
        self.store = store
        self.bus = bus
        self.snapshot = snapshot
        self.lock = asyncio.Lock()
        self._commit_seconds = commit_seconds

    async def commit(
        self, events: Sequence[AgentEvent] = (), state: RunState = RunState.RUNNING, answer: str = ""
    ) -> None:
        """Numbers ``events`` after the last journaled one, stores them with the snapshot and ``state``, publishes them
        (or, with no events, pokes the watchers)."""
        pending = asyncio.ensure_future(self._commit(events, state, answer))
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            await pending
            raise

    async def _commit(self, events: Sequence[AgentEvent], state: RunState, answer: str) -> None:
        snapshot = self.snapshot
        first = snapshot.sequence + 1
        protos = [
            run_event(event, snapshot.run_id, snapshot.session_id, sequence)
            for sequence, event in enumerate(events, start=first)
        ]
        snapshot.sequence += len(protos)
        started = time.perf_counter()
        try:
            await self.store.commit(
                snapshot.run_id,
                [(p.sequence, p.SerializeToString()) for p in protos],
                snapshot=snapshot.to_json(),
                state=state,
                usage=snapshot.usage,
                answer=answer,
            )
        except BaseException:
            snapshot.sequence = first - 1
            raise
        if self._commit_seconds is not None:
            self._commit_seconds.observe(time.perf_counter() - started)
        if protos:
            self.bus.publish(snapshot.run_id, protos)
        else:  # the state alone changed (a park): watchers waiting for it look again
            self.bus.poke(snapshot.run_id)

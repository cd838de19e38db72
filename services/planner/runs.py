"""Runs in flight: each run is an asyncio task keyed by run_id that journals every event before handing it out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from meshpilot.planner.v1 import planner_pb2
from services.planner.agent import AgentLoop
from services.planner.convert import run_event
from services.planner.store import RunRecord, RunState, RunStore
from services.planner.types import AgentEvent, Budget, Failed, Finished, ModelOutput, Turn, Usage

log = logging.getLogger(__name__)


@dataclass
class ActiveRun:
    """A run in flight: its events (already journaled) arrive on ``queue``; None marks the end."""

    record: RunRecord
    queue: asyncio.Queue[planner_pb2.RunEvent | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""
    ended: bool = False

    def cancel(self, reason: str) -> None:
        """Stops the run unless it already has its last event; it ends with an error event CANCELLED and ``reason``."""
        if self.task is not None and not self.ended and not self.cancel_reason:
            self.cancel_reason = reason
            self.task.cancel()

    async def events(self) -> AsyncIterator[planner_pb2.RunEvent]:
        while (event := await self.queue.get()) is not None:
            yield event


class RunManager:
    """Starts, tracks and cancels runs; owns the journal writes so that every event is stored before it is seen."""

    def __init__(self, store: RunStore, agent: AgentLoop, *, history_turns: int) -> None:
        self.store = store
        self.agent = agent
        self.history_turns = history_turns
        self._active: dict[str, ActiveRun] = {}

    async def start(self, session_id: str, task: str, budget: Budget) -> ActiveRun:
        """Starts ``task`` in ``session_id`` (a new session if empty); NotFoundError if the session does not exist."""
        if session_id:
            session = await self.store.get_session(session_id, last_turns=self.history_turns)
        else:
            session = await self.store.create_session()
        record = await self.store.create_run(session.session_id, task)
        active = ActiveRun(record)
        active.task = asyncio.create_task(self._execute(active, session.turns, budget), name=f"run-{record.run_id}")
        self._active[record.run_id] = active
        active.task.add_done_callback(lambda _: self._active.pop(record.run_id, None))
        return active

    async def cancel(self, run_id: str, reason: str = "the run was cancelled by CancelRun") -> RunRecord:
        """Stops the run if it is in flight and waits for it to end; a finished run is returned as it is."""
        active = self._active.get(run_id)
        if active is not None and active.task is not None:
            active.cancel(reason)
            await asyncio.wait([active.task])
        return await self.store.get_run(run_id)

    async def fail_interrupted(self) -> int:
        """Ends runs that a previous planner process left RUNNING with an error event ABORTED; returns how many."""
        interrupted = await self.store.unfinished_runs()
        for run_id, last_sequence in interrupted:
            run = await self.store.get_run(run_id, with_events=False)
            failure = Failed("ABORTED", "the planner stopped during this run; run the task again")
            event = run_event(failure, run_id, run.session_id, last_sequence + 1)
            await self.store.append_event(run_id, event.sequence, event.SerializeToString())
            await self.store.finish_run(run_id, RunState.FAILED, "", run.usage)
        return len(interrupted)

    async def close(self) -> None:
        """Cancels every run in flight and waits for them to journal their end."""
        runs = list(self._active.values())
        for active in runs:
            active.cancel("the planner is shutting down")
        tasks = [active.task for active in runs if active.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _execute(self, active: ActiveRun, history: list[Turn], budget: Budget) -> None:
        record = active.record
        sequence = 0
        usage = Usage()
        state, answer = RunState.FAILED, ""

        async def emit(event: AgentEvent) -> None:
            nonlocal sequence
            sequence += 1
            proto = run_event(event, record.run_id, record.session_id, sequence)
            await self.store.append_event(record.run_id, sequence, proto.SerializeToString())
            active.queue.put_nowait(proto)

        async def emit_whole(event: AgentEvent) -> None:
            # A cancel must not tear an event between journal and stream, nor let CANCELLED overtake it.
            pending = asyncio.ensure_future(emit(event))
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                await pending
                raise

        steps = self.agent.run(record.task, history, budget)
        try:
            async for event in steps:
                if isinstance(event, ModelOutput):
                    usage += event.usage
                elif isinstance(event, Finished):
                    state, answer = RunState.SUCCEEDED, event.answer
                await emit_whole(event)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            state = RunState.CANCELLED
            await emit(Failed("CANCELLED", active.cancel_reason or "the run was cancelled"))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("run %s failed (incident %s)", record.run_id, incident)
            state = RunState.FAILED
            await emit(Failed("INTERNAL", f"internal error in the planner (incident {incident}); see its log"))
        active.ended = True
        await steps.aclose()
        await self.store.finish_run(record.run_id, state, answer, usage)
        active.queue.put_nowait(None)

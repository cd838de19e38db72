"""Runs of this planner: start, resume after a restart, cancel, approve or reject, and watch from any sequence."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from meshpilot.planner.v1 import planner_pb2
from services.common import FailedPreconditionError, InvalidArgumentError, OutOfRangeError
from services.common.config import QuotaConfig
from services.planner.agents import AgentCatalog, AgentDefinition
from services.planner.executor import ExecutorDeps, RunExecutor
from services.planner.feedback import FeedbackBook
from services.planner.journal import EventBus, RunJournal
from services.planner.policies import POLICIES
from services.planner.quotas import ChargedLLM, TenantQuotas, TenantTools
from services.planner.state import AgentRef, RunSnapshot
from services.planner.store import DEFAULT_TENANT, JournalStore, LeaseLostError, RunRecord, RunState, shown
from services.planner.types import Budget, Failed

log = logging.getLogger(__name__)

_TERMINAL = ("final_answer", "error")
# After these events a run may have parked (WAITING_FOR_APPROVAL with nothing more to journal).
_MAY_PARK = ("approval_requested", "approval_decision")
# A watcher reads the journal at least this often while it waits (what bounds a lost cross-replica notification).
JOURNAL_POLL_SECONDS = 5.0


class RunManager:
    """Owns the runs of one planner process. A run is an executor driven by an asyncio task; it goes on when the
    client that started it goes away (WatchRun follows it again), waits without a task while it needs approval, and
    is resumed from its journal when a planner starts (``resume``). ``close`` stops the tasks without journaling
    anything, so the runs continue in the next planner."""

    def __init__(
        self,
        store: JournalStore,
        catalog: AgentCatalog,
        deps: ExecutorDeps,
        *,
        history_turns: int,
        quotas: TenantQuotas | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.deps = deps
        self.history_turns = history_turns
        self.quotas = quotas or TenantQuotas(QuotaConfig())
        self.bus = EventBus()
        # Commits of other replicas (PostgreSQL) wake this process's watchers, which then read the journal.
        store.on_commit(self.bus.poke)
        self._maintenance: asyncio.Task[None] | None = None
        self.commit_seconds = Histogram(
            "meshpilot_journal_commit_seconds",
            "Time to commit one run transition (events and snapshot) to the journal: what every step waits for.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=metrics,
        )
        self._executors: dict[str, RunExecutor] = {}
        self._tasks: dict[str, asyncio.Task[RunState]] = {}
        # Ratings of ended runs (RateRun) and the satisfaction metric they feed.
        self.feedback = FeedbackBook(store, metrics)

    async def start(
        self,
        session_id: str,
        task: str,
        *,
        agent: str = "",
        agent_version: int = 0,
        budget: Budget | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> str:
        """Starts ``task`` with the tenant's agent (the built-in one if empty) in the tenant's ``session_id`` (new if
        empty); its run id. NotFoundError for an unknown agent, version or session. ``budget`` defaults to the
        agent's."""
        chosen = await self.catalog.get(agent, agent_version, tenant=tenant)
        self.quotas.admit_run(tenant, await self.store.count_active_runs(tenant=tenant))
        definition = chosen.definition
        history_turns = self.history_turns if definition.history_turns is None else definition.history_turns
        if session_id:
            session = await self.store.get_session(session_id, last_turns=history_turns, tenant=tenant)
        else:
            session = await self.store.create_session(tenant=tenant)
        snapshot = RunSnapshot(
            run_id=uuid.uuid4().hex,
            session_id=session.session_id,
            task=task,
            agent=AgentRef(chosen.name, chosen.version, definition.to_dict()),
            budget=budget or self.budget_of(definition),
            history=session.turns[-history_turns:] if history_turns else [],
        )
        # The run and its first snapshot in one transaction: a planner that dies right after still resumes it.
        await self.store.create_run(
            session.session_id, task, agent=chosen.name, agent_version=chosen.version, run_id=snapshot.run_id,
            snapshot=snapshot.to_json(), tenant=tenant,
        )  # fmt: skip
        self._drive(self._executor(snapshot, tenant))
        return snapshot.run_id

    def budget_of(self, definition: AgentDefinition) -> Budget:
        return definition.budget(self.catalog.defaults)

    def _executor(self, snapshot: RunSnapshot, tenant: str) -> RunExecutor:
        definition = AgentDefinition.from_dict(snapshot.agent.spec)
        policy = POLICIES[definition.policy](definition.policy_options)
        # The run's model calls are charged to its tenant, and its tool calls see the tenant's tools.
        deps = dataclasses.replace(
            self.deps, llm=ChargedLLM(self.deps.llm, tenant, self.quotas), tools=TenantTools(self.deps.tools, tenant)
        )
        journal = RunJournal(self.store, self.bus, snapshot, self.commit_seconds)
        executor = RunExecutor(journal, definition, policy, deps, tenant=tenant)
        self._executors[snapshot.run_id] = executor
        return executor

    def _loaded(self, record: RunRecord) -> RunExecutor:
        executor = self._executors.get(record.run_id)
        if executor is None:
            if record.snapshot is None:
                raise FailedPreconditionError(f"run {record.run_id} was made by an older planner and cannot continue")
            executor = self._executor(RunSnapshot.from_json(record.snapshot), record.tenant)
        return executor

    def _drive(self, executor: RunExecutor) -> None:
        run_id = executor.snapshot.run_id
        task = asyncio.create_task(executor.drive(), name=f"run-{run_id}")
        self._tasks[run_id] = task
        self._executors[run_id] = executor

        def done(finished: asyncio.Task[RunState]) -> None:
            if self._tasks.get(run_id) is finished:
                del self._tasks[run_id]
                # A parked run keeps its executor: a decision then works on the state in memory, never on a copy
                # read from the store while the task was still committing.
                parked = not finished.cancelled() and finished.exception() is None
                if not (parked and finished.result() is RunState.WAITING_FOR_APPROVAL):
                    self._executors.pop(run_id, None)
                elif not executor.waits_for_approval():
                    # A decision came after the park was journaled but before this task ended: decide() saw the
                    # run still driven and left it to this task, which no longer looks. Drive it on.
                    self._drive(executor)
                    return
            if not finished.cancelled() and (error := finished.exception()) is not None:
                if isinstance(error, LeaseLostError):
                    self._executors.pop(run_id, None)
                    log.warning("run %s is driven by another replica now; this one stopped driving it", run_id)
                else:
                    log.error("run %s stopped on an unexpected error", run_id, exc_info=error)

        task.add_done_callback(done)

    def _driving(self, run_id: str) -> bool:
        task = self._tasks.get(run_id)
        return task is not None and not task.done()

    async def resume(self) -> int:
        """Continues every run a previous planner left RUNNING from its last journaled state; returns how many.

        Runs journaled by a planner without snapshots end with ABORTED (they cannot be continued)."""
        records = await self.store.claim_runs()
        for record in records:
            if record.run_id in self._executors:
                continue
            if record.snapshot is None:
                await self._abort_legacy(record)
                continue
            self._drive(self._loaded(record))
        return len(records)

    async def _abort_legacy(self, record: RunRecord) -> None:
        snapshot = RunSnapshot(
            record.run_id, record.session_id, record.task, AgentRef(record.agent, record.agent_version, {}),
            Budget(0, 0, 0), sequence=record.last_sequence,
        )  # fmt: skip
        await RunJournal(self.store, self.bus, snapshot).commit(
            [Failed("ABORTED", "the planner stopped during this run; run the task again")], RunState.FAILED
        )

    async def cancel(
        self, run_id: str, reason: str = "the run was cancelled by CancelRun", *, tenant: str = DEFAULT_TENANT
    ) -> RunRecord:
        """Ends a run of the tenant that has not ended with CANCELLED and waits until that is journaled; an ended run
        is returned as it is. NotFoundError for an unknown run."""
        record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
        if not record.state.ended:
            task = self._tasks.get(run_id)
            if task is not None and not task.done():
                self._executors[run_id].cancel_reason = reason
                task.cancel()
                await asyncio.wait([task])
            else:
                await self._loaded(record).cancel_parked(reason)
                self._executors.pop(run_id, None)
        return await self.store.get_run(run_id, tenant=tenant)

    async def decide(
        self,
        run_id: str,
        call_id: str,
        *,
        approved: bool,
        arguments: dict[str, Any] | None = None,
        comment: str = "",
        tenant: str = DEFAULT_TENANT,
    ) -> RunRecord:
        """Approves or rejects a call of the tenant's run that waits for approval and drives the run on. NotFoundError
        for an unknown run or call, FailedPreconditionError for a run that ended or a call that is not waiting."""
        record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
        if record.state.ended:
            raise FailedPreconditionError(f"run {run_id} has ended ({record.state.value}); nothing waits for approval")
        executor = self._loaded(record)
        await executor.decide(call_id, approved, arguments, comment)
        if not self._driving(run_id):
            self._drive(executor)
        return await self.store.get_run(run_id, tenant=tenant)

    async def watch(
        self, run_id: str, after_sequence: int = 0, *, tenant: str = DEFAULT_TENANT, until_parked: bool = False
    ) -> AsyncIterator[planner_pb2.RunEvent]:
        """The tenant's run's events after ``after_sequence`` from the journal, then live ones, each once, until its
        last event, or (``until_parked``) until it waits for approval with every event given. NotFoundError for an
        unknown run; OutOfRangeError for a sequence beyond the run's last event.

        A run parks in a commit of its own, without events, after the one that journaled approval_requested (the
        step's other calls run first), so the state is looked at after each event that may park the run, and again
        when the park's commit pokes the watchers or an idle poll comes round."""
        if after_sequence < 0:
            raise InvalidArgumentError(f"after_sequence is {after_sequence}; use 0 or the last sequence you received")
        # Subscribe before reading the journal: an event committed after the read arrives on the queue.
        queue = self.bus.subscribe(run_id)
        try:
            record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
            if after_sequence > record.last_sequence:
                raise OutOfRangeError(
                    f"after_sequence {after_sequence} is beyond run {shown(run_id)}'s last event "
                    f"({record.last_sequence}); use a sequence you received"
                )
            last = after_sequence
            for sequence, data in await self.store.events_after(run_id, after_sequence):
                event = planner_pb2.RunEvent.FromString(data)
                yield event
                last = sequence
                if event.WhichOneof("event") in _TERMINAL:
                    return
                if until_parked and event.WhichOneof("event") in _MAY_PARK and await self._parked(run_id, last, tenant):
                    return
            if record.state.ended:
                return
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), JOURNAL_POLL_SECONDS)
                except TimeoutError:
                    item = None  # a missed notification cannot stall a watcher for longer than this
                # None: the journal changed elsewhere (another replica drives the run); read what is new.
                fresh = (
                    [planner_pb2.RunEvent.FromString(data) for _, data in await self.store.events_after(run_id, last)]
                    if item is None
                    else [item]
                )
                for event in fresh:
                    if event.sequence <= last:
                        continue
                    yield event
                    last = event.sequence
                    if event.WhichOneof("event") in _TERMINAL:
                        return
                    if (
                        until_parked
                        and event.WhichOneof("event") in _MAY_PARK
                        and await self._parked(run_id, last, tenant)
                    ):
                        return
                if until_parked and item is None and await self._parked(run_id, last, tenant):
                    return
        finally:
            self.bus.unsubscribe(run_id, queue)

    async def _parked(self, run_id: str, last: int, tenant: str) -> bool:
        """Whether the run waits for approval and ``last`` is its last event."""
        record = await self.store.get_run(run_id, with_events=False, tenant=tenant)
        return record.state is RunState.WAITING_FOR_APPROVAL and record.last_sequence == last

    def maintain(self, interval: float) -> None:
        """Every ``interval`` seconds: renews the leases of the runs this replica drives (stopping, without a word in
        the journal, those another replica took over) and takes over RUNNING runs whose lease expired (their replica
        died). For a store shared by replicas; ``close`` stops it."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self._maintain_once()
                except Exception:
                    log.exception("lease upkeep failed; retrying in %gs", interval)

        if self._maintenance is None:
            self._maintenance = asyncio.create_task(loop(), name="planner-leases")

    async def _maintain_once(self) -> None:
        driving = [run_id for run_id, task in self._tasks.items() if not task.done()]
        held = await self.store.renew_leases(driving)
        for run_id in driving:
            if run_id not in held and (task := self._tasks.get(run_id)) is not None:
                log.warning("run %s was taken over by another replica; this one stops driving it", run_id)
                task.cancel()  # no cancel_reason: nothing is journaled
                await asyncio.wait([task])
                self._executors.pop(run_id, None)
        if taken := await self.resume():
            log.warning("took over %d runs whose replica stopped renewing their leases", taken)

    async def close(self) -> None:
        """Stops driving every run without journaling anything: the next planner resumes them where they are."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
            self._maintenance = None
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._executors.clear()

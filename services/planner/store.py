"""The durable journal of the planner: sessions, agents, runs with their latest snapshot, and every event, in SQLite."""

from __future__ import annotations

import enum
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.common import AlreadyExistsError, NotFoundError
from services.common.errors import quoted
from services.common.sqlite import SqliteThread, migrate
from services.planner.feedback import Feedback
from services.planner.types import Turn, Usage

T = TypeVar("T")

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version); a database made by an older planner is
# brought up to date on open, an empty one runs them all.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY,
        create_time REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(session_id),
        task TEXT NOT NULL,
        state TEXT NOT NULL,
        answer TEXT NOT NULL DEFAULT '',
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        total_tokens INTEGER NOT NULL DEFAULT 0,
        cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
        create_time REAL NOT NULL,
        end_time REAL
    );
    CREATE INDEX IF NOT EXISTS runs_by_session ON runs(session_id, create_time);
    CREATE TABLE IF NOT EXISTS events (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        sequence INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, sequence)
    );
    """,
    """
    ALTER TABLE runs ADD COLUMN agent TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE runs ADD COLUMN agent_version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE runs ADD COLUMN last_sequence INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN snapshot TEXT;
    CREATE INDEX runs_by_state ON runs(state, create_time);
    CREATE TABLE agents (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        create_time REAL NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, version)
    );
    """,
    # Runs journaled before last_sequence existed: without their last event's number, the next event (resume's
    # ABORTED) would reuse sequence 1 and fail, and WatchRun would refuse every sequence they have.
    """
    UPDATE runs SET last_sequence = (SELECT COALESCE(MAX(sequence), 0) FROM events WHERE events.run_id = runs.run_id);
    """,
    # Tenants: everything made before them belongs to the default tenant (a mesh without authentication).
    """
    ALTER TABLE sessions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE runs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX runs_by_tenant ON runs(tenant, create_time);
    CREATE TABLE agents_by_tenant (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        create_time REAL NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, name, version)
    );
    INSERT INTO agents_by_tenant SELECT 'default', name, version, spec, create_time, deleted FROM agents;
    DROP TABLE agents;
    ALTER TABLE agents_by_tenant RENAME TO agents;
    """,
    # Feedback: a run's latest rating (RateRun), NULL while nobody rated it.
    """
    ALTER TABLE runs ADD COLUMN feedback_score INTEGER;
    ALTER TABLE runs ADD COLUMN feedback_comment TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN feedback_rater TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN feedback_time REAL;
    """,
)
# The tenant of records made without one (a mesh without authentication, and everything older than tenants).
DEFAULT_TENANT = "default"
# Ids are echoed in error messages; one longer than this is cut so an error never carries megabytes of input.
_MAX_ID_CHARS = 64


class LeaseLostError(Exception):
    """Another planner replica took the run over (this one's lease expired): this replica stops driving it and
    nothing of the commit was stored."""


class JournalConflictError(Exception):
    """A commit repeated a sequence already journaled for its run (two writers of one run: a bug or a lost lease);
    nothing of the commit was stored."""


def shown(value: str) -> str:
    """``value`` quoted for an error message, cut to a readable length."""
    return quoted(value, _MAX_ID_CHARS)


class RunState(enum.Enum):
    RUNNING = "RUNNING"
    WAITING_FOR_APPROVAL = "WAITING_FOR_APPROVAL"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


@dataclass(frozen=True)
class SessionRecord:
    """A session and its finished turns (succeeded runs), oldest first."""

    session_id: str
    create_time: float
    turns: list[Turn] = field(default_factory=list)
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class RunRecord:
    """A run as stored; ``events`` holds the serialized events in sequence order when asked for."""

    run_id: str
    session_id: str
    task: str
    state: RunState
    answer: str
    usage: Usage
    create_time: float
    end_time: float | None
    agent: str = "default"
    agent_version: int = 1
    last_sequence: int = 0
    snapshot: str | None = None
    events: list[bytes] = field(default_factory=list)
    tenant: str = DEFAULT_TENANT
    feedback: Feedback | None = None


@dataclass(frozen=True)
class AgentRecord:
    """One stored version of an agent; ``spec`` is its definition as JSON."""

    name: str
    version: int
    spec: dict[str, Any]
    create_time: float


_RUN_COLUMNS = (
    "run_id, session_id, task, state, answer, prompt_tokens, completion_tokens, total_tokens, cached_prompt_tokens, "
    "create_time, end_time, agent, agent_version, last_sequence, snapshot, tenant, feedback_score, feedback_comment, "
    "feedback_rater, feedback_time"
)


def feedback_of(row: Sequence[Any]) -> Feedback | None:
    """The rating in a row of ``_RUN_COLUMNS`` (both stores select the same columns), None when unrated."""
    return None if row[16] is None else Feedback(int(row[16]), row[17], row[18], float(row[19]))


def _run(row: Sequence[Any], events: list[bytes]) -> RunRecord:
    return RunRecord(
        row[0], row[1], row[2], RunState(row[3]), row[4], Usage(*row[5:9]), row[9], row[10], row[11], row[12],
        row[13], row[14], events, row[15], feedback_of(row),
    )  # fmt: skip


class JournalStore(Protocol):
    """What the planner needs of its journal: RunStore (SQLite, embedded) and PostgresRunStore (shared by replicas)
    both provide it, with the same records, errors and atomicity. ``open`` before use, ``close`` after."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def create_session(self, *, tenant: str = ...) -> SessionRecord: ...
    async def get_session(
        self, session_id: str, *, last_turns: int | None = ..., tenant: str = ...
    ) -> SessionRecord: ...
    async def create_run(
        self,
        session_id: str,
        task: str,
        *,
        agent: str = ...,
        agent_version: int = ...,
        run_id: str = ...,
        snapshot: str | None = ...,
        tenant: str = ...,
    ) -> RunRecord: ...
    async def commit(
        self,
        run_id: str,
        events: Sequence[tuple[int, bytes]],
        *,
        snapshot: str,
        state: RunState,
        usage: Usage,
        answer: str = ...,
    ) -> None: ...
    async def get_run(self, run_id: str, *, with_events: bool = ..., tenant: str | None = ...) -> RunRecord: ...
    async def events_after(self, run_id: str, after_sequence: int) -> list[tuple[int, bytes]]: ...
    async def list_runs(
        self,
        *,
        state: RunState | None = ...,
        agent: str = ...,
        session_id: str = ...,
        limit: int = ...,
        tenant: str = ...,
        rated: bool = ...,
    ) -> list[RunRecord]: ...
    async def rate_run(self, run_id: str, feedback: Feedback, *, tenant: str) -> None: ...
    async def count_active_runs(self, *, tenant: str) -> int: ...
    async def usage_since(self, since: float, *, tenant: str) -> tuple[int, Usage]: ...
    async def runs_in_state(self, state: RunState) -> list[RunRecord]: ...
    async def add_agent_version(
        self, name: str, spec: dict[str, Any], *, new: bool, tenant: str = ...
    ) -> AgentRecord: ...
    async def get_agent(self, name: str, version: int = ..., *, tenant: str = ...) -> AgentRecord: ...
    async def list_agents(self, *, tenant: str = ...) -> list[AgentRecord]: ...
    async def delete_agent(self, name: str, *, tenant: str = ...) -> None: ...
    def on_commit(self, callback: Callable[[str], None]) -> None: ...
    async def claim_runs(self) -> list[RunRecord]: ...
    async def renew_leases(self, run_ids: Sequence[str]) -> set[str]: ...


class RunStore:
    """Sessions, agents, runs and their event journal in one SQLite file (WAL), created with its parent directory.

    Every method is a coroutine that runs its SQL on one dedicated thread, so the event loop never blocks on disk and
    the connection is only used by the thread that opened it. Each method is one transaction. Unknown ids raise
    NotFoundError, and so do ids of another tenant's records: a caller cannot even learn that they exist.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = SqliteThread(path, lambda conn: migrate(conn, MIGRATIONS), name="planner-store")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._db.call(fn)

    async def open(self) -> None:
        """Nothing to do: the file is opened (and migrated) on first use."""

    async def close(self) -> None:
        """Closes the connection; the store must not be used afterwards."""
        await self._db.close()

    # Sessions

    async def create_session(self, *, tenant: str = DEFAULT_TENANT) -> SessionRecord:
        session = SessionRecord(session_id=uuid.uuid4().hex, create_time=time.time(), tenant=tenant)
        await self._call(
            lambda c: c.execute(
                "INSERT INTO sessions (session_id, create_time, tenant) VALUES (?, ?, ?)",
                (session.session_id, session.create_time, tenant),
            )
        )
        return session

    async def get_session(
        self, session_id: str, *, last_turns: int | None = None, tenant: str = DEFAULT_TENANT
    ) -> SessionRecord:
        """The session with its succeeded runs as turns, oldest first (only the last ``last_turns`` if given)."""

        def get(c: sqlite3.Connection) -> SessionRecord:
            row = c.execute(
                "SELECT create_time FROM sessions WHERE session_id = ? AND tenant = ?", (session_id, tenant)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"session {shown(session_id)} does not exist; create one or leave session_id empty")
            rows = c.execute(
                "SELECT run_id, task, answer FROM runs WHERE session_id = ? AND state = ? "
                "ORDER BY create_time DESC, rowid DESC LIMIT ?",
                (session_id, RunState.SUCCEEDED.value, -1 if last_turns is None else last_turns),
            ).fetchall()
            turns = [Turn(task=task, answer=answer, run_id=run_id) for run_id, task, answer in reversed(rows)]
            return SessionRecord(session_id, row[0], turns, tenant)

        return await self._call(get)

    # Runs

    async def create_run(
        self,
        session_id: str,
        task: str,
        *,
        agent: str = "default",
        agent_version: int = 1,
        run_id: str = "",
        snapshot: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> RunRecord:
        """A new RUNNING run without events, with its first snapshot if given (else with its first ``commit``)."""
        run = RunRecord(
            run_id or uuid.uuid4().hex, session_id, task, RunState.RUNNING, "", Usage(), time.time(), None, agent,
            agent_version, snapshot=snapshot, tenant=tenant,
        )  # fmt: skip
        await self._call(
            lambda c: c.execute(
                "INSERT INTO runs (run_id, session_id, task, state, create_time, agent, agent_version, snapshot, "
                "tenant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    session_id,
                    task,
                    run.state.value,
                    run.create_time,
                    agent,
                    agent_version,
                    snapshot,
                    tenant,
                ),
            )
        )
        return run

    async def commit(
        self,
        run_id: str,
        events: Sequence[tuple[int, bytes]],
        *,
        snapshot: str,
        state: RunState,
        usage: Usage,
        answer: str = "",
    ) -> None:
        """One transition, atomically: the new events (sequence, serialized), the run's snapshot and its state.

        A sequence already journaled raises JournalConflictError and nothing of the transition is stored.
        """

        def commit(c: sqlite3.Connection) -> None:
            try:
                c.executemany("INSERT INTO events VALUES (?, ?, ?)", [(run_id, seq, data) for seq, data in events])
            except sqlite3.IntegrityError as e:
                raise JournalConflictError(f"run {shown(run_id)}: a sequence of this commit is journaled") from e
            last = max((seq for seq, _ in events), default=None)
            cursor = c.execute(
                "UPDATE runs SET state = ?, answer = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?, "
                "cached_prompt_tokens = ?, end_time = ?, snapshot = ?, last_sequence = MAX(last_sequence, ?) "
                "WHERE run_id = ?",
                (
                    state.value, answer, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                    usage.cached_prompt_tokens, time.time() if state.ended else None, snapshot, last or 0, run_id,
                ),
            )  # fmt: skip
            if cursor.rowcount == 0:
                raise NotFoundError(f"run {shown(run_id)} does not exist")

        await self._call(commit)

    async def get_run(self, run_id: str, *, with_events: bool = True, tenant: str | None = DEFAULT_TENANT) -> RunRecord:
        """The run, of ``tenant`` (None: of any tenant, for the planner's own bookkeeping)."""

        def get(c: sqlite3.Connection) -> RunRecord:
            row = c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None and tenant is not None and row[15] != tenant:
                row = None
            if row is None:
                raise NotFoundError(f"run {shown(run_id)} does not exist; use the run_id from a Run event")
            events = []
            if with_events:
                query = "SELECT data FROM events WHERE run_id = ? ORDER BY sequence"
                events = [data for (data,) in c.execute(query, (run_id,))]
            return _run(row, events)

        return await self._call(get)

    async def events_after(self, run_id: str, after_sequence: int) -> list[tuple[int, bytes]]:
        """The run's journaled events with a sequence above ``after_sequence``, in order."""
        return await self._call(
            lambda c: c.execute(
                "SELECT sequence, data FROM events WHERE run_id = ? AND sequence > ? ORDER BY sequence",
                (run_id, after_sequence),
            ).fetchall()
        )

    async def list_runs(
        self,
        *,
        state: RunState | None = None,
        agent: str = "",
        session_id: str = "",
        limit: int = 50,
        tenant: str = DEFAULT_TENANT,
        rated: bool = False,
    ) -> list[RunRecord]:
        """The tenant's runs newest first, filtered by whichever of state, agent and session are given (and to rated
        runs if ``rated``); no events."""
        where, params = ["tenant = ?"], [tenant]
        for column, value in (("state", state.value if state else ""), ("agent", agent), ("session_id", session_id)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if rated:
            where.append("feedback_score IS NOT NULL")
        query = (
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} ORDER BY create_time DESC, rowid DESC LIMIT ?"
        )
        return await self._call(lambda c: [_run(row, []) for row in c.execute(query, (*params, limit))])

    async def rate_run(self, run_id: str, feedback: Feedback, *, tenant: str) -> None:
        """Stores ``feedback`` as the tenant's run's rating, replacing an earlier one; NotFoundError otherwise."""
        query = (
            "UPDATE runs SET feedback_score = ?, feedback_comment = ?, feedback_rater = ?, feedback_time = ? "
            "WHERE run_id = ? AND tenant = ?"
        )
        params = (feedback.score, feedback.comment, feedback.rater, feedback.rate_time, run_id, tenant)

        def rate(c: sqlite3.Connection) -> None:
            if c.execute(query, params).rowcount == 0:
                raise NotFoundError(f"run {shown(run_id)} does not exist; use the run_id from a Run event")

        await self._call(rate)

    async def count_active_runs(self, *, tenant: str) -> int:
        """The tenant's runs that have not ended (running or waiting for approval)."""
        query = "SELECT COUNT(*) FROM runs WHERE tenant = ? AND state IN (?, ?)"
        params = (tenant, RunState.RUNNING.value, RunState.WAITING_FOR_APPROVAL.value)
        return await self._call(lambda c: int(c.execute(query, params).fetchone()[0]))

    async def usage_since(self, since: float, *, tenant: str) -> tuple[int, Usage]:
        """How many runs the tenant started since ``since`` (epoch seconds), and their tokens."""
        query = (
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cached_prompt_tokens), 0) FROM runs "
            "WHERE tenant = ? AND create_time >= ?"
        )
        row = await self._call(lambda c: c.execute(query, (tenant, since)).fetchone())
        return int(row[0]), Usage(*map(int, row[1:]))

    def on_commit(self, callback: Callable[[str], None]) -> None:
        """Nothing to hear: one planner process owns an SQLite journal, and its EventBus sees every commit."""

    async def claim_runs(self) -> list[RunRecord]:
        """Every RUNNING run (one process owns an SQLite journal: no leases, nothing to take over)."""
        return await self.runs_in_state(RunState.RUNNING)

    async def renew_leases(self, run_ids: Sequence[str]) -> set[str]:
        return set(run_ids)

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        """Every run in ``state`` with its snapshot, oldest first (what a starting planner resumes)."""
        query = f"SELECT {_RUN_COLUMNS} FROM runs WHERE state = ? ORDER BY create_time"
        return await self._call(lambda c: [_run(row, []) for row in c.execute(query, (state.value,))])

    # Agents

    async def add_agent_version(
        self, name: str, spec: dict[str, Any], *, new: bool, tenant: str = DEFAULT_TENANT
    ) -> AgentRecord:
        """Stores ``spec`` as the next version of ``name``: version 1 if ``new`` (ALREADY_EXISTS if the name is taken),
        else the latest + 1 (NOT_FOUND if there is no such agent)."""

        def add(c: sqlite3.Connection) -> AgentRecord:
            row = c.execute(
                "SELECT version, deleted FROM agents WHERE tenant = ? AND name = ? ORDER BY version DESC LIMIT 1",
                (tenant, name),
            ).fetchone()
            latest, live = (row[0], not row[1]) if row else (None, False)
            if new and live:
                raise AlreadyExistsError(f"agent {shown(name)} exists; update it to make a new version")
            if not new and not live:
                raise NotFoundError(f"agent {shown(name)} does not exist; create it first")
            version = (latest or 0) + 1
            record = AgentRecord(name, version, spec, time.time())
            c.execute(
                "INSERT INTO agents (tenant, name, version, spec, create_time) VALUES (?, ?, ?, ?, ?)",
                (tenant, name, version, json.dumps(spec, ensure_ascii=False), record.create_time),
            )
            return record

        return await self._call(add)

    async def get_agent(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> AgentRecord:
        """The given version (0: the latest) of a live agent of the tenant; NotFoundError otherwise."""

        def get(c: sqlite3.Connection) -> AgentRecord:
            query = "SELECT name, version, spec, create_time FROM agents WHERE tenant = ? AND name = ? AND deleted = 0"
            row = (
                c.execute(query + " AND version = ?", (tenant, name, version)).fetchone()
                if version
                else c.execute(query + " ORDER BY version DESC LIMIT 1", (tenant, name)).fetchone()
            )
            if row is None:
                which = f"version {version} of agent {shown(name)}" if version else f"agent {shown(name)}"
                raise NotFoundError(f"{which} does not exist; ListAgents shows the agents and their latest versions")
            return AgentRecord(row[0], row[1], json.loads(row[2]), row[3])

        return await self._call(get)

    async def list_agents(self, *, tenant: str = DEFAULT_TENANT) -> list[AgentRecord]:
        """The latest version of every live agent of the tenant, by name."""
        query = (
            "SELECT a.name, a.version, a.spec, a.create_time FROM agents a JOIN (SELECT name, MAX(version) AS v "
            "FROM agents WHERE tenant = ? AND deleted = 0 GROUP BY name) l ON a.name = l.name AND a.version = l.v "
            "WHERE a.tenant = ? ORDER BY a.name"
        )
        return await self._call(
            lambda c: [
                AgentRecord(n, v, json.loads(s), t) for n, v, s, t in c.execute(query, (tenant, tenant)).fetchall()
            ]
        )

    async def delete_agent(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Marks every version deleted (runs keep naming the version they ran); NotFoundError if there is none."""

        def delete(c: sqlite3.Connection) -> None:
            query = "UPDATE agents SET deleted = 1 WHERE tenant = ? AND name = ? AND deleted = 0"
            if c.execute(query, (tenant, name)).rowcount == 0:
                raise NotFoundError(f"agent {shown(name)} does not exist")

        await self._call(delete)

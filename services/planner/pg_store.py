"""The planner's journal on PostgreSQL: the same records and guarantees as the SQLite RunStore, shared by any number of
planner replicas (psycopg 3, an async connection pool). Chosen by ``planner.database_url``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common import AlreadyExistsError, ConfigError, NotFoundError
from services.planner.feedback import Feedback
from services.planner.store import (
    DEFAULT_TENANT,
    AgentRecord,
    JournalConflictError,
    LeaseLostError,
    RunRecord,
    RunState,
    SessionRecord,
    feedback_of,
    shown,
)
from services.planner.types import Turn, Usage

T = TypeVar("T")
log = logging.getLogger(__name__)

# Each entry moves the schema from version i to i + 1 (the row in meshpilot_schema); replicas starting together take
# an advisory lock, so exactly one of them runs a migration.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        create_time DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE runs (
        ordinal BIGSERIAL UNIQUE,
        run_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL REFERENCES sessions(session_id),
        task TEXT NOT NULL,
        state TEXT NOT NULL,
        answer TEXT NOT NULL DEFAULT '',
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        total_tokens BIGINT NOT NULL DEFAULT 0,
        cached_prompt_tokens BIGINT NOT NULL DEFAULT 0,
        create_time DOUBLE PRECISION NOT NULL,
        end_time DOUBLE PRECISION,
        agent TEXT NOT NULL DEFAULT 'default',
        agent_version INTEGER NOT NULL DEFAULT 1,
        last_sequence INTEGER NOT NULL DEFAULT 0,
        snapshot TEXT
    );
    CREATE INDEX runs_by_session ON runs(session_id, create_time);
    CREATE INDEX runs_by_state ON runs(state, create_time);
    CREATE INDEX runs_by_tenant ON runs(tenant, create_time);
    CREATE TABLE events (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        sequence INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (run_id, sequence)
    );
    CREATE TABLE agents (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        create_time DOUBLE PRECISION NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (tenant, name, version)
    );
    """,
    # Leases: the replica driving a run owns it until lease_until; another takes it over once that has passed.
    """
    ALTER TABLE runs ADD COLUMN owner TEXT;
    ALTER TABLE runs ADD COLUMN lease_until DOUBLE PRECISION;
    CREATE INDEX runs_by_lease ON runs(state, lease_until);
    """,
    # Feedback: a run's latest rating (RateRun), NULL while nobody rated it.
    """
    ALTER TABLE runs ADD COLUMN feedback_score INTEGER;
    ALTER TABLE runs ADD COLUMN feedback_comment TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN feedback_rater TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN feedback_time DOUBLE PRECISION;
    """,
)
# Commits are announced on this channel (payload: the run id), so watchers on every replica read them.
NOTIFY_CHANNEL = "meshpilot_runs"
_LISTEN_RETRY_SECONDS = 1.0
_MIGRATION_LOCK = 0x6D657368  # "mesh": pg_advisory_xact_lock key of the schema migrations
_RUN_COLUMNS = (
    "run_id, session_id, task, state, answer, prompt_tokens, completion_tokens, total_tokens, cached_prompt_tokens, "
    "create_time, end_time, agent, agent_version, last_sequence, snapshot, tenant, feedback_score, feedback_comment, "
    "feedback_rater, feedback_time"
)


def _run(row: Sequence[Any], events: list[bytes]) -> RunRecord:
    return RunRecord(
        row[0], row[1], row[2], RunState(row[3]), row[4], Usage(*map(int, row[5:9])), row[9], row[10], row[11],
        row[12], row[13], row[14], events, row[15], feedback_of(row),
    )  # fmt: skip


class PostgresRunStore:
    """Sessions, agents, runs and their event journal in PostgreSQL; the interface and the errors of RunStore.

    ``open`` (awaited before use) connects the pool and brings the schema up to date; a DSN that does not connect
    raises ConfigError naming ``planner.database_url``. Every method is one transaction.

    Replicas: a RUNNING run is owned by the replica (``owner``) that drives it, until ``lease_until``. Creating a
    run and every commit take or renew the lease; a commit to a run whose live lease is another's raises
    LeaseLostError and stores nothing. ``claim_runs`` takes the RUNNING runs whose lease has expired (a replica died)
    and ``renew_leases`` keeps this replica's. A run waiting for approval is nobody's: the replica that records
    the decision takes it. Each commit is announced with NOTIFY; ``on_commit`` callbacks hear every replica's.
    """

    def __init__(
        self, dsn: str, *, owner: str = "", lease_seconds: float = 15.0, min_size: int = 1, max_size: int = 8
    ) -> None:
        self.dsn = dsn
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self._pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False)
        self._callbacks: list[Callable[[str], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._opened = False

    async def open(self, timeout: float = 10.0) -> None:
        try:
            # One plain connection first: its error says why (the pool's says only that it timed out).
            probe = await AsyncConnection.connect(self.dsn, connect_timeout=max(1, round(timeout)))
            await probe.close()
            await self._pool.open(wait=True, timeout=timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            await self._pool.close()
            raise ConfigError(f"planner.database_url: cannot connect to PostgreSQL ({_reason(e)})") from e
        await self._migrate()
        self._opened = True
        self._listen_if_heard()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._pool.close()

    def on_commit(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback(run_id)`` for every commit of any replica (this one's included), from a LISTEN
        connection that reconnects after a failure (watchers poll the journal meanwhile)."""
        self._callbacks.append(callback)
        self._listen_if_heard()

    def _listen_if_heard(self) -> None:
        if self._opened and self._callbacks and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="planner-journal-listen")

    async def _listen(self) -> None:
        while True:
            try:
                async with await AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    async for notification in conn.notifies():
                        for callback in self._callbacks:
                            callback(notification.payload)
            except psycopg.Error as e:
                log.warning("journal notifications interrupted (%s); listening again", _reason(e))
            await asyncio.sleep(_LISTEN_RETRY_SECONDS)

    async def _call(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._pool.connection() as conn, conn.transaction():
            return await fn(conn)

    async def _migrate(self) -> None:
        async def migrate(conn: AsyncConnection[Any]) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS meshpilot_schema (version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT version FROM meshpilot_schema")).fetchone()
            version = row[0] if row else 0
            if row is None:
                await conn.execute("INSERT INTO meshpilot_schema VALUES (0)")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)  # type: ignore[arg-type]  # our own DDL, no parameters
                await conn.execute("UPDATE meshpilot_schema SET version = %s", (number,))

        await self._call(migrate)

    async def schema_version(self) -> int:
        row = await self._call(lambda c: _fetchone(c, "SELECT version FROM meshpilot_schema"))
        return int(row[0]) if row else 0

    # Sessions

    async def create_session(self, *, tenant: str = DEFAULT_TENANT) -> SessionRecord:
        session = SessionRecord(session_id=uuid.uuid4().hex, create_time=time.time(), tenant=tenant)
        await self._call(
            lambda c: c.execute(
                "INSERT INTO sessions (session_id, tenant, create_time) VALUES (%s, %s, %s)",
                (session.session_id, tenant, session.create_time),
            )
        )
        return session

    async def get_session(
        self, session_id: str, *, last_turns: int | None = None, tenant: str = DEFAULT_TENANT
    ) -> SessionRecord:
        async def get(c: AsyncConnection[Any]) -> SessionRecord:
            row = await _fetchone(
                c, "SELECT create_time FROM sessions WHERE session_id = %s AND tenant = %s", (session_id, tenant)
            )
            if row is None:
                raise NotFoundError(f"session {shown(session_id)} does not exist; create one or leave session_id empty")
            cursor = await c.execute(
                "SELECT run_id, task, answer FROM runs WHERE session_id = %s AND state = %s "
                "ORDER BY create_time DESC, ordinal DESC LIMIT %s",
                (session_id, RunState.SUCCEEDED.value, last_turns),
            )
            rows = await cursor.fetchall()
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
        run = RunRecord(
            run_id or uuid.uuid4().hex, session_id, task, RunState.RUNNING, "", Usage(), time.time(), None, agent,
            agent_version, snapshot=snapshot, tenant=tenant,
        )  # fmt: skip
        await self._call(
            lambda c: c.execute(
                "INSERT INTO runs (run_id, session_id, task, state, create_time, agent, agent_version, snapshot, "
                "tenant, owner, lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
                    self.owner,
                    run.create_time + self.lease_seconds,
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
        """One transition, atomically; a sequence already journaled raises JournalConflictError, storing nothing."""

        async def commit(c: AsyncConnection[Any]) -> None:
            async with c.cursor() as cursor:
                try:
                    await cursor.executemany(
                        "INSERT INTO events VALUES (%s, %s, %s)", [(run_id, seq, data) for seq, data in events]
                    )
                except psycopg.errors.UniqueViolation as e:
                    raise JournalConflictError(f"run {shown(run_id)}: a sequence of this commit is journaled") from e
                except psycopg.errors.ForeignKeyViolation as e:
                    raise NotFoundError(f"run {shown(run_id)} does not exist") from e
            last = max((seq for seq, _ in events), default=0)
            now = time.time()
            # A running run stays (or becomes) this replica's; a parked or ended one is nobody's.
            owner, lease = (self.owner, now + self.lease_seconds) if state is RunState.RUNNING else (None, None)
            cursor = await c.execute(
                "UPDATE runs SET state = %s, answer = %s, prompt_tokens = %s, completion_tokens = %s, "
                "total_tokens = %s, cached_prompt_tokens = %s, end_time = %s, snapshot = %s, "
                "last_sequence = GREATEST(last_sequence, %s), owner = %s, lease_until = %s "
                "WHERE run_id = %s AND (owner IS NULL OR owner = %s OR lease_until < %s)",
                (
                    state.value, answer, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                    usage.cached_prompt_tokens, now if state.ended else None, snapshot, last, owner, lease, run_id,
                    self.owner, now,
                ),
            )  # fmt: skip
            if cursor.rowcount == 0:
                if await _fetchone(c, "SELECT 1 FROM runs WHERE run_id = %s", (run_id,)) is not None:
                    raise LeaseLostError(f"run {shown(run_id)} is driven by another planner replica now")
                raise NotFoundError(f"run {shown(run_id)} does not exist")
            await c.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, run_id))

        await self._call(commit)

    async def get_run(self, run_id: str, *, with_events: bool = True, tenant: str | None = DEFAULT_TENANT) -> RunRecord:
        async def get(c: AsyncConnection[Any]) -> RunRecord:
            row = await _fetchone(c, f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s", (run_id,))
            if row is None or (tenant is not None and row[15] != tenant):
                raise NotFoundError(f"run {shown(run_id)} does not exist; use the run_id from a Run event")
            events: list[bytes] = []
            if with_events:
                cursor = await c.execute("SELECT data FROM events WHERE run_id = %s ORDER BY sequence", (run_id,))
                events = [bytes(data) for (data,) in await cursor.fetchall()]
            return _run(row, events)

        return await self._call(get)

    async def events_after(self, run_id: str, after_sequence: int) -> list[tuple[int, bytes]]:
        async def read(c: AsyncConnection[Any]) -> list[tuple[int, bytes]]:
            cursor = await c.execute(
                "SELECT sequence, data FROM events WHERE run_id = %s AND sequence > %s ORDER BY sequence",
                (run_id, after_sequence),
            )
            return [(int(seq), bytes(data)) for seq, data in await cursor.fetchall()]

        return await self._call(read)

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
        where, params = ["tenant = %s"], [tenant]
        for column, value in (("state", state.value if state else ""), ("agent", agent), ("session_id", session_id)):
            if value:
                where.append(f"{column} = %s")
                params.append(value)
        if rated:
            where.append("feedback_score IS NOT NULL")
        query = (
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} "
            "ORDER BY create_time DESC, ordinal DESC LIMIT %s"
        )
        return await self._call(lambda c: _runs(c, query, (*params, limit)))

    async def rate_run(self, run_id: str, feedback: Feedback, *, tenant: str) -> None:
        query = (
            "UPDATE runs SET feedback_score = %s, feedback_comment = %s, feedback_rater = %s, feedback_time = %s "
            "WHERE run_id = %s AND tenant = %s"
        )
        params = (feedback.score, feedback.comment, feedback.rater, feedback.rate_time, run_id, tenant)

        async def rate(c: AsyncConnection[Any]) -> None:
            if (await c.execute(query, params)).rowcount == 0:
                raise NotFoundError(f"run {shown(run_id)} does not exist; use the run_id from a Run event")

        await self._call(rate)

    async def count_active_runs(self, *, tenant: str) -> int:
        query = "SELECT COUNT(*) FROM runs WHERE tenant = %s AND state IN (%s, %s)"
        params = (tenant, RunState.RUNNING.value, RunState.WAITING_FOR_APPROVAL.value)
        row = await self._call(lambda c: _fetchone(c, query, params))
        return int(row[0]) if row else 0

    async def usage_since(self, since: float, *, tenant: str) -> tuple[int, Usage]:
        query = (
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cached_prompt_tokens), 0) FROM runs "
            "WHERE tenant = %s AND create_time >= %s"
        )
        row = await self._call(lambda c: _fetchone(c, query, (tenant, since)))
        assert row is not None
        return int(row[0]), Usage(*map(int, row[1:]))

    async def claim_runs(self) -> list[RunRecord]:
        """Takes the RUNNING runs that nobody holds a live lease on (their replica died or stopped), oldest first;
        two replicas claiming at once never take the same run."""
        now = time.time()
        query = (
            "UPDATE runs SET owner = %s, lease_until = %s WHERE run_id IN (SELECT run_id FROM runs WHERE state = %s "
            "AND (owner IS NULL OR lease_until < %s) ORDER BY create_time FOR UPDATE SKIP LOCKED) "
            f"RETURNING {_RUN_COLUMNS}"
        )
        params = (self.owner, now + self.lease_seconds, RunState.RUNNING.value, now)
        runs = await self._call(lambda c: _runs(c, query, params))
        return sorted(runs, key=lambda run: run.create_time)

    async def renew_leases(self, run_ids: Sequence[str]) -> set[str]:
        """Extends this replica's leases on ``run_ids``; the ids it still holds (the others were taken over)."""
        if not run_ids:
            return set()
        query = "UPDATE runs SET lease_until = %s WHERE run_id = ANY(%s) AND owner = %s AND state = %s RETURNING run_id"
        params = (time.time() + self.lease_seconds, list(run_ids), self.owner, RunState.RUNNING.value)

        async def renew(c: AsyncConnection[Any]) -> set[str]:
            return {row[0] for row in await (await c.execute(query, params)).fetchall()}

        return await self._call(renew)

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        query = f"SELECT {_RUN_COLUMNS} FROM runs WHERE state = %s ORDER BY create_time, ordinal"
        return await self._call(lambda c: _runs(c, query, (state.value,)))

    # Agents

    async def add_agent_version(
        self, name: str, spec: dict[str, Any], *, new: bool, tenant: str = DEFAULT_TENANT
    ) -> AgentRecord:
        async def add(c: AsyncConnection[Any]) -> AgentRecord:
            # Serializes versions of one agent: two updates racing on two replicas cannot both take version N + 1.
            await c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{tenant}/{name}",))
            row = await _fetchone(
                c,
                "SELECT version, deleted FROM agents WHERE tenant = %s AND name = %s ORDER BY version DESC LIMIT 1",
                (tenant, name),
            )
            latest, live = (row[0], not row[1]) if row else (None, False)
            if new and live:
                raise AlreadyExistsError(f"agent {shown(name)} exists; update it to make a new version")
            if not new and not live:
                raise NotFoundError(f"agent {shown(name)} does not exist; create it first")
            record = AgentRecord(name, (latest or 0) + 1, spec, time.time())
            await c.execute(
                "INSERT INTO agents (tenant, name, version, spec, create_time) VALUES (%s, %s, %s, %s, %s)",
                (tenant, name, record.version, json.dumps(spec, ensure_ascii=False), record.create_time),
            )
            return record

        return await self._call(add)

    async def get_agent(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> AgentRecord:
        async def get(c: AsyncConnection[Any]) -> AgentRecord:
            query = (
                "SELECT name, version, spec, create_time FROM agents WHERE tenant = %s AND name = %s AND NOT deleted"
            )
            row = (
                await _fetchone(c, query + " AND version = %s", (tenant, name, version))
                if version
                else await _fetchone(c, query + " ORDER BY version DESC LIMIT 1", (tenant, name))
            )
            if row is None:
                which = f"version {version} of agent {shown(name)}" if version else f"agent {shown(name)}"
                raise NotFoundError(f"{which} does not exist; ListAgents shows the agents and their latest versions")
            return AgentRecord(row[0], row[1], json.loads(row[2]), row[3])

        return await self._call(get)

    async def list_agents(self, *, tenant: str = DEFAULT_TENANT) -> list[AgentRecord]:
        query = (
            "SELECT DISTINCT ON (name) name, version, spec, create_time FROM agents "
            "WHERE tenant = %s AND NOT deleted ORDER BY name, version DESC"
        )

        async def read(c: AsyncConnection[Any]) -> list[AgentRecord]:
            rows = await (await c.execute(query, (tenant,))).fetchall()
            return [AgentRecord(n, v, json.loads(s), t) for n, v, s, t in rows]

        return await self._call(read)

    async def delete_agent(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        async def delete(c: AsyncConnection[Any]) -> None:
            cursor = await c.execute(
                "UPDATE agents SET deleted = TRUE WHERE tenant = %s AND name = %s AND NOT deleted", (tenant, name)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"agent {shown(name)} does not exist")

        await self._call(delete)


async def _fetchone(c: AsyncConnection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    return await (await c.execute(query, params)).fetchone()  # type: ignore[arg-type]


async def _runs(c: AsyncConnection[Any], query: str, params: Sequence[Any]) -> list[RunRecord]:
    rows = await (await c.execute(query, params)).fetchall()  # type: ignore[arg-type]
    return [_run(row, []) for row in rows]


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]

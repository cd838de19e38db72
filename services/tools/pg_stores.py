"""The tools service's idempotency outcomes and registered tool sources in PostgreSQL, shared by any number of tools
replicas (psycopg 3, async pools); the interfaces of the SQLite stores. Chosen by ``tools.database_url``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common import ConfigError, UnavailableError
from services.tools.idempotency import StoredCall, decode_outcome, encode_outcome
from services.tools.registry import ToolOutcome
from services.tools.sources import SourceSpec, source_kind, stored_spec, taken

T = TypeVar("T")
log = logging.getLogger(__name__)

SETTING = "tools.database_url"
# Each entry moves the schema from version i to i + 1 (the row in meshpilot_tools_schema, apart from the planner's
# meshpilot_schema: both may share one database). Replicas starting together take an advisory lock, so exactly one
# of them runs a migration.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tool_outcomes (
        key TEXT PRIMARY KEY,
        tool TEXT NOT NULL,
        arguments_digest TEXT NOT NULL,
        outcome TEXT,
        owner INTEGER NOT NULL,
        start_time DOUBLE PRECISION NOT NULL,
        end_time DOUBLE PRECISION
    );
    CREATE TABLE tool_sources (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        ordinal BIGSERIAL,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE tool_sources_revision (value BIGINT NOT NULL);
    INSERT INTO tool_sources_revision VALUES (0);
    """,
)
_MIGRATION_LOCK = 0x746F6F6C  # "tool": pg_advisory_xact_lock key of these migrations (the planner's is "mesh")
# Replica liveness: each replica holds pg_advisory_lock(_OWNER_LOCKS, its owner number) on a connection of its own for
# as long as it lives, and marks the calls it claims with that number. PostgreSQL lets the lock go when the connection
# ends (the process died, or its host: keepalives below), so a call whose owner's lock is free was interrupted.
_OWNER_LOCKS = 0x746F6F6C
OUTCOMES_CHANNEL = "meshpilot_tool_outcomes"  # payload: the key whose outcome was recorded
SOURCES_CHANNEL = "meshpilot_tool_sources"  # payload: empty; the sources changed
# A dead host (no FIN) must free its owner lock within tens of seconds, not the kernel's two hours.
_KEEPALIVES = "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
_RECONNECT_SECONDS = 1.0


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]


class _Database:
    """A pool on ``dsn`` with the tools schema migrated, for one store; and the store's closed/opened state."""

    def __init__(self, dsn: str, *, name: str, max_size: int) -> None:
        self.dsn = dsn
        self.name = name
        self.pool = AsyncConnectionPool(dsn, min_size=1, max_size=max_size, open=False, name=name)
        self._state = "new"
        self._opening = asyncio.Lock()

    async def open(self, timeout: float) -> None:
        async with self._opening:
            if self._state == "open":
                return
            if self._state == "closed":
                raise RuntimeError(f"the {self.name} database is closed")
            try:
                # One plain connection first: its error says why (the pool's says only that it timed out).
                probe = await AsyncConnection.connect(self.dsn, connect_timeout=max(1, round(timeout)))
                await probe.close()
                await self.pool.open(wait=True, timeout=timeout)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
                await self.pool.close()
                self._state = "closed"
                raise ConfigError(f"{SETTING}: cannot connect to PostgreSQL ({_reason(e)})") from e
            await self.call(_migrate, opening=True)
            self._state = "open"

    async def call(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], *, opening: bool = False) -> T:
        """``fn`` in one transaction; opens the store on first use, RuntimeError once it is closed."""
        if not opening and self._state != "open":
            if self._state == "closed":
                raise RuntimeError(f"the {self.name} database is closed")
            await self.open(10.0)
        async with self.pool.connection() as conn, conn.transaction():
            return await fn(conn)

    async def close(self) -> None:
        self._state = "closed"
        await self.pool.close()


async def _migrate(conn: AsyncConnection[Any]) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    await conn.execute("CREATE TABLE IF NOT EXISTS meshpilot_tools_schema (version INTEGER NOT NULL)")
    row = await (await conn.execute("SELECT version FROM meshpilot_tools_schema")).fetchone()
    version = row[0] if row else 0
    if row is None:
        await conn.execute("INSERT INTO meshpilot_tools_schema VALUES (0)")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await conn.execute(script)  # type: ignore[arg-type]  # our own DDL, no parameters
        await conn.execute("UPDATE meshpilot_tools_schema SET version = %s", (number,))


async def schema_version(dsn: str) -> int:
    """The tools schema's version at ``dsn`` (0: never migrated)."""
    async with await AsyncConnection.connect(dsn) as conn:
        exists = await (await conn.execute("SELECT to_regclass('meshpilot_tools_schema')")).fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = await (await conn.execute("SELECT version FROM meshpilot_tools_schema")).fetchone()
        return int(row[0]) if row else 0


async def _fetchone(c: AsyncConnection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    return await (await c.execute(query, params)).fetchone()  # type: ignore[arg-type]


class _Listener:
    """One connection of its own that LISTENs on ``channel`` (and, given ``owner``, holds that owner's lock), calling
    ``deliver(payload)`` for each notification; it reconnects after a failure, telling ``deliver`` with None."""

    def __init__(self, dsn: str, channel: str, deliver: Callable[[str | None], None], *, owner: bool) -> None:
        self.dsn = dsn
        self.channel = channel
        self.owner = 0
        self._deliver = deliver
        self._holds_owner = owner
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connects (and takes an owner number) before returning, so nothing is claimed unmarked."""
        if self._task is None:
            conn = await self._connect()
            self._task = asyncio.create_task(self._listen(conn), name=f"{self.channel}-listen")

    def start_soon(self) -> None:
        """Connects in the background (``deliver(None)`` once connected)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(None), name=f"{self.channel}-listen")

    async def _connect(self) -> AsyncConnection[Any]:
        conn = await AsyncConnection.connect(self.dsn, autocommit=True)
        try:
            await conn.execute(_KEEPALIVES)  # type: ignore[arg-type]  # constant SQL
            while self._holds_owner:
                # Keep the number across reconnects (its started calls stay ours); a new one if another took it.
                number = self.owner or secrets.randbelow(2**31 - 1) + 1
                held = await _fetchone(conn, "SELECT pg_try_advisory_lock(%s, %s)", (_OWNER_LOCKS, number))
                if held[0]:
                    self.owner = number
                    break
                if self.owner:  # a checker holds it for an instant, or our old session lingers: try again
                    await asyncio.sleep(_RECONNECT_SECONDS)
            await conn.execute(f"LISTEN {self.channel}")  # type: ignore[arg-type]  # constant SQL
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _listen(self, conn: AsyncConnection[Any] | None) -> None:
        while True:
            try:
                if conn is None:
                    conn = await self._connect()
                    self._deliver(None)  # notifications may have been missed meanwhile
                async with conn:
                    async for notification in conn.notifies():
                        self._deliver(notification.payload)
            except psycopg.Error as e:
                log.warning("%s notifications interrupted (%s); listening again", self.channel, _reason(e))
            conn = None
            await asyncio.sleep(_RECONNECT_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class PostgresOutcomeStore:
    """Calls and their outcomes by idempotency key in PostgreSQL; an ``IdempotencyStore`` for any number of replicas.

    A claim is an INSERT ... ON CONFLICT DO NOTHING marked with this replica's owner number: exactly one replica's
    succeeds. Another claimer of the key waits for the outcome (NOTIFY on record, and a look every ``poll_seconds``)
    while the owner's lock is held, i.e. while the replica that claimed it lives; once the lock is free (that replica
    died, or lost its connection) it gets the call with no outcome: interrupted, effect unknown, not run again. It
    waits ``wait_seconds`` at most (longer than any run may take), then raises UnavailableError (retry with the key).
    ``open`` connects and migrates (ConfigError naming tools.database_url when it cannot); first use opens too.
    """

    def __init__(
        self, dsn: str, *, wait_seconds: float = 120.0, poll_seconds: float = 1.0, max_connections: int = 8
    ) -> None:
        self._db = _Database(dsn, name="tools-outcomes", max_size=max_connections)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener = _Listener(dsn, OUTCOMES_CHANNEL, self._heard, owner=True)
        self._listening = False

    @property
    def owner(self) -> int:
        """This replica's owner number (0 until open)."""
        return self._listener.owner

    async def open(self, timeout: float = 10.0) -> None:
        await self._db.open(timeout)
        if not self._listening:
            try:
                await self._listener.start()
            except psycopg.Error as e:
                raise ConfigError(f"{SETTING}: cannot connect to PostgreSQL ({_reason(e)})") from e
            self._listening = True

    async def close(self) -> None:
        """Closes the connections (this replica's started calls count as interrupted from then on)."""
        await self._listener.close()
        await self._db.close()
        self._heard(None)

    def _heard(self, key: str | None) -> None:
        for waiting, events in self._waiters.items():
            if key is None or waiting == key:
                for event in events:
                    event.set()

    async def _call(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        if not self._listening:
            await self.open()
        return await self._db.call(fn)

    async def claim(self, key: str, tool: str, arguments_digest: str) -> StoredCall | None:
        """None when ``key`` was new and is now claimed by this replica; else the call under it, once it has an
        outcome or its owner is gone (outcome None)."""

        async def insert(c: AsyncConnection[Any]) -> bool:
            cursor = await c.execute(
                "INSERT INTO tool_outcomes (key, tool, arguments_digest, owner, start_time) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
                (key, tool, arguments_digest, self.owner, time.time()),
            )
            return cursor.rowcount == 1

        if await self._call(insert):
            return None
        return await self._wait(key)

    async def _wait(self, key: str) -> StoredCall:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            while True:
                event.clear()  # before reading: an outcome recorded from here on sets it again
                stored, owner_alive = await self._call(lambda c: _stored_and_owner(c, key))
                if stored.outcome is not None or not owner_alive:
                    return stored
                left = deadline - loop.time()
                if left <= 0:
                    raise UnavailableError(
                        f"the call under idempotency key {key!r} is still running on another tools replica after "
                        f"{self.wait_seconds:g}s; call again with the same key for its outcome"
                    )
                # A bounded wait: the owner dying sends no notification.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(self.poll_seconds, left))
        finally:
            events = self._waiters[key]
            events.discard(event)
            if not events:
                del self._waiters[key]

    async def record(self, key: str, outcome: ToolOutcome) -> None:
        """Stores the outcome of the call claimed under ``key`` and tells every replica; ValueError if there is none."""

        async def record(c: AsyncConnection[Any]) -> None:
            cursor = await c.execute(
                "UPDATE tool_outcomes SET outcome = %s, end_time = %s WHERE key = %s AND outcome IS NULL",
                (encode_outcome(outcome), time.time(), key),
            )
            if cursor.rowcount != 1:
                raise ValueError(f"no started call under idempotency key {key!r} to record an outcome for")
            await c.execute("SELECT pg_notify(%s, %s)", (OUTCOMES_CHANNEL, key))

        await self._call(record)

    async def get(self, key: str) -> StoredCall | None:
        """The call recorded under ``key``, or None."""

        async def get(c: AsyncConnection[Any]) -> StoredCall | None:
            row = await _fetchone(c, "SELECT tool, arguments_digest, outcome FROM tool_outcomes WHERE key = %s", (key,))
            return _stored(key, row) if row is not None else None

        return await self._call(get)


def _stored(key: str, row: Sequence[Any]) -> StoredCall:
    tool, digest, outcome = row[:3]
    return StoredCall(key, tool, digest, decode_outcome(outcome) if outcome is not None else None)


async def _stored_and_owner(c: AsyncConnection[Any], key: str) -> tuple[StoredCall, bool]:
    """The call under ``key`` and whether the replica that claimed it still lives (its owner lock is held). Taking
    the lock for this transaction succeeds only when nobody holds it; it is let go at commit."""
    row = await _fetchone(
        c,
        "SELECT tool, arguments_digest, outcome, "
        "outcome IS NULL AND NOT pg_try_advisory_xact_lock(%s, owner) FROM tool_outcomes WHERE key = %s",
        (_OWNER_LOCKS, key),
    )
    return _stored(key, row), bool(row[3])


class PostgresSourceStore:
    """Runtime-registered tool sources by tenant and name in PostgreSQL; a ``ToolSourceStore`` for any number of
    replicas. Every put and delete bumps the revision and NOTIFYs, and ``on_change`` callbacks hear every replica's
    (this one's included) from a LISTEN connection that reconnects after a failure (and then calls back once, for
    what it may have missed)."""

    def __init__(self, dsn: str, *, max_connections: int = 2) -> None:
        self._db = _Database(dsn, name="tools-sources", max_size=max_connections)
        self._callbacks: list[Callable[[], None]] = []
        self._listener = _Listener(dsn, SOURCES_CHANNEL, self._heard, owner=False)
        self._opened = False

    async def open(self, timeout: float = 10.0) -> None:
        await self._db.open(timeout)
        self._opened = True
        self._listen_if_heard()

    async def close(self) -> None:
        await self._listener.close()
        await self._db.close()

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        self._listen_if_heard()

    def _heard(self, _: str | None) -> None:
        for callback in self._callbacks:
            callback()

    def _listen_if_heard(self) -> None:
        if self._opened and self._callbacks:
            self._listener.start_soon()

    async def put(self, tenant: str, spec: SourceSpec) -> None:
        async def put(c: AsyncConnection[Any]) -> None:
            cursor = await c.execute(
                "INSERT INTO tool_sources (tenant, name, kind, spec, created_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant, name) DO NOTHING",
                (tenant, spec.name, source_kind(spec), spec.model_dump_json(), time.time()),
            )
            if cursor.rowcount != 1:
                raise taken(tenant, spec.name)
            await _changed(c)

        await self._db.call(put)

    async def delete(self, tenant: str, name: str) -> bool:
        async def delete(c: AsyncConnection[Any]) -> bool:
            cursor = await c.execute("DELETE FROM tool_sources WHERE tenant = %s AND name = %s", (tenant, name))
            if cursor.rowcount != 1:
                return False
            await _changed(c)
            return True

        return await self._db.call(delete)

    async def all(self) -> list[tuple[str, SourceSpec]]:
        """Every stored source with its tenant, oldest first."""

        async def read(c: AsyncConnection[Any]) -> list[tuple[str, str, str]]:
            cursor = await c.execute("SELECT tenant, kind, spec FROM tool_sources ORDER BY ordinal")
            return await cursor.fetchall()

        return [(tenant, stored_spec(kind, text)) for tenant, kind, text in await self._db.call(read)]

    async def revision(self) -> int:
        row = await self._db.call(lambda c: _fetchone(c, "SELECT value FROM tool_sources_revision"))
        return int(row[0])


async def _changed(c: AsyncConnection[Any]) -> None:
    await c.execute("UPDATE tool_sources_revision SET value = value + 1")
    await c.execute("SELECT pg_notify(%s, '')", (SOURCES_CHANNEL,))

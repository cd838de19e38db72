"""The tools service's stores keep one contract whatever holds them: every case runs on SQLite (one process) and on
PostgreSQL (any number of replicas). "Replicas" of a SQLite store are the one store its only process opens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from services.common import AlreadyExistsError
from services.common.config import McpServerConfig
from services.tools.idempotency import IdempotencyStore, OutcomeStore, StoredCall
from services.tools.pg_stores import PostgresOutcomeStore, PostgresSourceStore
from services.tools.registry import ToolCallError, ToolErrorKind, ToolOutcome
from services.tools.sources import OpenApiSpec, SourceStore, ToolSourceStore
from tests.postgres import fresh_schema, needs_postgres

DOCUMENT = json.dumps({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {}})
RESULT = ToolOutcome("echo", 0.25, result={"text": "é", "n": [1, 2.5, None]})


class Backend:
    """Opens stores on one database; ``reopen`` gives a store of a later process (SQLite) or another replica."""

    def __init__(self, kind: str, where: Any) -> None:
        self.kind = kind
        self.where = where
        self._open: list[Any] = []
        self._sqlite: dict[str, Any] = {}

    async def outcomes(self) -> IdempotencyStore:
        """A replica's outcome store: for SQLite the process's one store, for PostgreSQL a new one."""
        return await self._store("outcomes", lambda: OutcomeStore(self.where / "tools.db"), self._pg_outcomes)

    async def sources(self) -> ToolSourceStore:
        return await self._store("sources", lambda: SourceStore(self.where / "tools.db"), self._pg_sources)

    async def reopen_outcomes(self) -> IdempotencyStore:
        """A store of a process that starts after the earlier ones (SQLite) or of another replica."""
        self._sqlite.pop("outcomes", None)
        return await self.outcomes()

    def _pg_outcomes(self) -> PostgresOutcomeStore:
        return PostgresOutcomeStore(self.where, poll_seconds=0.05)

    def _pg_sources(self) -> PostgresSourceStore:
        return PostgresSourceStore(self.where)

    async def _store(self, name: str, sqlite: Callable[[], Any], postgres: Callable[[], Any]) -> Any:
        if self.kind == "sqlite" and name in self._sqlite:
            return self._sqlite[name]
        store = sqlite() if self.kind == "sqlite" else postgres()
        await store.open()
        self._open.append(store)
        if self.kind == "sqlite":
            self._sqlite[name] = store
        return store

    async def close(self) -> None:
        for store in self._open:
            await store.close()


@asynccontextmanager
async def backend_of(kind: str, tmp_path: Path) -> AsyncIterator[Backend]:
    if kind == "sqlite":
        backend = Backend(kind, tmp_path)
        try:
            yield backend
        finally:
            await backend.close()
        return
    with fresh_schema() as dsn:
        backend = Backend(kind, dsn)
        try:
            yield backend
        finally:
            await backend.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with backend_of(request.param, tmp_path) as backend:
        yield backend


# The outcome store


async def test_a_new_key_is_claimed_once_and_its_outcome_is_what_later_claims_get(backend: Backend) -> None:
    store = await backend.outcomes()
    assert await store.claim("key-1", "echo", "d1") is None
    assert await store.get("key-1") == StoredCall("key-1", "echo", "d1", None)
    await store.record("key-1", RESULT)
    assert await store.claim("key-1", "echo", "d1") == StoredCall("key-1", "echo", "d1", RESULT)
    assert await store.get("key-1") == StoredCall("key-1", "echo", "d1", RESULT)
    assert await store.get("key-2") is None


async def test_an_error_outcome_keeps_its_kind_and_message(backend: Backend) -> None:
    store = await backend.outcomes()
    failed = ToolOutcome("echo", 2.0, error=ToolCallError(ToolErrorKind.TIMEOUT, "ran past its time limit of 2s"))
    assert await store.claim("key-1", "echo", "d") is None
    await store.record("key-1", failed)
    stored = await store.get("key-1")
    assert stored is not None and stored.outcome == failed


async def test_a_claim_returns_what_the_key_holds_whatever_tool_or_digest_it_names(backend: Backend) -> None:
    # Telling a reused key apart is the executor's (FAILED_PRECONDITION): the store returns what the key holds.
    store = await backend.outcomes()
    await store.claim("key-1", "echo", "d1")
    await store.record("key-1", RESULT)
    assert await store.claim("key-1", "other", "d2") == StoredCall("key-1", "echo", "d1", RESULT)


async def test_recording_an_unclaimed_key_or_twice_is_a_value_error(backend: Backend) -> None:
    store = await backend.outcomes()
    with pytest.raises(ValueError, match="no started call under idempotency key 'nope' to record an outcome for"):
        await store.record("nope", RESULT)
    await store.claim("key-1", "echo", "d")
    await store.record("key-1", RESULT)
    with pytest.raises(ValueError, match="no started call under idempotency key 'key-1'"):
        await store.record("key-1", ToolOutcome("echo", 0.1, result=2))
    stored = await store.get("key-1")
    assert stored is not None and stored.outcome == RESULT


async def test_concurrent_claims_on_replicas_claim_once_and_the_others_wait_for_the_outcome(backend: Backend) -> None:
    replicas = [await backend.outcomes() for _ in range(3)]
    claims = [asyncio.create_task(store.claim("key-1", "echo", "d")) for store in replicas for _ in range(2)]
    done, waiting = await asyncio.wait(claims, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result() for task in done] == [None]  # the claimer; the others wait for its outcome
    claimer = replicas[claims.index(done.pop()) // 2]
    await claimer.record("key-1", RESULT)
    assert [await task for task in waiting] == [StoredCall("key-1", "echo", "d", RESULT)] * 5


async def test_a_call_whose_replica_died_before_its_outcome_is_interrupted(backend: Backend) -> None:
    store = await backend.outcomes()
    assert await store.claim("key-1", "echo", "d") is None
    await store.close()  # the replica (process) dies while the call runs: no outcome is ever recorded
    later = await backend.reopen_outcomes()
    assert await later.claim("key-1", "echo", "d") == StoredCall("key-1", "echo", "d", None)
    await later.record("key-1", RESULT)  # an idempotent tool run again records under the same key
    assert await later.claim("key-1", "echo", "d") == StoredCall("key-1", "echo", "d", RESULT)


async def test_a_closed_outcome_store_refuses_every_call(backend: Backend) -> None:
    store = await backend.outcomes()
    await store.close()
    for call in (store.get("k"), store.claim("k", "echo", "d"), store.record("k", RESULT)):
        with pytest.raises(RuntimeError, match="the tools-outcomes database is closed"):
            await call


# The source store


def mcp(name: str = "web") -> McpServerConfig:
    return McpServerConfig(name=name, url="http://127.0.0.1:9/mcp", headers={"Authorization": "Bearer x"})


def openapi(name: str = "shop") -> OpenApiSpec:
    return OpenApiSpec(name=name, document=DOCUMENT, approval_required=["*"], timeout_seconds=2.5)


async def test_sources_are_kept_by_tenant_oldest_first_as_they_were_put(backend: Backend) -> None:
    store = await backend.sources()
    await store.put("acme", mcp())
    await store.put("globex", openapi())
    await store.put("acme", openapi("shop"))  # one name, two tenants
    assert await store.all() == [("acme", mcp()), ("globex", openapi()), ("acme", openapi("shop"))]


async def test_a_name_the_tenant_has_is_already_exists_and_changes_nothing(backend: Backend) -> None:
    store = await backend.sources()
    await store.put("acme", mcp())
    revision = await store.revision()
    with pytest.raises(AlreadyExistsError, match="a tool source named 'web' is already registered; unregister it"):
        await store.put("acme", openapi("web"))
    assert (await store.all(), await store.revision()) == ([("acme", mcp())], revision)


async def test_delete_says_whether_there_was_a_source(backend: Backend) -> None:
    store = await backend.sources()
    await store.put("acme", mcp())
    assert not await store.delete("globex", "web")
    assert await store.delete("acme", "web")
    assert not await store.delete("acme", "web")
    assert await store.all() == []


async def test_the_revision_changes_with_every_put_and_delete_and_is_shared(backend: Backend) -> None:
    first, second = await backend.sources(), await backend.sources()
    seen = [await first.revision()]
    await first.put("acme", mcp())
    seen.append(await second.revision())
    await second.delete("acme", "web")
    seen.append(await first.revision())
    await first.delete("acme", "web")  # nothing deleted: no change
    seen.append(await second.revision())
    assert len(set(seen)) == 3 and seen[2] == seen[3]
    await second.put("acme", openapi())
    assert await first.all() == [("acme", openapi())]


async def test_a_closed_source_store_refuses_every_call(backend: Backend) -> None:
    store = await backend.sources()
    await store.close()
    for call in (store.all(), store.revision(), store.put("acme", mcp()), store.delete("acme", "web")):
        with pytest.raises(RuntimeError, match="the tools-sources database is closed"):
            await call

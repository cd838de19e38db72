"""Tools replicas on PostgreSQL: migrations, a DSN that does not connect, a claimer that dies or outlasts the wait,
one run per key across executors, and tool sources registered on one replica appearing on the others."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.common import AlreadyExistsError, ConfigError, MeshConfig, NotFoundError, UnavailableError
from services.common.approval import ApprovalSigner
from services.common.config import load_config
from services.planner.pg_store import PostgresRunStore
from services.tools import ToolCall, ToolExecutor, ToolsService
from services.tools.pg_stores import MIGRATIONS, PostgresOutcomeStore, PostgresSourceStore, schema_version
from services.tools.registry import ToolOutcome, ToolRegistry
from services.tools.sources import OpenApiSpec, ToolSources
from tests.postgres import fresh_schema, needs_postgres
from tests.unit.tools_fakes import SIGNING_KEY, CountingHandler, eventually, make_registry

DOCUMENT = json.dumps(
    {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "servers": [{"url": "http://127.0.0.1:9"}],
        "paths": {"/items": {"get": {"operationId": "listItems", "responses": {"200": {"description": "ok"}}}}},
    }
)
BAD_DSNS = ["postgresql://postgres@127.0.0.1:1/test", "postgresql://nobody:hunter2@127.0.0.1:5432/no_such_database"]


@needs_postgres
async def test_replicas_starting_together_migrate_once_beside_the_planners_schema() -> None:
    with fresh_schema() as dsn:
        planner = PostgresRunStore(dsn)
        await planner.open()
        assert await schema_version(dsn) == 0
        stores: list[PostgresOutcomeStore | PostgresSourceStore] = [
            PostgresOutcomeStore(dsn),
            PostgresSourceStore(dsn),
            PostgresOutcomeStore(dsn),
            PostgresSourceStore(dsn),
        ]
        await asyncio.gather(*(store.open() for store in stores))
        try:
            assert await schema_version(dsn) == len(MIGRATIONS)
            again = PostgresOutcomeStore(dsn)
            await again.open()  # already up to date: nothing runs twice
            await again.close()
            assert await schema_version(dsn) == len(MIGRATIONS)
            assert await planner.schema_version() > 0  # the planner's version is its own
        finally:
            for store in stores:
                await store.close()
            await planner.close()


@pytest.mark.parametrize("dsn", BAD_DSNS)
@pytest.mark.parametrize("store_class", [PostgresOutcomeStore, PostgresSourceStore])
async def test_a_postgres_that_does_not_answer_is_a_config_error_naming_the_setting(
    dsn: str, store_class: type
) -> None:
    store = store_class(dsn)
    with pytest.raises(ConfigError, match=r"^tools\.database_url: cannot connect to PostgreSQL") as raised:
        await store.open(timeout=3)
    assert "hunter2" not in str(raised.value)


def test_a_database_url_that_is_not_postgresql_is_refused_at_load_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"tools.*database_url must be a PostgreSQL URL") as raised:
        load_config(tools={"database_url": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in str(raised.value)


@needs_postgres
async def test_a_waiter_gets_an_interrupted_call_once_the_claiming_replica_dies() -> None:
    with fresh_schema() as dsn:
        claimer, waiter = PostgresOutcomeStore(dsn), PostgresOutcomeStore(dsn, poll_seconds=0.05)
        await claimer.open()
        await waiter.open()
        try:
            assert await claimer.claim("key-1", "echo", "d") is None
            waiting = asyncio.create_task(waiter.claim("key-1", "echo", "d"))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # its claimer lives: it waits for the outcome
            await claimer.close()  # the claimer's replica dies; its owner lock goes with its connection
            stored = await waiting
            assert stored is not None and (stored.key, stored.outcome) == ("key-1", None)
        finally:
            await waiter.close()


@needs_postgres
async def test_a_call_running_longer_than_any_may_is_unavailable_to_the_waiter() -> None:
    with fresh_schema() as dsn:
        claimer, waiter = PostgresOutcomeStore(dsn), PostgresOutcomeStore(dsn, wait_seconds=0.2, poll_seconds=0.05)
        try:
            assert await claimer.claim("key-1", "echo", "d") is None  # first use opens the store
            with pytest.raises(
                UnavailableError, match=r"'key-1' is still running on another tools replica after 0\.2s"
            ):
                await waiter.claim("key-1", "echo", "d")
            await claimer.record("key-1", ToolOutcome("echo", 0.1, result=1))
            stored = await waiter.claim("key-1", "echo", "d")  # the retry with the key gets the outcome
            assert stored is not None and stored.outcome == ToolOutcome("echo", 0.1, result=1)
        finally:
            await claimer.close()
            await waiter.close()


@needs_postgres
async def test_one_key_sent_to_two_replicas_at_once_runs_the_tool_once() -> None:
    with fresh_schema() as dsn:
        handler = CountingHandler(hold=True)
        registry = make_registry(("echo", handler))
        replicas = [
            ToolExecutor(registry, store=PostgresOutcomeStore(dsn), signer=ApprovalSigner(SIGNING_KEY))  # type: ignore[arg-type]
            for _ in range(2)
        ]
        call = ToolCall("echo", {"text": "hi"}, idempotency_key="key-1")
        try:
            calls = [asyncio.create_task(replica.execute(call)) for replica in replicas for _ in range(2)]
            await handler.started.wait()
            await asyncio.sleep(0.2)  # let the other replica's calls reach the claimed row
            handler.release()
            executions = await asyncio.gather(*calls)
        finally:
            for replica in replicas:
                await replica.close()
        assert handler.calls == 1
        assert sorted(e.replayed for e in executions) == [False, True, True, True]
        assert all(e.outcome.result == {"text": "hi", "run": 1} for e in executions)


def sources_of(tmp_path: Path, dsn: str) -> ToolSources:
    config = MeshConfig(data_dir=tmp_path, tools={"database_url": dsn})
    registry = ToolRegistry()
    return ToolSources(config.tools, registry, PostgresSourceStore(dsn), allow_commands=False)


def tools_of(sources: ToolSources, tenant: str) -> list[str]:
    scoped = sources.scoped(tenant)
    return [tool.name for tool in scoped.list()] if scoped is not None else []


@needs_postgres
async def test_sources_registered_or_unregistered_on_one_replica_follow_on_the_other(tmp_path: Path) -> None:
    with fresh_schema() as dsn:
        first, second = sources_of(tmp_path, dsn), sources_of(tmp_path, dsn)
        await first.start()
        await second.start()
        second.follow()
        try:
            await first.register(OpenApiSpec(name="shop", document=DOCUMENT), "acme")
            await eventually(lambda: tools_of(second, "acme") == ["shop.list_items"])
            assert [info.spec.name for info in second.list_sources("acme")] == ["shop"]
            assert tools_of(second, "globex") == []
            # The follower missed nothing: the second replica judges the name by what is stored.
            with pytest.raises(AlreadyExistsError, match="'shop' is already registered"):
                await second.register(OpenApiSpec(name="shop", document=DOCUMENT), "acme")
            await second.unregister("shop", "acme")
            with pytest.raises(NotFoundError, match="no tool source named 'shop'"):
                await first.unregister("shop", "acme")  # refreshed first: gone everywhere
            assert tools_of(first, "acme") == []
            await first.register(OpenApiSpec(name="shop", document=DOCUMENT, approval_required=["*"]), "acme")
            await eventually(lambda: [t.requires_approval for t in second.scoped("acme").list()] == [True])  # type: ignore[union-attr]
        finally:
            await first.close()
            await second.close()


@needs_postgres
async def test_a_replica_that_could_not_see_a_registration_is_refused_by_the_store(tmp_path: Path) -> None:
    with fresh_schema() as dsn:
        first, stale = sources_of(tmp_path, dsn), sources_of(tmp_path, dsn)
        await first.start()
        await stale.start()
        try:
            await first.register(OpenApiSpec(name="shop", document=DOCUMENT), "acme")
            stale._revision = await stale._store.revision()  # as if it had refreshed just before the registration
            with pytest.raises(AlreadyExistsError, match="'shop' is already registered"):
                await stale.register(OpenApiSpec(name="shop", document=DOCUMENT), "acme")
            assert tools_of(stale, "acme") == []  # nothing half-registered is left behind
        finally:
            await first.close()
            await stale.close()


@needs_postgres
async def test_the_service_with_a_database_url_keeps_both_stores_in_postgresql(tmp_path: Path) -> None:
    with fresh_schema() as dsn:
        config = MeshConfig(
            data_dir=tmp_path,
            tools={"server": {"port": 0, "metrics": False}, "mcp_endpoint": {"enabled": False}, "database_url": dsn},
        )
        service = ToolsService(config)
        await service.start()
        try:
            assert isinstance(service.executor.store, PostgresOutcomeStore)
            execution = await service.executor.execute(
                ToolCall("calculator", {"expression": "2+3"}, idempotency_key="key-1")
            )
            assert (await service.executor.store.get("key-1")).outcome == execution.outcome  # type: ignore[union-attr]
        finally:
            await service.stop()
        assert not (tmp_path / "tools.db").exists()


@pytest.mark.parametrize("dsn", BAD_DSNS[:1])
async def test_the_service_with_a_database_that_does_not_answer_stops_at_start_naming_the_setting(
    tmp_path: Path, dsn: str
) -> None:
    config = MeshConfig(
        data_dir=tmp_path,
        tools={"server": {"port": 0, "metrics": False}, "mcp_endpoint": {"enabled": False}, "database_url": dsn},
    )
    service = ToolsService(config)
    with pytest.raises(ConfigError, match=r"^tools\.database_url: cannot connect to PostgreSQL"):
        await service.start()
    await service.stop()

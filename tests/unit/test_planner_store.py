"""The planner's SQLite journal: sessions, atomic run transitions, run queries, agents, and schema migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import grpc
import pytest

from services.common import AlreadyExistsError, ConfigError, NotFoundError
from services.planner import RunState, RunStore, Usage
from services.planner.pg_store import MIGRATIONS as PG_MIGRATIONS
from services.planner.pg_store import PostgresRunStore
from services.planner.store import MIGRATIONS, JournalConflictError, RunRecord
from tests.postgres import fresh_schema, needs_postgres

NO_USAGE = Usage()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
async def store(request, tmp_path):
    """Each test of the journal's behaviour runs on both stores: SQLite (embedded) and PostgreSQL (replicas)."""
    if request.param == "sqlite":
        store = RunStore(tmp_path / "nested" / "dir" / "planner.db")
        yield store
        await store.close()
        return
    with fresh_schema() as dsn:
        store = PostgresRunStore(dsn)
        await store.open()
        yield store
        await store.close()


@pytest.fixture
async def sqlite_store(tmp_path):
    store = RunStore(tmp_path / "nested" / "dir" / "planner.db")
    yield store
    await store.close()


async def transition(
    store: RunStore,
    run_id: str,
    events: Sequence[tuple[int, bytes]] = (),
    *,
    state: RunState = RunState.RUNNING,
    snapshot: str = "{}",
    usage: Usage = NO_USAGE,
    answer: str = "",
) -> None:
    await store.commit(run_id, events, snapshot=snapshot, state=state, usage=usage, answer=answer)


async def new_run(store: RunStore, session_id: str = "", task: str = "task", **kwargs) -> RunRecord:
    session_id = session_id or (await store.create_session()).session_id
    return await store.create_run(session_id, task, **kwargs)


def ids(runs: list[RunRecord]) -> list[str]:
    return [run.run_id for run in runs]


async def test_creates_the_file_and_its_parent_directory_in_wal_mode(sqlite_store) -> None:
    store = sqlite_store
    await store.create_session()

    assert store.path.exists()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_session_turns_are_the_succeeded_runs_oldest_first(store) -> None:
    session = await store.create_session()
    first = await store.create_run(session.session_id, "What is the capital of France?")
    await transition(store, first.run_id, state=RunState.SUCCEEDED, answer="Paris", usage=Usage(10, 2, 12))
    failed = await store.create_run(session.session_id, "broken")
    await transition(store, failed.run_id, state=RunState.FAILED)
    await store.create_run(session.session_id, "still running")
    second = await store.create_run(session.session_id, "Which currency does that country use?")
    await transition(store, second.run_id, state=RunState.SUCCEEDED, answer="Euro")

    turns = (await store.get_session(session.session_id)).turns
    assert [(t.run_id, t.task, t.answer) for t in turns] == [
        (first.run_id, "What is the capital of France?", "Paris"),
        (second.run_id, "Which currency does that country use?", "Euro"),
    ]
    last = (await store.get_session(session.session_id, last_turns=1)).turns
    assert [t.answer for t in last] == ["Euro"]


async def test_a_new_run_is_running_with_no_events_and_no_snapshot(store) -> None:
    run = await new_run(store, agent="helper", agent_version=3)

    stored = await store.get_run(run.run_id)
    assert (stored.state, stored.events, stored.snapshot, stored.last_sequence) == (RunState.RUNNING, [], None, 0)
    assert (stored.agent, stored.agent_version, stored.end_time) == ("helper", 3, None)


async def test_commit_stores_events_snapshot_state_and_usage_together(store) -> None:
    run = await new_run(store)
    await transition(store, run.run_id, [(1, b"a"), (2, b"b")], snapshot='{"step": 1}', usage=Usage(100, 10, 110))

    running = await store.get_run(run.run_id)
    assert running.events == [b"a", b"b"]
    assert (running.snapshot, running.last_sequence, running.state) == ('{"step": 1}', 2, RunState.RUNNING)
    assert (running.usage, running.end_time) == (Usage(100, 10, 110), None)

    await transition(
        store, run.run_id, [(3, b"c")], state=RunState.SUCCEEDED, snapshot='{"step": 2}', usage=Usage(1, 2, 3, 4),
        answer="done",
    )  # fmt: skip

    done = await store.get_run(run.run_id)
    assert done.events == [b"a", b"b", b"c"]
    assert (done.state, done.answer, done.usage) == (RunState.SUCCEEDED, "done", Usage(1, 2, 3, 4))
    assert (done.snapshot, done.last_sequence) == ('{"step": 2}', 3)
    assert done.end_time is not None and done.end_time >= done.create_time


async def test_a_commit_without_events_keeps_the_last_sequence(store) -> None:
    run = await new_run(store)
    await transition(store, run.run_id, [(1, b"a")])
    await transition(store, run.run_id, [], state=RunState.WAITING_FOR_APPROVAL, snapshot='{"waiting": true}')

    stored = await store.get_run(run.run_id)
    assert (stored.state, stored.snapshot, stored.last_sequence) == (
        RunState.WAITING_FOR_APPROVAL,
        '{"waiting": true}',
        1,
    )


async def test_a_commit_with_a_journaled_sequence_stores_nothing_of_its_transition(store) -> None:
    run = await new_run(store)
    await transition(store, run.run_id, [(1, b"a"), (2, b"b")], snapshot="before")

    with pytest.raises(JournalConflictError):
        await transition(
            store, run.run_id, [(3, b"c"), (2, b"again")], state=RunState.SUCCEEDED, snapshot="after", answer="x",
            usage=Usage(1, 1, 2),
        )  # fmt: skip

    stored = await store.get_run(run.run_id)
    assert stored.events == [b"a", b"b"]  # not even event 3, which came before the duplicate
    assert (stored.snapshot, stored.state, stored.answer) == ("before", RunState.RUNNING, "")
    assert (stored.last_sequence, stored.usage, stored.end_time) == (2, Usage(), None)


async def test_a_commit_to_an_unknown_run_is_not_found(store) -> None:
    with pytest.raises(NotFoundError, match="run 'nope' does not exist"):
        await transition(store, "nope")


async def test_events_after_a_sequence_come_in_order(store) -> None:
    run = await new_run(store)
    await transition(store, run.run_id, [(2, b"b"), (1, b"a")])
    await transition(store, run.run_id, [(3, b"c")])

    assert await store.events_after(run.run_id, 0) == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert await store.events_after(run.run_id, 1) == [(2, b"b"), (3, b"c")]
    assert await store.events_after(run.run_id, 3) == []


async def test_list_runs_newest_first_filtered_by_state_agent_and_session(store) -> None:
    first, second = (await store.create_session()).session_id, (await store.create_session()).session_id
    r1 = await new_run(store, first)
    r2 = await new_run(store, first, agent="helper", agent_version=2)
    r3 = await new_run(store, second, agent="helper")
    r4 = await new_run(store, second)
    for run, state in ((r1, RunState.SUCCEEDED), (r2, RunState.FAILED), (r4, RunState.SUCCEEDED)):
        await transition(store, run.run_id, [(1, b"e")], state=state)

    assert ids(await store.list_runs()) == ids([r4, r3, r2, r1])
    assert ids(await store.list_runs(state=RunState.SUCCEEDED)) == ids([r4, r1])
    assert ids(await store.list_runs(agent="helper")) == ids([r3, r2])
    assert ids(await store.list_runs(session_id=first)) == ids([r2, r1])
    assert ids(await store.list_runs(agent="helper", session_id=second)) == ids([r3])
    assert ids(await store.list_runs(agent="helper", state=RunState.SUCCEEDED)) == []
    assert ids(await store.list_runs(limit=2)) == ids([r4, r3])
    listed = await store.list_runs(agent="helper", session_id=first)
    assert (listed[0].agent_version, listed[0].last_sequence, listed[0].events) == (2, 1, [])


async def test_runs_in_state_are_oldest_first_with_their_snapshot(store) -> None:
    a, waiting, ended, b = [await new_run(store) for _ in range(4)]
    await transition(store, a.run_id, [(1, b"e")], snapshot="snapshot a")
    await transition(store, waiting.run_id, [(1, b"e")], state=RunState.WAITING_FOR_APPROVAL, snapshot="w")
    await transition(store, ended.run_id, [(1, b"e")], state=RunState.CANCELLED)
    await transition(store, b.run_id, [(1, b"e")], snapshot="snapshot b")

    running = await store.runs_in_state(RunState.RUNNING)
    assert [(r.run_id, r.snapshot) for r in running] == [(a.run_id, "snapshot a"), (b.run_id, "snapshot b")]
    assert ids(await store.runs_in_state(RunState.WAITING_FOR_APPROVAL)) == [waiting.run_id]


async def test_a_database_of_the_previous_schema_is_migrated_on_open(tmp_path) -> None:
    path = tmp_path / "planner.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        conn.execute("INSERT INTO sessions VALUES ('s', 1.0)")
        conn.execute(
            "INSERT INTO runs (run_id, session_id, task, state, answer, total_tokens, create_time, end_time) "
            "VALUES ('old', 's', 'What is the capital of France?', 'SUCCEEDED', 'Paris', 220, 2.0, 3.0)"
        )
        conn.execute(
            "INSERT INTO runs (run_id, session_id, task, state, create_time) VALUES ('left', 's', 't', 'RUNNING', 4.0)"
        )
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?)", [("old", 1, b"e1"), ("old", 2, b"e2"), ("left", 1, b"l1")]
        )
    conn.close()

    store = RunStore(path)
    try:
        old = await store.get_run("old")
        left = (await store.runs_in_state(RunState.RUNNING))[0]
        turns = (await store.get_session("s")).turns
        assert await store.list_agents() == []
        # The next event of a run left running follows its last one (what resume journals ABORTED as).
        await transition(store, "left", [(left.last_sequence + 1, b"aborted")], state=RunState.FAILED)
    finally:
        await store.close()

    assert (old.state, old.answer, old.usage.total_tokens, old.events) == (
        RunState.SUCCEEDED,
        "Paris",
        220,
        [b"e1", b"e2"],
    )
    assert (old.agent, old.agent_version, old.snapshot, old.last_sequence) == ("default", 1, None, 2)
    assert (left.run_id, left.snapshot, left.last_sequence) == ("left", None, 1)
    assert [(t.run_id, t.answer) for t in turns] == [("old", "Paris")]
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        assert {"agent", "agent_version", "last_sequence", "snapshot"} <= columns
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


async def test_a_second_store_on_the_same_file_sees_everything(sqlite_store) -> None:
    store = sqlite_store
    session = await store.create_session()
    run = await store.create_run(session.session_id, "task")
    await transition(store, run.run_id, [(1, b"e")], snapshot="s")
    await store.close()

    reopened = RunStore(store.path)
    try:
        assert (await reopened.get_session(session.session_id)).create_time == pytest.approx(session.create_time)
        assert (await reopened.get_run(run.run_id)).events == [b"e"]
        assert [(r.run_id, r.snapshot) for r in await reopened.runs_in_state(RunState.RUNNING)] == [(run.run_id, "s")]
    finally:
        await reopened.close()


async def test_unknown_ids_are_not_found_and_say_what_to_use(store) -> None:
    with pytest.raises(NotFoundError, match="session 'nope' does not exist; create one or leave session_id empty"):
        await store.get_session("nope")
    with pytest.raises(NotFoundError, match="run 'nope' does not exist; use the run_id from a Run event") as info:
        await store.get_run("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


# Agents


async def test_agent_versions_count_up_and_earlier_ones_stay_readable(store) -> None:
    created = await store.add_agent_version("helper", {"instructions": "one"}, new=True)
    updated = await store.add_agent_version("helper", {"instructions": "two"}, new=False)

    assert (created.name, created.version, updated.version) == ("helper", 1, 2)
    assert (await store.get_agent("helper")).spec == {"instructions": "two"}
    first = await store.get_agent("helper", 1)
    assert (first.version, first.spec, first.create_time) == (1, {"instructions": "one"}, created.create_time)


async def test_creating_a_live_agent_again_already_exists(store) -> None:
    await store.add_agent_version("helper", {}, new=True)

    with pytest.raises(AlreadyExistsError, match="agent 'helper' exists; update it to make a new version") as info:
        await store.add_agent_version("helper", {}, new=True)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert [a.version for a in await store.list_agents()] == [1]


async def test_unknown_agents_are_not_found(store) -> None:
    await store.add_agent_version("helper", {}, new=True)

    with pytest.raises(NotFoundError, match="agent 'nope' does not exist; create it first"):
        await store.add_agent_version("nope", {}, new=False)
    with pytest.raises(NotFoundError, match="agent 'nope' does not exist; ListAgents shows"):
        await store.get_agent("nope")
    with pytest.raises(NotFoundError, match="version 2 of agent 'helper' does not exist"):
        await store.get_agent("helper", 2)
    with pytest.raises(NotFoundError, match="agent 'nope' does not exist"):
        await store.delete_agent("nope")


async def test_a_deleted_agent_is_gone_and_a_new_one_of_its_name_does_not_bring_back_old_versions(store) -> None:
    await store.add_agent_version("helper", {"instructions": "one"}, new=True)
    await store.add_agent_version("helper", {"instructions": "two"}, new=False)
    await store.delete_agent("helper")

    assert await store.list_agents() == []
    with pytest.raises(NotFoundError):
        await store.get_agent("helper")
    with pytest.raises(NotFoundError):
        await store.add_agent_version("helper", {}, new=False)
    with pytest.raises(NotFoundError):
        await store.delete_agent("helper")

    again = await store.add_agent_version("helper", {"instructions": "new"}, new=True)

    # Version numbers are not reused: runs name (agent, version), and those of the deleted agent keep theirs.
    assert again.version == 3
    assert (await store.get_agent("helper")).spec == {"instructions": "new"}
    for version in (1, 2):
        with pytest.raises(NotFoundError):
            await store.get_agent("helper", version)


async def test_list_agents_shows_the_latest_version_of_each_live_agent_by_name(store) -> None:
    for name in ("zeta", "alpha", "gone"):
        await store.add_agent_version(name, {"v": 1}, new=True)
    await store.add_agent_version("zeta", {"v": 2}, new=False)
    await store.delete_agent("gone")

    assert [(a.name, a.version, a.spec) for a in await store.list_agents()] == [
        ("alpha", 1, {"v": 1}),
        ("zeta", 2, {"v": 2}),
    ]


async def test_an_agent_spec_keeps_unicode(store) -> None:
    await store.add_agent_version("tutor", {"instructions": "你是地理老师。"}, new=True)

    assert (await store.get_agent("tutor")).spec == {"instructions": "你是地理老师。"}


async def test_error_messages_cut_a_huge_id(store) -> None:
    huge = "x" * 100_000
    await store.add_agent_version("helper", {}, new=True)
    calls = [
        lambda: store.get_session(huge),
        lambda: store.get_run(huge),
        lambda: transition(store, huge),
        lambda: store.get_agent(huge),
        lambda: store.add_agent_version(huge, {}, new=False),
        lambda: store.delete_agent(huge),
    ]

    for call in calls:
        with pytest.raises(NotFoundError) as info:
            await call()
        assert len(str(info.value)) < 200
        assert "x" * 64 + "'... (100000 characters)" in str(info.value)


async def test_a_database_of_version_3_keeps_its_agents_and_runs_in_the_default_tenant(tmp_path) -> None:
    path = tmp_path / "planner.db"
    with sqlite3.connect(path) as conn:
        for number, script in enumerate(MIGRATIONS[:3], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("INSERT INTO sessions VALUES ('s1', 1.0)")
        conn.execute(
            "INSERT INTO runs (run_id, session_id, task, state, create_time) VALUES ('r1', 's1', 't', 'SUCCEEDED', 1.0)"
        )
        conn.execute("INSERT INTO agents VALUES ('tutor', 1, '{}', 1.0, 0)")
    store = RunStore(path)
    try:
        assert (await store.get_run("r1")).tenant == "default"
        assert (await store.get_session("s1")).session_id == "s1"
        assert (await store.get_agent("tutor")).version == 1
        with pytest.raises(NotFoundError):
            await store.get_run("r1", tenant="acme")
    finally:
        await store.close()


async def test_tenants_see_only_their_own_sessions_runs_and_agents(store) -> None:
    session = await store.create_session(tenant="acme")
    run = await store.create_run(session.session_id, "acme's secret task", tenant="acme")
    await store.add_agent_version("tutor", {"v": "acme"}, new=True, tenant="acme")
    await store.add_agent_version("tutor", {"v": "globex"}, new=True, tenant="globex")  # same name, own agent

    assert (await store.get_run(run.run_id, tenant="acme")).task == "acme's secret task"
    assert (await store.get_run(run.run_id, tenant=None)).tenant == "acme"
    for call in (
        store.get_run(run.run_id, tenant="globex"),
        store.get_session(session.session_id, tenant="globex"),
        store.delete_agent("tutor", tenant="initech"),
        store.get_agent("tutor", tenant="initech"),
    ):
        with pytest.raises(NotFoundError):
            await call
    assert [r.run_id for r in await store.list_runs(tenant="acme")] == [run.run_id]
    assert await store.list_runs(tenant="globex") == []
    assert (await store.get_agent("tutor", tenant="globex")).spec == {"v": "globex"}
    assert [a.spec for a in await store.list_agents(tenant="acme")] == [{"v": "acme"}]
    await store.delete_agent("tutor", tenant="globex")
    assert (await store.get_agent("tutor", tenant="acme")).spec == {"v": "acme"}


@needs_postgres
async def test_postgres_replicas_starting_together_migrate_once_and_share_everything() -> None:
    with fresh_schema() as dsn:
        first, second = PostgresRunStore(dsn), PostgresRunStore(dsn)
        await asyncio.gather(first.open(), second.open())
        try:
            assert await first.schema_version() == await second.schema_version() == len(PG_MIGRATIONS)
            session = await first.create_session(tenant="acme")
            run = await first.create_run(session.session_id, "task", tenant="acme")
            await transition(first, run.run_id, [(1, b"e")], snapshot="s")
            assert (await second.get_run(run.run_id, tenant="acme")).events == [b"e"]
            with pytest.raises(JournalConflictError):
                await transition(second, run.run_id, [(1, b"again")])
            # Versions of one agent made on two replicas at once are numbered without a gap or a clash.
            await first.add_agent_version("tutor", {"v": 0}, new=True)
            await asyncio.gather(
                *(store.add_agent_version("tutor", {"v": n}, new=False) for n, store in enumerate([first, second] * 3))
            )
            assert (await second.get_agent("tutor")).version == 7
        finally:
            await first.close()
            await second.close()


@pytest.mark.parametrize(
    "dsn", ["postgresql://postgres@127.0.0.1:1/test", "postgresql://nobody@127.0.0.1:5432/no_such_database"]
)
async def test_a_postgres_that_does_not_answer_is_a_config_error_naming_the_setting(dsn: str) -> None:
    store = PostgresRunStore(dsn)
    with pytest.raises(ConfigError, match=r"^planner\.database_url: cannot connect to PostgreSQL") as raised:
        await store.open(timeout=3)
    assert "password" not in str(raised.value)

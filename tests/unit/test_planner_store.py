"""The planner's SQLite journal: sessions, runs, events, and what a second store on the same file sees."""

from __future__ import annotations

import sqlite3

import grpc
import pytest

from services.common import NotFoundError
from services.planner import RunState, RunStore, Usage


@pytest.fixture
async def store(tmp_path):
    store = RunStore(tmp_path / "nested" / "dir" / "planner.db")
    yield store
    await store.close()


async def test_creates_the_file_and_its_parent_directory_in_wal_mode(store, tmp_path) -> None:
    await store.create_session()

    assert store.path.exists()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_session_turns_are_the_succeeded_runs_oldest_first(store) -> None:
    session = await store.create_session()
    first = await store.create_run(session.session_id, "What is the capital of France?")
    await store.finish_run(first.run_id, RunState.SUCCEEDED, "Paris", Usage(10, 2, 12))
    failed = await store.create_run(session.session_id, "broken")
    await store.finish_run(failed.run_id, RunState.FAILED, "", Usage())
    second = await store.create_run(session.session_id, "Which currency does that country use?")
    await store.finish_run(second.run_id, RunState.SUCCEEDED, "Euro", Usage())

    turns = (await store.get_session(session.session_id)).turns
    assert [(t.run_id, t.task, t.answer) for t in turns] == [
        (first.run_id, "What is the capital of France?", "Paris"),
        (second.run_id, "Which currency does that country use?", "Euro"),
    ]
    last = (await store.get_session(session.session_id, last_turns=1)).turns
    assert [t.answer for t in last] == ["Euro"]


async def test_events_come_back_in_sequence_order_with_the_run(store) -> None:
    session = await store.create_session()
    run = await store.create_run(session.session_id, "task")
    for sequence in (1, 2, 3):
        await store.append_event(run.run_id, sequence, f"event {sequence}".encode())
    await store.finish_run(run.run_id, RunState.SUCCEEDED, "done", Usage(100, 20, 120, 80))

    stored = await store.get_run(run.run_id)
    assert stored.events == [b"event 1", b"event 2", b"event 3"]
    assert (stored.state, stored.answer, stored.usage) == (RunState.SUCCEEDED, "done", Usage(100, 20, 120, 80))
    assert stored.end_time is not None and stored.end_time >= stored.create_time


async def test_a_sequence_number_is_journaled_once(store) -> None:
    session = await store.create_session()
    run = await store.create_run(session.session_id, "task")
    await store.append_event(run.run_id, 1, b"a")

    with pytest.raises(sqlite3.IntegrityError):
        await store.append_event(run.run_id, 1, b"b")


async def test_unknown_ids_are_not_found_and_say_what_to_use(store) -> None:
    with pytest.raises(NotFoundError, match="session 'nope' does not exist; create one or leave session_id empty"):
        await store.get_session("nope")
    with pytest.raises(NotFoundError, match="run 'nope' does not exist; use the run_id from a Run event") as info:
        await store.get_run("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_second_store_on_the_same_file_sees_everything(store) -> None:
    session = await store.create_session()
    run = await store.create_run(session.session_id, "task")
    await store.append_event(run.run_id, 1, b"e")
    await store.close()

    reopened = RunStore(store.path)
    try:
        assert (await reopened.get_session(session.session_id)).create_time == pytest.approx(session.create_time)
        assert (await reopened.get_run(run.run_id)).events == [b"e"]
        assert await reopened.unfinished_runs() == [(run.run_id, 1)]
    finally:
        await reopened.close()

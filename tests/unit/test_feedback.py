"""Ratings of runs: stored with the run in both journals (migrated from the previous schema and from empty), RateRun's
checks and tenants, GetRun/ListRuns showing them, the satisfaction metric, and the reward the training loop reads."""

from __future__ import annotations

import sqlite3

import grpc
import psycopg
import pytest

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import InvalidArgumentError, NotFoundError, load_config
from services.common.auth import ApiKeyStore
from services.common.clients import create_channel
from services.planner import RunState, RunStore, Usage
from services.planner.feedback import MAX_FEEDBACK_COMMENT_CHARS, Feedback, rated_runs, validate_feedback
from services.planner.pg_store import MIGRATIONS as PG_MIGRATIONS
from services.planner.pg_store import PostgresRunStore
from services.planner.store import MIGRATIONS
from tests.postgres import fresh_schema, needs_postgres
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
async def store(request, tmp_path):
    if request.param == "sqlite":
        store = RunStore(tmp_path / "planner.db")
        yield store
        await store.close()
        return
    with fresh_schema() as dsn:
        store = PostgresRunStore(dsn)
        await store.open()
        yield store
        await store.close()


async def ended_run(store, task: str = "What is the capital of France?", tenant: str = "default", **kwargs) -> str:
    session = await store.create_session(tenant=tenant)
    run = await store.create_run(session.session_id, task, tenant=tenant, **kwargs)
    await store.commit(run.run_id, [(1, b"e")], snapshot="{}", state=RunState.SUCCEEDED, usage=Usage(), answer="Paris")
    return run.run_id


def test_the_scale_is_one_to_five_and_the_reward_zero_to_one() -> None:
    assert [Feedback(score).reward for score in range(1, 6)] == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("score", [0, 6, -1, 2**31 - 1])
def test_a_score_outside_the_scale_says_what_to_use(score: int) -> None:
    with pytest.raises(InvalidArgumentError, match=r"use 1 \(wrong or useless\) to 5 \(exactly right\)"):
        validate_feedback(score, "", "")


def test_a_long_comment_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        validate_feedback(3, "x" * 100_000, "")
    assert str(raised.value) == f"comment has 100000 characters; shorten it to at most {MAX_FEEDBACK_COMMENT_CHARS}"


async def test_a_rating_is_stored_with_the_run_and_replaced_by_the_next(store) -> None:
    run_id = await ended_run(store)
    assert (await store.get_run(run_id)).feedback is None

    await store.rate_run(run_id, Feedback(2, "vague", "key-1", 10.0), tenant="default")
    await store.rate_run(run_id, Feedback(5, "exactly right: 巴黎", "key-2", 11.0), tenant="default")

    assert (await store.get_run(run_id)).feedback == Feedback(5, "exactly right: 巴黎", "key-2", 11.0)
    assert [r.feedback for r in await store.list_runs()] == [Feedback(5, "exactly right: 巴黎", "key-2", 11.0)]


async def test_rated_runs_are_the_rewards_of_the_tenants_rated_runs_newest_first(store) -> None:
    first = await ended_run(store, "first", agent="geo")
    await ended_run(store, "unrated", agent="geo")
    other_agent = await ended_run(store, "other", agent="tutor")
    last = await ended_run(store, "last", agent="geo")
    elsewhere = await ended_run(store, "elsewhere", tenant="acme", agent="geo")
    for run_id, score, tenant in ((first, 1, "default"), (last, 4, "default"), (other_agent, 5, "default")):
        await store.rate_run(run_id, Feedback(score), tenant=tenant)
    await store.rate_run(elsewhere, Feedback(5), tenant="acme")

    rewards = await rated_runs(store, tenant="default", agent="geo")

    assert [(r.run_id, r.task, r.answer, r.reward) for r in rewards] == [
        (last, "last", "Paris", 0.75),
        (first, "first", "Paris", 0.0),
    ]
    assert len(await rated_runs(store, tenant="default")) == 3


async def test_rating_an_unknown_run_or_another_tenants_is_not_found(store) -> None:
    run_id = await ended_run(store, tenant="acme")
    for unknown, tenant in ((run_id, "globex"), ("nope", "acme"), ("x" * 100_000, "acme")):
        with pytest.raises(NotFoundError) as raised:
            await store.rate_run(unknown, Feedback(3), tenant=tenant)
        assert len(str(raised.value)) < 200
    assert (await store.get_run(run_id, tenant="acme")).feedback is None


async def test_a_sqlite_journal_of_the_previous_version_gains_feedback_and_keeps_its_runs(tmp_path) -> None:
    path = tmp_path / "planner.db"
    with sqlite3.connect(path) as conn:
        for number, script in enumerate(MIGRATIONS[:-1], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("INSERT INTO sessions (session_id, create_time) VALUES ('s', 1.0)")
        conn.execute(
            "INSERT INTO runs (run_id, session_id, task, state, answer, create_time) "
            "VALUES ('old', 's', 'task', 'SUCCEEDED', 'Paris', 2.0)"
        )
    conn.close()
    store = RunStore(path)
    try:
        assert (await store.get_run("old")).feedback is None
        await store.rate_run("old", Feedback(4, "good", "", 3.0), tenant="default")
        assert (await store.get_run("old")).feedback == Feedback(4, "good", "", 3.0)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


async def test_an_empty_sqlite_journal_is_made_at_the_latest_version(tmp_path) -> None:
    store = RunStore(tmp_path / "planner.db")
    try:
        run_id = await ended_run(store)
        await store.rate_run(run_id, Feedback(3), tenant="default")
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "planner.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    assert {"feedback_score", "feedback_comment", "feedback_rater", "feedback_time"} <= columns


@needs_postgres
async def test_a_postgres_journal_of_the_previous_version_gains_feedback_and_keeps_its_runs() -> None:
    with fresh_schema() as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE meshpilot_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO meshpilot_schema VALUES (%s)", (len(PG_MIGRATIONS) - 1,))
            for script in PG_MIGRATIONS[:-1]:
                conn.execute(script)  # type: ignore[arg-type]
            conn.execute("INSERT INTO sessions VALUES ('s', 'default', 1.0)")
            conn.execute(
                "INSERT INTO runs (run_id, tenant, session_id, task, state, answer, create_time) "
                "VALUES ('old', 'default', 's', 'task', 'SUCCEEDED', 'Paris', 2.0)"
            )
        store = PostgresRunStore(dsn)
        await store.open()
        try:
            assert await store.schema_version() == len(PG_MIGRATIONS)
            assert (await store.get_run("old")).feedback is None
            await store.rate_run("old", Feedback(4, "good", "k", 3.0), tenant="default")
            assert (await store.get_run("old")).feedback == Feedback(4, "good", "k", 3.0)
        finally:
            await store.close()


# RateRun through an in-process planner


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})


async def finished_run(planner: Planner) -> str:
    events = await planner.run()
    assert events[-1].WhichOneof("event") == "final_answer"
    return events[-1].run_id


def satisfaction(planner: Planner, suffix: str, **labels: str) -> float | None:
    return planner.server.registry.get_sample_value(f"meshpilot_run_satisfaction_{suffix}", labels)


async def test_rate_run_stores_the_rating_shown_by_get_run_and_list_runs_and_counts_it(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        run_id = await finished_run(planner)

        rated = await planner.stub.RateRun(planner_pb2.RateRunRequest(run_id=run_id, score=4, comment="right"))
        got = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id))
        listed = await planner.stub.ListRuns(planner_pb2.ListRunsRequest())

        assert (rated.feedback.score, rated.feedback.comment, rated.feedback.rater) == (4, "right", "")
        assert rated.feedback.rate_time.seconds > 0
        assert got.feedback == rated.feedback
        assert [run.feedback for run in listed.runs] == [rated.feedback]
        assert satisfaction(planner, "count") == 1.0
        assert satisfaction(planner, "sum") == 4.0
        assert satisfaction(planner, "bucket", le="3.0") == 0.0
        assert satisfaction(planner, "bucket", le="4.0") == 1.0


@pytest.mark.parametrize(
    ("score", "comment", "message"),
    [
        (0, "", "score is 0; use 1 (wrong or useless) to 5 (exactly right)"),
        (9, "", "score is 9; use 1 (wrong or useless) to 5 (exactly right)"),
        (3, "y" * 5000, "comment has 5000 characters; shorten it to at most 1000"),
    ],
)
async def test_rate_run_refuses_bad_ratings_saying_what_to_change(config, score, comment, message) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        run_id = await finished_run(planner)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await planner.stub.RateRun(planner_pb2.RateRunRequest(run_id=run_id, score=score, comment=comment))
        assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        assert not (await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id))).HasField("feedback")
        assert satisfaction(planner, "count") == 0.0


async def test_rating_an_unknown_run_is_not_found_and_a_running_one_a_failed_precondition(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await planner.stub.RateRun(planner_pb2.RateRunRequest(run_id="no-such-run", score=3))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        store = planner.servicer.store
        session = await store.create_session()
        running = await store.create_run(session.session_id, "still going")
        with pytest.raises(grpc.aio.AioRpcError) as still_going:
            await planner.stub.RateRun(planner_pb2.RateRunRequest(run_id=running.run_id, score=3))
        assert still_going.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rate it once it has ended" in (still_going.value.details() or "")
        llm.outputs.clear()


async def test_a_tenant_cannot_rate_or_see_the_rating_of_another_tenants_run(tmp_path) -> None:
    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        keys = ApiKeyStore(config.auth.keys_path)
        (acme_key, acme_token), (_, globex_token) = keys.create("acme"), keys.create("globex")
        acme = create_channel(planner.server.address, api_key=acme_token)
        globex = create_channel(planner.server.address, api_key=globex_token)
        try:
            acme_stub = planner_pb2_grpc.PlannerServiceStub(acme)
            events = [e async for e in acme_stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))]
            run_id = events[-1].run_id
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await planner_pb2_grpc.PlannerServiceStub(globex).RateRun(
                    planner_pb2.RateRunRequest(run_id=run_id, score=1)
                )
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

            rated = await acme_stub.RateRun(planner_pb2.RateRunRequest(run_id=run_id, score=5))
            assert (rated.feedback.score, rated.feedback.rater) == (5, acme_key.key_id)
        finally:
            await acme.close()
            await globex.close()
            keys.close()

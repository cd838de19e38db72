"""The planner over gRPC (in-process, port 0) with fake model and tools: streams, journal, cancel and errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from meshpilot.planner.v1 import planner_pb2
from services.common import UnavailableError, load_config
from services.planner import RunStore
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call

FRANCE = [call("country_facts", country="France"), answer("Paris")]


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0}})


def kinds(events):
    return [event.WhichOneof("event") for event in events]


async def test_run_streams_numbered_events_ending_in_the_answer(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        events = await planner.run()

    assert kinds(events) == [
        "step_started",
        "model_output",
        "tool_call",
        "tool_result",
        "step_started",
        "model_output",
        "final_answer",
    ]
    assert [e.sequence for e in events] == list(range(1, 8))
    assert len({(e.run_id, e.session_id) for e in events}) == 1
    assert events[2].tool_call.tool == "country_facts"
    assert dict(events[2].tool_call.arguments) == {"country": "France"}
    assert events[3].tool_result.result.struct_value["capital"] == "Paris"
    assert events[-1].final_answer.answer == "Paris"
    assert events[-1].final_answer.usage.total_tokens == 220
    assert events[1].model_output.usage.prompt_tokens == 100


async def test_get_run_returns_the_journaled_run(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        events = await planner.run()
        run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))

    assert run.state == planner_pb2.RUN_STATE_SUCCEEDED
    assert run.task == "What is the capital of France?"
    assert run.answer == "Paris"
    assert run.usage.total_tokens == 220
    assert list(run.events) == events
    assert run.end_time.ToNanoseconds() >= run.create_time.ToNanoseconds() > 0


async def test_tool_error_is_streamed_as_an_observation(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="Atlantis"), *FRANCE])
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run()

    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert results[0].error == "no country named 'Atlantis'"
    assert results[1].result.struct_value["capital"] == "Paris"
    assert events[-1].final_answer.answer == "Paris"


async def test_a_follow_up_sees_the_earlier_turn_and_get_session_lists_it(config) -> None:
    llm = ScriptedLLM([*FRANCE, call("country_facts", country="France"), answer("Euro (EUR, €)")])
    async with Planner(config, llm, FakeTools()) as planner:
        first = await planner.run()
        session_id = first[0].session_id
        second = await planner.run("Which currency does that country use?", session_id=session_id)
        session = await planner.stub.GetSession(planner_pb2.GetSessionRequest(session_id=session_id))

    assert second[0].session_id == session_id
    follow_up_prompt = [m["content"] for m in llm.requests[2]["messages"]]
    assert follow_up_prompt[1:] == [
        "What is the capital of France?",
        '{"final_answer": "Paris"}',
        "Which currency does that country use?",
    ]
    assert [(t.task, t.answer, t.run_id) for t in session.turns] == [
        ("What is the capital of France?", "Paris", first[0].run_id),
        ("Which currency does that country use?", "Euro (EUR, €)", second[0].run_id),
    ]


async def test_a_new_planner_on_the_same_database_sees_sessions_and_runs(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        session = await planner.stub.CreateSession(planner_pb2.CreateSessionRequest())
        events = await planner.run(session_id=session.session_id)

    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        again = await planner.stub.GetSession(planner_pb2.GetSessionRequest(session_id=session.session_id))
        run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))

    assert again.create_time == session.create_time
    assert [t.answer for t in again.turns] == ["Paris"]
    assert list(run.events) == events


async def test_cancel_run_stops_it_with_a_cancelled_event(config) -> None:
    llm = ScriptedLLM(list(FRANCE))
    llm.gate = asyncio.Event()  # the model never answers until the test lets it
    async with Planner(config, llm, FakeTools()) as planner:
        call_ = planner.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))
        first = await call_.read()
        cancelled = await planner.stub.CancelRun(planner_pb2.CancelRunRequest(run_id=first.run_id))
        rest = []
        while (event := await call_.read()) is not grpc.aio.EOF:
            rest.append(event)

    assert first.HasField("step_started")
    assert cancelled.state == planner_pb2.RUN_STATE_CANCELLED
    assert rest[-1].error.code == "CANCELLED"
    assert "CancelRun" in rest[-1].error.message
    assert [e.sequence for e in cancelled.events] == [1, 2]
    assert cancelled.events[-1] == rest[-1]


async def test_cancel_of_a_finished_run_returns_it_unchanged(config) -> None:
    async with Planner(config, ScriptedLLM(list(FRANCE)), FakeTools()) as planner:
        events = await planner.run()
        run = await planner.stub.CancelRun(planner_pb2.CancelRunRequest(run_id=events[0].run_id))

    assert run.state == planner_pb2.RUN_STATE_SUCCEEDED
    assert len(run.events) == len(events)


async def test_a_run_goes_on_when_its_client_disconnects(config) -> None:
    llm = ScriptedLLM(list(FRANCE))
    llm.gate = asyncio.Event()
    async with Planner(config, llm, FakeTools()) as planner:
        call_ = planner.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))
        first = await call_.read()
        call_.cancel()
        llm.gate.set()
        for _ in range(200):
            run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=first.run_id))
            if run.state != planner_pb2.RUN_STATE_RUNNING:
                break
            await asyncio.sleep(0.02)

    assert run.state == planner_pb2.RUN_STATE_SUCCEEDED
    assert run.answer == "Paris"
    llm.assert_consumed()


async def test_budget_error_is_the_last_event_and_the_run_failed(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France")])
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run(max_steps=1)
        run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))

    assert events[-1].error.code == "RESOURCE_EXHAUSTED"
    assert "max_steps" in events[-1].error.message
    assert run.state == planner_pb2.RUN_STATE_FAILED


async def test_a_briefly_unavailable_model_is_retried_within_the_run(config) -> None:
    down = UnavailableError("inference: connection refused")
    llm = ScriptedLLM([down, down, *FRANCE])
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run()

    assert events[-1].final_answer.answer == "Paris"
    assert kinds(events).count("model_output") == 2
    llm.assert_consumed()


async def test_a_model_unavailable_for_the_whole_budget_ends_the_run_unavailable(config) -> None:
    llm = ScriptedLLM([UnavailableError("inference: connection refused")] * 20)
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run(timeout=duration_pb2.Duration(nanos=600_000_000))

    assert kinds(events) == ["step_started", "error"]
    assert events[-1].error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert "inference: connection refused" in events[-1].error.message or "timeout" in events[-1].error.message


@pytest.mark.parametrize("task", ["", "   \n\t"])
async def test_empty_task_is_invalid_before_anything_runs(config, task) -> None:
    llm = ScriptedLLM([])
    async with Planner(config, llm, FakeTools()) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await planner.run(task)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task is empty; put the question or instruction in RunRequest.task" in info.value.details()
    assert llm.requests == []


async def test_too_long_task_is_invalid(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await planner.run("x" * 5000)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shorten it to at most 4000" in info.value.details()


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"max_steps": -1}, "budget.max_steps is -1; use a positive number, or 0 for the default (6)"),
        ({"max_tokens": -5}, "budget.max_tokens is -5; use a positive number, or 0 for the default (16384)"),
        ({"timeout": duration_pb2.Duration(seconds=-2)}, "budget.timeout is -2s; use a duration up to 86400s"),
        ({"timeout": duration_pb2.Duration(seconds=315_576_000_000)}, "use a duration up to 86400s"),
    ],
)
async def test_out_of_range_budget_is_invalid(config, budget, message) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await planner.run(**budget)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


async def test_unknown_session_and_run_are_not_found(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        with pytest.raises(grpc.aio.AioRpcError) as run_in_unknown:
            await planner.run(session_id="missing")
        with pytest.raises(grpc.aio.AioRpcError) as get_session:
            await planner.stub.GetSession(planner_pb2.GetSessionRequest(session_id="missing"))
        with pytest.raises(grpc.aio.AioRpcError) as get_run:
            await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id="missing"))
        with pytest.raises(grpc.aio.AioRpcError) as cancel_run:
            await planner.stub.CancelRun(planner_pb2.CancelRunRequest(run_id="missing"))

    for info in (run_in_unknown, get_session):
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "session 'missing' does not exist; create one or leave session_id empty" in info.value.details()
    for info in (get_run, cancel_run):
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "run 'missing' does not exist" in info.value.details()


async def test_runs_an_older_planner_left_running_end_aborted_at_startup(config) -> None:
    store = RunStore(config.planner.db_path)
    session = await store.create_session()
    run = await store.create_run(session.session_id, "What is the capital of France?")
    await store.close()

    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:  # resumes what it finds at start
        stored = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=run.run_id))

    assert stored.state == planner_pb2.RUN_STATE_FAILED
    assert (stored.events[-1].sequence, stored.events[-1].error.code) == (1, "ABORTED")
    assert "run the task again" in stored.events[-1].error.message


def test_planner_exports_what_its_modules_define() -> None:
    import services.planner

    assert set(services.planner.__all__) == {name for name in dir(services.planner) if not name.startswith("_")} - {
        "a2a", "agents", "clients", "convert", "executor", "feedback", "grounding", "guardrails", "journal", "policies",
        "prompt", "pg_store", "quotas", "run_spans", "runs", "server", "state", "store", "tool_sources", "types",
    }  # fmt: skip
    assert all(getattr(services.planner, name) is not None for name in services.planner.__all__)

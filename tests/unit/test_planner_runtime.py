"""The agent runtime through an in-process planner: concurrent tool calls, approvals across restarts, resumed runs,
re-planning and WatchRun from any sequence. Model and tools are recording fakes."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from meshpilot.planner.v1 import agents_pb2, planner_pb2
from services.common import load_config
from services.common.approval import ApprovalSigner
from services.planner.state import AgentRef, CallRecord, Phase, RunSnapshot, StepRecord
from services.planner.store import RunState, RunStore
from services.planner.types import Budget, ToolOutcome
from tests.unit.planner_fakes import FACTS, FakeTools, Planner, ScriptedLLM, answer, call

KENYA = {"country": "Kenya", "capital": "Nairobi", "currency": "Kenyan shilling (KES)", "region": "Africa"}
SIGNER = ApprovalSigner(b"k" * 64)


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0}})


def kinds(events):
    return [event.WhichOneof("event") for event in events]


def react(*calls, thought="look them up"):
    return json.dumps({"thought": thought, "tool_calls": [{"tool": t, "arguments": a} for t, a in calls]})


def react_answer(text):
    return json.dumps({"thought": "done", "final_answer": text})


async def create_agent(planner, name, policy="react", **spec):
    spec.setdefault("instructions", "You answer geography questions.")
    spec.setdefault("tools", ["*"])
    request = agents_pb2.CreateAgentRequest(
        name=name, spec=agents_pb2.AgentSpec(policy=agents_pb2.PolicySpec(name=policy), **spec)
    )
    return await planner.agents.CreateAgent(request)


async def start(planner, task, agent, **budget):
    """The Run stream and its events up to (and including) the first approval request or the end."""
    stream = planner.stub.Run(planner_pb2.RunRequest(task=task, agent=agent, budget=planner_pb2.RunBudget(**budget)))
    events = []
    async for event in stream:
        events.append(event)
        if event.WhichOneof("event") in ("approval_requested", "final_answer", "error"):
            break
    stream.cancel()
    return events


async def wait_state(planner, run_id, state):
    for _ in range(500):
        run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=run_id))
        if run.state == state:
            return run
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} did not reach {state}: {run.state}")


async def test_react_runs_several_tool_calls_of_one_step_concurrently(config) -> None:
    async def slow_lookup(name, arguments):
        await asyncio.sleep(0.2)
        facts = {**FACTS, "Kenya": KENYA}[arguments["country"]]
        return ToolOutcome(result=facts, duration_s=0.2)

    tools = FakeTools()
    tools.execute_hook = slow_lookup
    lookups = [("country_facts", {"country": c}) for c in ("France", "Japan", "Kenya")]
    llm = ScriptedLLM([react(*lookups), react_answer("Paris, Tokyo and Nairobi.")])
    async with Planner(config, llm, tools) as planner:
        await create_agent(planner, "geo")
        events = await planner.run("What are the capitals of France, Japan and Kenya?", agent="geo")

    calls = [e.tool_call for e in events if e.HasField("tool_call")]
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert [c.step for c in calls] == [1, 1, 1] and len(results) == 3
    assert {c.call_id for c in calls} == {"call-1-1", "call-1-2", "call-1-3"}
    spans = [(r.start_time.ToNanoseconds(), r.start_time.ToNanoseconds() + r.duration.ToNanoseconds()) for r in results]
    assert max(begin for begin, _ in spans) < min(end for _, end in spans), "the three calls did not overlap"
    assert events[-1].final_answer.answer == "Paris, Tokyo and Nairobi."
    observations = llm.requests[1]["messages"][-1]["content"]
    assert all(capital in observations for capital in ("Paris", "Tokyo", "Nairobi"))
    schema = llm.requests[0]["schema"]["anyOf"][0]["properties"]["tool_calls"]
    assert schema["maxItems"] == 4
    llm.assert_consumed()


async def test_plan_execute_replans_when_a_step_fails(config) -> None:
    llm = ScriptedLLM(
        [
            json.dumps({"plan": ["Look up Atlantis", "Answer"]}),
            json.dumps({"tool_calls": [{"tool": "country_facts", "arguments": {"country": "Atlantis"}}]}),
            json.dumps({"plan": ["Look up France"]}),
            json.dumps({"tool_calls": [{"tool": "country_facts", "arguments": {"country": "France"}}]}),
            json.dumps({"final_answer": "Paris"}),
        ]
    )
    async with Planner(config, llm, FakeTools()) as planner:
        await create_agent(planner, "planner-agent", policy="plan_execute")
        events = await planner.run("Capital of France?", agent="planner-agent")

    plans = [e.plan for e in events if e.HasField("plan")]
    assert [(p.revision, list(p.steps)) for p in plans] == [
        (1, ["Look up Atlantis", "Answer"]),
        (2, ["Look up France"]),
    ]
    errors = [e.tool_result.error for e in events if e.HasField("tool_result") and e.tool_result.error]
    assert errors == ["no country named 'Atlantis'"]
    assert events[-1].final_answer.answer == "Paris"
    assert "new plan" in llm.requests[2]["messages"][-1]["content"]
    llm.assert_consumed()


async def test_an_approval_survives_a_restart_and_the_approved_call_runs_with_a_token(config) -> None:
    tools = FakeTools()
    llm = ScriptedLLM([react(("calculator", {"expression": "17 * 23"})), react_answer("391")])
    async with Planner(config, llm, tools, signer=SIGNER) as planner:
        await create_agent(planner, "careful", approval_required=["calculator"])
        events = await start(planner, "What is 17 * 23?", "careful")
        run_id = events[0].run_id
        waiting = await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
        request = events[-1].approval_requested
        assert (request.tool, request.call_id) == ("calculator", "call-1")
        assert "requires approval" in request.reason
        assert [p.call_id for p in waiting.pending_approvals] == ["call-1"]
        assert tools.calls == []

        await planner.restart()
        assert (await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)).pending_approvals

        edited = struct_pb2.Struct()
        edited.update({"expression": "17*23"})
        await planner.stub.ApproveToolCall(
            planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id="call-1", arguments=edited, comment="ok")
        )
        done = await wait_state(planner, run_id, planner_pb2.RUN_STATE_SUCCEEDED)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await planner.stub.ApproveToolCall(planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id="call-1"))

    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert done.answer == "391"
    executed = tools.requests[-1]
    assert executed["arguments"] == {"expression": "17*23"}
    SIGNER.verify(
        executed["approval_token"],
        run_id=run_id,
        call_id="call-1",
        tool="calculator",
        arguments={"expression": "17*23"},
    )
    decision = next(e.approval_decision for e in done.events if e.HasField("approval_decision"))
    assert decision.approved and decision.comment == "ok"
    llm.assert_consumed()


async def test_a_rejected_call_becomes_the_observation_the_model_reads(config) -> None:
    tools = FakeTools()
    llm = ScriptedLLM([react(("calculator", {"expression": "2+2"})), react_answer("I may not calculate that.")])
    async with Planner(config, llm, tools, signer=SIGNER) as planner:
        await create_agent(planner, "careful", approval_required=["calculator"])
        run_id = (await start(planner, "What is 2+2?", "careful"))[0].run_id
        await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
        await planner.stub.RejectToolCall(
            planner_pb2.RejectToolCallRequest(run_id=run_id, call_id="call-1", reason="not today")
        )
        done = await wait_state(planner, run_id, planner_pb2.RUN_STATE_SUCCEEDED)

    assert tools.calls == []
    result = next(e.tool_result for e in done.events if e.HasField("tool_result"))
    assert result.error == "a human rejected this call: not today"
    assert "not today" in llm.requests[1]["messages"][-1]["content"]


async def test_time_spent_waiting_for_approval_is_not_charged_to_the_budget(config) -> None:
    llm = ScriptedLLM([react(("calculator", {"expression": "1+1"})), react_answer("2")])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_agent(planner, "careful", approval_required=["calculator"])
        run_id = (await start(planner, "1+1?", "careful", timeout=duration_pb2.Duration(nanos=500_000_000)))[0].run_id
        await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
        await asyncio.sleep(0.8)
        await planner.stub.ApproveToolCall(planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id="call-1"))
        done = await wait_state(planner, run_id, planner_pb2.RUN_STATE_SUCCEEDED)

    assert done.answer == "2"


async def test_approval_errors_name_what_is_wrong(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run()
        run_id = events[0].run_id
        codes = {}
        for name, request in {
            "unknown run": planner_pb2.ApproveToolCallRequest(run_id="nope", call_id="call-1"),
            "ended run": planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id="call-1"),
        }.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await planner.stub.ApproveToolCall(request)
            codes[name] = info.value.code()

    assert codes == {"unknown run": grpc.StatusCode.NOT_FOUND, "ended run": grpc.StatusCode.FAILED_PRECONDITION}


async def test_approving_an_unknown_call_of_a_waiting_run_is_not_found(config) -> None:
    llm = ScriptedLLM([react(("calculator", {"expression": "1+1"}))])
    async with Planner(config, llm, FakeTools(), signer=SIGNER) as planner:
        await create_agent(planner, "careful", approval_required=["calculator"])
        run_id = (await start(planner, "1+1?", "careful"))[0].run_id
        await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await planner.stub.RejectToolCall(planner_pb2.RejectToolCallRequest(run_id=run_id, call_id="call-9"))
        cancelled = await planner.stub.CancelRun(planner_pb2.CancelRunRequest(run_id=run_id))

    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "has no tool call 'call-9'" in info.value.details()
    assert cancelled.state == planner_pb2.RUN_STATE_CANCELLED
    assert cancelled.events[-1].error.code == "CANCELLED"


async def test_watch_run_after_k_replays_exactly_the_events_after_k(config) -> None:
    async with Planner(
        config, ScriptedLLM([call("country_facts", country="France"), answer("Paris")]), FakeTools()
    ) as planner:
        events = await planner.run()
        run_id = events[0].run_id
        for k in (0, 3, len(events) - 1, len(events)):
            replay = [
                e async for e in planner.stub.WatchRun(planner_pb2.WatchRunRequest(run_id=run_id, after_sequence=k))
            ]
            assert replay == events[k:]
        codes = []
        for request in (
            planner_pb2.WatchRunRequest(run_id=run_id, after_sequence=len(events) + 1),
            planner_pb2.WatchRunRequest(run_id=run_id, after_sequence=-1),
            planner_pb2.WatchRunRequest(run_id="x" * 100_000),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [e async for e in planner.stub.WatchRun(request)]
            codes.append((info.value.code(), len(info.value.details())))

    assert [code for code, _ in codes] == [
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    ]
    assert all(length < 300 for _, length in codes)


async def test_a_client_that_drops_its_stream_resumes_live_without_gap_or_duplicate(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("Paris")])
    llm.gate = asyncio.Event()
    async with Planner(config, llm, FakeTools()) as planner:
        stream = planner.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))
        first = await stream.read()
        stream.cancel()
        watch = planner.stub.WatchRun(planner_pb2.WatchRunRequest(run_id=first.run_id, after_sequence=first.sequence))
        llm.gate.set()
        rest = [e async for e in watch]
        journal = (await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=first.run_id))).events

    assert [first, *rest] == list(journal)
    assert [e.sequence for e in rest] == list(range(2, len(journal) + 1))


async def test_a_resumed_run_asks_the_model_only_for_steps_not_journaled(config) -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer("The capital of France is Paris.")])
    tools = FakeTools()
    llm.holds[1] = asyncio.Event()  # the second model call hangs: the planner stops under it
    async with Planner(config, llm, tools) as planner:
        stream = planner.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"))
        first = await stream.read()
        stream.cancel()
        await wait_until(lambda: len(llm.requests) == 2)
        await planner.restart()
        done = await wait_state(planner, first.run_id, planner_pb2.RUN_STATE_SUCCEEDED)

    assert len(tools.calls) == 1, "the tool ran again"
    assert len(llm.requests) == 3  # step 1, step 2 (lost with the first planner), step 2 again
    assert [e.sequence for e in done.events] == list(range(1, len(done.events) + 1))
    assert kinds(done.events).count("model_output") == 2
    assert done.answer == "The capital of France is Paris."


async def test_a_journaled_call_without_its_result_is_retried_under_its_idempotency_key(config) -> None:
    tools = FakeTools()
    store = RunStore(config.planner.db_path)
    session = await store.create_session()
    run = await store.create_run(session.session_id, "What is the capital of France?")
    snapshot = RunSnapshot(
        run.run_id,
        session.session_id,
        run.task,
        AgentRef("default", 1, _default_spec(config)),
        Budget(6, 10_000, 60.0),
        phase=Phase.RUN_TOOLS,
        step=1,
        steps=[
            StepRecord(1, call("country_facts", country="France"), [
                CallRecord("call-1", "country_facts", {"country": "France"}, f"{run.run_id}/call-1"),
            ]),
        ],
        sequence=3,
    )  # fmt: skip
    await store.commit(
        run.run_id,
        [(1, b""), (2, b""), (3, b"")],
        snapshot=snapshot.to_json(),
        state=RunState.RUNNING,
        usage=snapshot.usage,
    )
    await store.close()
    # The tools service ran the call before the planner died: it holds the outcome under the key.
    tools.stored[f"{run.run_id}/call-1"] = ToolOutcome(result=FACTS["France"], duration_s=0.01)

    llm = ScriptedLLM([answer("The capital of France is Paris.")])
    async with Planner(config, llm, tools) as planner:
        done = await wait_state(planner, run.run_id, planner_pb2.RUN_STATE_SUCCEEDED)

    result = planner_pb2.RunEvent.FromString(done.events[3].SerializeToString()).tool_result
    assert result.replayed and result.result.struct_value["capital"] == "Paris"
    assert tools.calls == []
    assert done.answer == "The capital of France is Paris."
    llm.assert_consumed()


def _default_spec(config):
    from services.planner.agents import default_agent

    return default_agent(config.planner).definition.to_dict()


async def wait_until(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_call_to_a_tool_outside_the_agents_list_is_refused_as_an_observation(config) -> None:
    tools = FakeTools()
    llm = ScriptedLLM([react(("country_facts", {"country": "France"})), react_answer("I may only calculate.")])
    async with Planner(config, llm, tools) as planner:
        await create_agent(planner, "calc-only", tools=["calculator"])
        events = await planner.run("What is the capital of France?", agent="calc-only")

    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.error == "tool 'country_facts' is not one of this agent's tools: calculator"
    assert tools.calls == []
    assert events[-1].final_answer.answer == "I may only calculate."


async def test_a_tool_the_tools_service_refuses_is_an_observation_not_a_failed_run(config) -> None:
    from services.common import PermissionDeniedError

    async def refuse(name, arguments):
        raise PermissionDeniedError("tool 'calculator' requires approval")

    tools = FakeTools()
    tools.execute_hook = refuse
    llm = ScriptedLLM([react(("calculator", {"expression": "1+1"})), react_answer("I was not allowed.")])
    async with Planner(config, llm, tools) as planner:
        await create_agent(planner, "geo")
        events = await planner.run("1+1?", agent="geo")

    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.error == "tool 'calculator' requires approval"
    assert events[-1].final_answer.answer == "I was not allowed."


async def test_a_planner_bug_ends_the_run_internal_with_an_incident_id_not_a_trace(config) -> None:
    llm = ScriptedLLM([])  # asking the model raises AssertionError: a bug, not a dependency's error
    async with Planner(config, llm, FakeTools()) as planner:
        events = await planner.run()

    assert kinds(events) == ["step_started", "error"]
    assert events[-1].error.code == "INTERNAL"
    assert "incident" in events[-1].error.message and "Traceback" not in events[-1].error.message


async def test_when_one_call_ends_the_run_its_sibling_is_stopped_before_the_end_is_journaled(config) -> None:
    from services.common import ResourceExhaustedError

    async def hook(name, arguments):
        if name == "calculator":
            raise ResourceExhaustedError("tools: overloaded")
        await asyncio.sleep(0.3)
        return ToolOutcome(result=FACTS["France"], duration_s=0.3)

    tools = FakeTools()
    tools.execute_hook = hook
    llm = ScriptedLLM([react(("calculator", {"expression": "1+1"}), ("country_facts", {"country": "France"}))])
    async with Planner(config, llm, tools) as planner:
        await create_agent(planner, "geo")
        events = await planner.run("1+1 and France?", agent="geo")
        await asyncio.sleep(0.5)  # the sibling would have finished by now
        run = await planner.stub.GetRun(planner_pb2.GetRunRequest(run_id=events[0].run_id))

    assert events[-1].error.code == "RESOURCE_EXHAUSTED"
    assert list(run.events) == events, "an event was journaled after the run's end"
    assert not any(e.HasField("tool_result") for e in run.events)


async def test_list_runs_and_decisions_refuse_nonsense_with_bounded_messages(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        codes = []
        for call in (
            planner.stub.ListRuns(planner_pb2.ListRunsRequest(page_size=501)),
            planner.stub.ListRuns(planner_pb2.ListRunsRequest(page_size=-1)),
            planner.stub.ListRuns(planner_pb2.ListRunsRequest(state=42)),
            planner.stub.RejectToolCall(
                planner_pb2.RejectToolCallRequest(run_id="r", call_id="c", reason="x" * 100_000)
            ),
            planner.stub.ApproveToolCall(
                planner_pb2.ApproveToolCallRequest(run_id="r", call_id="c", comment="x" * 100_000)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            codes.append((info.value.code(), len(info.value.details())))

    assert [code for code, _ in codes] == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert all(length < 200 for _, length in codes)

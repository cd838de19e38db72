"""Agent runs over HTTP (services/edge/runs_api.py) against an in-process planner with a scripted model and fake
tools: every endpoint, the server-sent event streams and their resumption, and each refusal's OpenAI-style body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI

from meshpilot.planner.v1 import agents_pb2, planner_pb2, planner_pb2_grpc
from services.common import load_config
from services.common.approval import ApprovalSigner
from services.common.auth import ApiKeyStore
from services.edge import runs_api
from services.edge.app import create_app
from tests.conftest import free_port
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call

SIGNER = ApprovalSigner(b"k" * 64)
FRANCE = "What is the capital of France?"


def edge_app(planner: Planner, config: Any) -> FastAPI:
    """The edge app (create_app) with its channels to the in-process planner."""
    app = create_app(config, planner_channel=planner.channel, inference_channel=planner.channel)
    app.state.config = config
    return app


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})


def script(*outputs: str) -> ScriptedLLM:
    return ScriptedLLM(list(outputs))


def geo_script() -> ScriptedLLM:
    return script(call("country_facts", country="France"), answer("The capital of France is Paris."))


async def careful_agent(planner: Planner) -> None:
    spec = agents_pb2.AgentSpec(
        instructions="You answer geography questions.",
        tools=["*"],
        approval_required=["country_facts"],
        policy=agents_pb2.PolicySpec(name="guided"),
    )
    await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="careful", spec=spec))


class Edge:
    """An in-process planner and an HTTP client of the runs router in front of it."""

    def __init__(self, planner: Planner, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.planner, self.app, self.client = planner, app, client

    async def wait_state(self, run_id: str, state: str) -> dict[str, Any]:
        for _ in range(500):
            run = (await self.client.get(f"/v1/runs/{run_id}")).json()
            if run["state"] == state:
                return run
            await asyncio.sleep(0.01)
        raise AssertionError(f"run {run_id} did not reach {state}: {run['state']}")

    async def waiting_run(self) -> dict[str, Any]:
        """A run of the agent 'careful' paused at its country_facts call."""
        reply = await self.client.post("/v1/agents/careful/runs", json={"task": FRANCE})
        assert reply.status_code == 200, reply.text
        assert reply.json()["state"] == "RUN_STATE_WAITING_FOR_APPROVAL"
        return reply.json()


@asynccontextmanager
async def edge_of(config: Any, llm: ScriptedLLM, tools: FakeTools | None = None) -> AsyncIterator[Edge]:
    async with Planner(config, llm, tools or FakeTools(), signer=SIGNER) as planner:
        app = edge_app(planner, config)
        async with client_of(app) as client:
            yield Edge(planner, app, client)


@asynccontextmanager
async def client_of(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of ``app`` in this process, its lifespan (channels, settings) run around it."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client,
    ):
        yield client


def sse_events(text: str) -> list[dict[str, Any]]:
    """The events of a text/event-stream body: {"id", "event", "data"} (data parsed as JSON); pings left out."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def kind(event: dict[str, Any]) -> str:
    return next(k for k in event["data"] if k not in ("run_id", "session_id", "sequence", "time"))


def assert_error(reply: httpx.Response, status: int, *words: str, param: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]
    assert "Traceback" not in reply.text
    if param is not None:
        assert error["param"] == param
    return error


async def test_agents_are_listed_default_first_with_their_spec(config) -> None:
    async with edge_of(config, script()) as edge:
        await careful_agent(edge.planner)
        reply = await edge.client.get("/v1/agents")

    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [a["name"] for a in body["data"]] == ["default", "careful"]
    assert body["data"][1]["spec"]["approval_required"] == ["country_facts"]


async def test_a_run_started_without_streaming_answers_with_the_ended_run(config) -> None:
    async with edge_of(config, geo_script()) as edge:
        reply = await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE})
        run = reply.json()

    assert reply.status_code == 200
    assert run["state"] == "RUN_STATE_SUCCEEDED"
    assert run["answer"] == "The capital of France is Paris."
    assert run["agent"] == "default" and run["task"] == FRANCE
    assert [e["sequence"] for e in run["events"]] == list(range(1, run["last_sequence"] + 1))


async def test_a_streamed_run_sends_every_event_with_its_sequence_as_the_event_id(config) -> None:
    async with edge_of(config, geo_script()) as edge:
        reply = await edge.client.post(
            "/v1/agents/default/runs", json={"task": FRANCE, "stream": True, "budget": {"max_steps": 4}}
        )
        stored = (await edge.client.get(f"/v1/runs/{sse_events(reply.text)[0]['data']['run_id']}")).json()

    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert [int(e["id"]) for e in events] == [e["data"]["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"] for e in events] == stored["events"]
    kinds = [kind(e) for e in events]
    assert "tool_call" in kinds and "tool_result" in kinds and kinds[-1] == "final_answer"
    call_event = next(e["data"]["tool_call"] for e in events if kind(e) == "tool_call")
    assert call_event["arguments"] == {"country": "France"}


async def test_wait_false_answers_202_at_once_and_the_events_follow_from_any_sequence(config) -> None:
    async with edge_of(config, geo_script()) as edge:
        reply = await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE, "wait": False})
        run_id = reply.json()["run_id"]
        done = await edge.wait_state(run_id, "RUN_STATE_SUCCEEDED")
        everything = sse_events((await edge.client.get(f"/v1/runs/{run_id}/events")).text)
        by_header = await edge.client.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "2"})
        by_query = await edge.client.get(f"/v1/runs/{run_id}/events?after=3")
        # The header is what an EventSource sends when it reconnects: it wins over the URL's ?after=.
        both = await edge.client.get(f"/v1/runs/{run_id}/events?after=0", headers={"Last-Event-ID": "4"})
        at_end = await edge.client.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(len(everything))})

    assert reply.status_code == 202
    last = done["last_sequence"]
    assert [e["data"]["sequence"] for e in everything] == list(range(1, last + 1))
    assert [int(e["id"]) for e in sse_events(by_header.text)] == list(range(3, last + 1))
    assert [int(e["id"]) for e in sse_events(by_query.text)] == list(range(4, last + 1))
    assert [int(e["id"]) for e in sse_events(both.text)] == list(range(5, last + 1))
    # Nothing after the end of an ended run: 204 tells an EventSource to stop reconnecting.
    assert at_end.status_code == 204 and at_end.content == b""


async def test_an_approval_resumes_a_waiting_run_with_the_edited_arguments(config) -> None:
    tools = FakeTools()
    async with edge_of(config, geo_script(), tools) as edge:
        await careful_agent(edge.planner)
        waiting = await edge.waiting_run()
        run_id = waiting["run_id"]
        follow = asyncio.create_task(edge.client.get(f"/v1/runs/{run_id}/events"))
        listed = (await edge.client.get("/v1/runs?state=waiting_for_approval")).json()
        approved = await edge.client.post(
            f"/v1/runs/{run_id}/tool-calls/call-1/approve",
            json={"arguments": {"country": "France"}, "comment": "fine"},
        )
        done = await edge.wait_state(run_id, "RUN_STATE_SUCCEEDED")
        followed = sse_events((await follow).text)
        again = await edge.client.post(f"/v1/runs/{run_id}/tool-calls/call-1/approve")

    pending = waiting["pending_approvals"]
    assert [(p["call_id"], p["tool"], p["arguments"]) for p in pending] == [
        ("call-1", "country_facts", {"country": "France"})
    ]
    assert [r["run_id"] for r in listed["data"]] == [run_id]
    assert approved.status_code == 200
    assert tools.requests[-1]["arguments"] == {"country": "France"} and tools.requests[-1]["approval_token"]
    assert done["answer"] == "The capital of France is Paris."
    # The stream opened while the run waited carried it to its end, approval and all.
    kinds = [kind(e) for e in followed]
    assert kinds.index("approval_requested") < kinds.index("approval_decision") < kinds.index("tool_result")
    assert kinds[-1] == "final_answer"
    decision = next(e["data"]["approval_decision"] for e in followed if kind(e) == "approval_decision")
    assert decision["approved"] is True and decision["comment"] == "fine"
    assert_error(again, 409, "nothing waits for approval")


async def test_a_rejection_becomes_the_calls_error_observation(config) -> None:
    llm = script(call("country_facts", country="France"), answer("I could not find the answer."))
    async with edge_of(config, llm) as edge:
        await careful_agent(edge.planner)
        run_id = (await edge.waiting_run())["run_id"]
        rejected = await edge.client.post(f"/v1/runs/{run_id}/tool-calls/call-1/reject", json={"reason": "not now"})
        done = await edge.wait_state(run_id, "RUN_STATE_SUCCEEDED")

    assert rejected.status_code == 200
    result = next(e["tool_result"] for e in done["events"] if "tool_result" in e)
    assert result["error"] == "a human rejected this call: not now"


async def test_cancel_stops_a_waiting_run_and_runs_are_listed_by_state_and_page(config) -> None:
    async with edge_of(config, script(*[call("country_facts", country="France")] * 3)) as edge:
        await careful_agent(edge.planner)
        ids = [(await edge.waiting_run())["run_id"] for _ in range(3)]
        cancelled = await edge.client.post(f"/v1/runs/{ids[0]}/cancel")
        waiting = (await edge.client.get("/v1/runs", params={"state": "WAITING"})).json()
        first = (await edge.client.get("/v1/runs", params={"limit": 2})).json()
        second = (await edge.client.get("/v1/runs", params={"limit": 2, "offset": 2})).json()
        by_state = (await edge.client.get("/v1/runs", params={"state": "RUN_STATE_CANCELLED"})).json()
        for run_id in ids[1:]:
            await edge.client.post(f"/v1/runs/{run_id}/cancel")

    assert cancelled.status_code == 200 and cancelled.json()["state"] == "RUN_STATE_CANCELLED"
    assert [r["run_id"] for r in waiting["data"]] == [ids[2], ids[1]]
    assert [r["run_id"] for r in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    assert [r["run_id"] for r in second["data"]] == [ids[0]] and second["has_more"] is False
    assert [r["run_id"] for r in by_state["data"]] == [ids[0]]


async def test_refusals_of_the_planner_keep_their_meaning_over_http(config) -> None:
    async with edge_of(config, script()) as edge:
        unknown_agent = await edge.client.post("/v1/agents/nobody/runs", json={"task": FRANCE})
        empty_task = await edge.client.post("/v1/agents/default/runs", json={"task": "   ", "stream": True})
        unknown_run = await edge.client.get("/v1/runs/no-such-run")
        unknown_events = await edge.client.get("/v1/runs/no-such-run/events")
        cancel_unknown = await edge.client.post("/v1/runs/no-such-run/cancel")
        approve_unknown = await edge.client.post("/v1/runs/no-such-run/tool-calls/call-1/approve")
        reject_unknown = await edge.client.post("/v1/runs/no-such-run/tool-calls/call-1/reject")
        bad_budget = await edge.client.post(
            "/v1/agents/default/runs", json={"task": FRANCE, "budget": {"max_steps": -1}}
        )

    assert_error(unknown_agent, 404, "nobody")
    assert_error(empty_task, 400, "task is empty")
    for reply in (unknown_run, unknown_events, cancel_unknown, approve_unknown, reject_unknown):
        assert_error(reply, 404, "no-such-run")
    assert_error(bad_budget, 400, "budget.max_steps")


async def test_bad_bodies_and_queries_are_refused_naming_what_to_change(config) -> None:
    huge = "x" * (2 << 20)
    async with edge_of(config, geo_script()) as edge:
        run_id = (await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE})).json()["run_id"]
        replies = {
            "not json": await edge.client.post("/v1/agents/default/runs", content=b"{task: 1"),
            "array": await edge.client.post("/v1/agents/default/runs", json=[FRANCE]),
            "unknown field": await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE, "model": "x"}),
            "task number": await edge.client.post("/v1/agents/default/runs", json={"task": 7}),
            "stream string": await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE, "stream": "yes"}),
            "agent in body": await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE, "agent": "x"}),
            "huge": await edge.client.post("/v1/agents/default/runs", json={"task": huge}),
            "state": await edge.client.get("/v1/runs", params={"state": "sleeping"}),
            "limit": await edge.client.get("/v1/runs", params={"limit": "9999"}),
            "negative offset": await edge.client.get("/v1/runs", params={"offset": "-1"}),
            "offset past 500": await edge.client.get("/v1/runs", params={"offset": "480", "limit": "50"}),
            "last event id": await edge.client.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "abc"}),
            "after beyond": await edge.client.get(f"/v1/runs/{run_id}/events", params={"after": "999"}),
            "arguments": await edge.client.post(f"/v1/runs/{run_id}/tool-calls/c/approve", json={"arguments": [1]}),
            "run id in body": await edge.client.post(f"/v1/runs/{run_id}/tool-calls/c/reject", json={"run_id": "y"}),
        }

    assert_error(replies["not json"], 400, "not JSON")
    assert_error(replies["array"], 400, "JSON list")
    assert_error(replies["unknown field"], 400, "model", "RunRequest")
    assert_error(replies["task number"], 400, "task")
    assert_error(replies["stream string"], 400, "true or false", param="stream")
    assert_error(replies["agent in body"], 400, "URL path", param="agent")
    assert_error(replies["huge"], 413, "smaller")
    assert len(replies["huge"].content) < 2000
    assert_error(replies["state"], 400, "sleeping", "waiting_for_approval", param="state")
    assert_error(replies["limit"], 400, "at most 500", param="limit")
    assert_error(replies["negative offset"], 400, "whole number", param="offset")
    assert_error(replies["offset past 500"], 400, "at most 450", param="offset")
    assert_error(replies["last event id"], 400, "abc", param="Last-Event-ID")
    error = assert_error(replies["after beyond"], 400, "999", "last event", param="after")
    assert error["code"] == "out_of_range"
    assert_error(replies["arguments"], 400, "arguments")
    assert_error(replies["run id in body"], 400, "URL path", param="run_id")


async def test_a_long_value_in_a_bad_body_is_not_echoed(config) -> None:
    async with edge_of(config, script()) as edge:
        reply = await edge.client.post("/v1/agents/default/runs", json={"task": FRANCE, "agent_version": "9" * 5000})

    assert reply.status_code == 400
    assert len(reply.json()["error"]["message"]) < 600


async def test_the_callers_bearer_token_reaches_the_planner(tmp_path) -> None:
    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )
    keys = ApiKeyStore(config.auth.keys_path)
    _, key = keys.create("acme")
    keys.close()
    async with edge_of(config, script()) as edge:
        anonymous = await edge.client.get("/v1/agents")
        wrong = await edge.client.get("/v1/runs", headers={"Authorization": "Bearer mpk_wrong"})
        allowed = await edge.client.get("/v1/agents", headers={"Authorization": f"Bearer {key}"})

    assert_error(anonymous, 401)
    assert_error(wrong, 401)
    assert allowed.status_code == 200 and allowed.json()["data"][0]["name"] == "default"


async def test_an_unreachable_planner_is_503_not_a_trace(config) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    async with channel, client_of(create_app(config, planner_channel=channel, inference_channel=channel)) as client:
        listed = await client.get("/v1/runs")
        started = await client.post("/v1/agents/default/runs", json={"task": FRANCE, "stream": True})

    assert_error(listed, 503, "planner")
    assert_error(started, 503, "planner")


class BrokenStream:
    """A Run/WatchRun call that yields ``events`` and then fails as a planner that went away does."""

    def __init__(self, events: list[planner_pb2.RunEvent]) -> None:
        self.events = list(events)
        self.cancelled = False

    async def read(self) -> Any:
        if self.events:
            return self.events.pop(0)
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_stream_that_breaks_ends_with_a_stream_error_event_after_what_it_sent() -> None:
    first = planner_pb2.RunEvent(run_id="r", sequence=1, step_started=planner_pb2.StepStarted(step=1))
    second = planner_pb2.RunEvent(run_id="r", sequence=2, step_started=planner_pb2.StepStarted(step=2))
    call = BrokenStream([second])
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> Any:
        return runs_api._event_stream(call, first)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        reply = await client.get("/stream")

    events = sse_events(reply.text)
    assert [e.get("id") for e in events] == ["1", "2", None]
    assert events[-1]["event"] == "stream_error"
    assert events[-1]["data"]["error"]["code"] == "unavailable"
    assert call.cancelled


async def test_health_reports_each_service_and_503_while_one_is_unreachable(config) -> None:
    async with edge_of(config, script()) as edge:
        port = int(edge.planner.server.address.rsplit(":", 1)[1])
        down = free_port()
        edge.app.state.config = load_config(
            planner={"server": {"port": port}},
            tools={"server": {"port": port}},
            knowledge={"server": {"port": port}},
            inference={"server": {"port": down}},
        )
        degraded = await edge.client.get("/v1/health")
        edge.app.state.config = load_config(
            **{name: {"server": {"port": port}} for name in ("planner", "tools", "knowledge", "inference")}
        )
        healthy = await edge.client.get("/v1/health")

    assert degraded.status_code == 503
    statuses = {s["name"]: s["status"] for s in degraded.json()["services"]}
    assert statuses == {"planner": "SERVING", "tools": "SERVING", "knowledge": "SERVING", "inference": "UNREACHABLE"}
    assert healthy.status_code == 200 and healthy.json()["status"] == "serving"


async def test_health_without_a_config_on_the_app_reads_the_one_the_process_starts_with(config, monkeypatch) -> None:
    async with edge_of(config, script()) as edge:
        port = edge.planner.server.address.rsplit(":", 1)[1]
        for name in ("PLANNER", "TOOLS", "KNOWLEDGE", "INFERENCE"):
            monkeypatch.setenv(f"MESHPILOT_{name}__SERVER__PORT", port)
        del edge.app.state.config
        healthy = await edge.client.get("/v1/health")

    assert healthy.status_code == 200
    assert {s["target"] for s in healthy.json()["services"]} == {f"127.0.0.1:{port}"}


class SilentPlanner(planner_pb2_grpc.PlannerServiceServicer):
    """A planner whose Run stream ends without a single event (a broken peer, not ours)."""

    async def Run(self, request: planner_pb2.RunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        return
        yield


async def test_a_run_stream_that_ends_before_its_first_event_is_a_502(config) -> None:
    server = grpc.aio.server()
    planner_pb2_grpc.add_PlannerServiceServicer_to_server(SilentPlanner(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        async with channel, client_of(create_app(config, planner_channel=channel, inference_channel=channel)) as client:
            reply = await client.post("/v1/agents/default/runs", json={"task": FRANCE})
    finally:
        await server.stop(0)

    assert_error(reply, 502, "before its first event")

"""Tenants at the planner's front door: with authentication on, every call needs a key, and a tenant never reads,
continues, cancels, watches or approves another's runs, sessions or agents (NOT_FOUND: not even that they exist)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc
from services.common import load_config
from services.common.approval import ApprovalSigner
from services.common.auth import ApiKeyStore, current_principal
from services.common.clients import create_channel
from services.planner.types import ToolSpec
from tests.unit.planner_fakes import COUNTRY_FACTS, FakeTools, Planner, ScriptedLLM, answer, call

NOTES = ToolSpec(
    "append_note",
    "Appends a note.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    requires_approval=True,
)


@pytest.fixture
def config(tmp_path):
    return load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )


class Tenant:
    """Stubs of one tenant's key on the planner."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.runs = planner_pb2_grpc.PlannerServiceStub(channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)


@asynccontextmanager
async def tenants(planner: Planner, *names: str) -> AsyncIterator[list[Tenant]]:
    keys = ApiKeyStore(planner.config.auth.keys_path)
    channels = [create_channel(planner.server.address, api_key=keys.create(name)[1]) for name in names]
    try:
        yield [Tenant(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()
        keys.close()


async def code_of(call) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):  # a stream: the status comes with its end
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def events(stream) -> list[planner_pb2.RunEvent]:
    return [event async for event in stream]


async def test_without_a_key_every_planner_call_is_unauthenticated_but_health_answers(config) -> None:
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        for request in (
            planner.stub.GetRun(planner_pb2.GetRunRequest(run_id="x")),
            planner.agents.ListAgents(agents_pb2.ListAgentsRequest()),
        ):
            assert await code_of(request) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await events(planner.stub.Run(planner_pb2.RunRequest(task="What is the capital of France?")))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        checked = await health_pb2_grpc.HealthStub(planner.channel).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_tenant_cannot_touch_another_tenants_runs_sessions_or_agents(config) -> None:
    outputs = [call("country_facts", country="France"), call("append_note", text="secret plan")]
    llm = ScriptedLLM([*outputs, answer("Done.")])
    signer = ApprovalSigner(b"k" * 32)
    async with (
        Planner(config, llm, FakeTools([COUNTRY_FACTS, NOTES]), signer) as planner,
        tenants(planner, "acme", "globex") as (acme, globex),
    ):
        await acme.agents.CreateAgent(
            agents_pb2.CreateAgentRequest(
                name="tutor",
                spec=agents_pb2.AgentSpec(instructions="Tutor.", tools=["country_facts", "append_note"]),
            )
        )
        stream = acme.runs.Run(planner_pb2.RunRequest(task="my password is hunter2; note it", agent="tutor"))
        async for event in stream:
            run_id, session_id = event.run_id, event.session_id
            if event.HasField("approval_requested"):
                break
        stream.cancel()
        waiting = await acme.runs.GetRun(planner_pb2.GetRunRequest(run_id=run_id))
        assert waiting.state == planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL
        call_id = waiting.pending_approvals[0].call_id

        attempts = {
            "GetRun": globex.runs.GetRun(planner_pb2.GetRunRequest(run_id=run_id)),
            "WatchRun": globex.runs.WatchRun(planner_pb2.WatchRunRequest(run_id=run_id)),
            "CancelRun": globex.runs.CancelRun(planner_pb2.CancelRunRequest(run_id=run_id)),
            "ApproveToolCall": globex.runs.ApproveToolCall(
                planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id=call_id)
            ),
            "RejectToolCall": globex.runs.RejectToolCall(
                planner_pb2.RejectToolCallRequest(run_id=run_id, call_id=call_id)
            ),
            "GetSession": globex.runs.GetSession(planner_pb2.GetSessionRequest(session_id=session_id)),
            "Run in the session": globex.runs.Run(planner_pb2.RunRequest(task="go on", session_id=session_id)),
            "GetAgent": globex.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor")),
            "Run the agent": globex.runs.Run(planner_pb2.RunRequest(task="go", agent="tutor")),
            "DeleteAgent": globex.agents.DeleteAgent(agents_pb2.DeleteAgentRequest(name="tutor")),
        }
        codes = {name: await code_of(attempt) for name, attempt in attempts.items()}
        assert codes == dict.fromkeys(attempts, grpc.StatusCode.NOT_FOUND)
        listed = await globex.runs.ListRuns(planner_pb2.ListRunsRequest())
        assert listed.runs == []
        agents = await globex.agents.ListAgents(agents_pb2.ListAgentsRequest())
        assert [agent.name for agent in agents.agents] == ["default"]
        # globex may have an agent of the same name, its own.
        await globex.agents.CreateAgent(
            agents_pb2.CreateAgentRequest(name="tutor", spec=agents_pb2.AgentSpec(instructions="Other."))
        )

        # Nothing globex tried changed acme's run: it still waits, and acme approves it.
        assert (await acme.runs.GetRun(planner_pb2.GetRunRequest(run_id=run_id))).state == (
            planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL
        )
        await acme.runs.ApproveToolCall(planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id=call_id))
        finished = await events(acme.runs.WatchRun(planner_pb2.WatchRunRequest(run_id=run_id)))
        assert finished[-1].final_answer.answer == "Done."
        assert [r.run_id for r in (await acme.runs.ListRuns(planner_pb2.ListRunsRequest())).runs] == [run_id]
        acme_tutor = await acme.agents.GetAgent(agents_pb2.GetAgentRequest(name="tutor"))
        assert acme_tutor.spec.instructions == "Tutor."
    assert json.dumps([e.final_answer.answer for e in finished]).count("hunter2") == 0


async def test_with_authentication_off_everything_is_the_default_tenants(tmp_path) -> None:
    config = load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})
    async with Planner(config, ScriptedLLM([answer("Paris.")]), FakeTools()) as planner:
        ran = await planner.run()
        stored = await planner.servicer.store.get_run(ran[0].run_id, tenant="default")
    assert stored.tenant == "default"


class TenantRecordingTools(FakeTools):
    """Records the tenant each tools call acts for (what the tools service reads from the metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.tenants: list[tuple[str, str]] = []

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        self.tenants.append(("list", current_principal().tenant))
        return await super().list_tools(timeout=timeout)

    async def execute(self, call_id, name, arguments, **options):
        self.tenants.append(("execute", current_principal().tenant))
        return await super().execute(call_id, name, arguments, **options)


async def test_a_runs_tool_calls_act_for_its_tenant(config) -> None:
    tools = TenantRecordingTools()
    llm = ScriptedLLM([call("country_facts", country="France"), answer("Paris.")])
    async with Planner(config, llm, tools) as planner, tenants(planner, "acme") as (acme,):
        finished = await events(acme.runs.Run(planner_pb2.RunRequest(task="What is the capital of France?")))
    assert finished[-1].final_answer.answer == "Paris."
    assert ("execute", "acme") in tools.tenants
    assert {tenant for _, tenant in tools.tenants} == {"acme"}

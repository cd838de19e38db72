"""Tool sources at the front door: tenants register their own tools through the planner (authenticated), a real
tools service keeps each tenant's to itself, and a tenant's agent calls them."""

from __future__ import annotations

import json

import grpc
import pytest

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, planner_pb2_grpc, tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2
from services.common import load_config
from services.common.auth import ApiKeyStore
from services.common.clients import create_channel
from services.tools import ToolsService
from tests.unit.planner_fakes import Planner, ScriptedLLM, answer, call
from tests.unit.test_tools_sources import counter_document, openapi_source  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


@pytest.fixture
async def tools_service(tmp_path):
    config = load_config(
        data_dir=str(tmp_path / "tools"),
        tools={"server": {"port": 0, "metrics": False}, "mcp_endpoint": {"enabled": False}},
    )
    service = ToolsService(config)
    await service.start()
    yield service.server.address
    await service.stop()


async def test_tenants_register_tools_through_the_planner_and_only_their_agents_use_them(
    tmp_path,
    tools_service: str,
    counter_document: str,  # noqa: F811 - the fixture imported above
) -> None:
    config = load_config(
        data_dir=str(tmp_path / "planner"),
        planner={"server": {"port": 0, "metrics": False}},
        tools={"server": {"port": int(tools_service.rsplit(":", 1)[1])}},
        auth={"enabled": True},
    )
    llm = ScriptedLLM([call("counter.count_letters", word="meshpilot"), answer("It has 9 letters.")])
    async with Planner(config, llm, None) as planner:  # type: ignore[arg-type]  # the real tools client
        keys = ApiKeyStore(config.auth.keys_path)
        acme_channel = create_channel(planner.server.address, api_key=keys.create("acme")[1])
        globex_channel = create_channel(planner.server.address, api_key=keys.create("globex")[1])
        acme, globex = (tool_sources_pb2_grpc.ToolSourceServiceStub(c) for c in (acme_channel, globex_channel))
        try:
            registered = await acme.RegisterToolSource(
                tools_pb2.RegisterToolSourceRequest(source=openapi_source(counter_document))
            )
            assert list(registered.tools) == ["counter.count_letters"]
            acme_tools = [t.name for t in (await acme.ListTools(tools_pb2.ListToolsRequest())).tools]
            globex_tools = [t.name for t in (await globex.ListTools(tools_pb2.ListToolsRequest())).tools]
            assert "counter.count_letters" in acme_tools and "counter.count_letters" not in globex_tools
            assert (await globex.ListToolSources(tools_pb2.ListToolSourcesRequest())).sources == []
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await globex.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="counter"))
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await acme.RegisterToolSource(
                    tools_pb2.RegisterToolSourceRequest(source=openapi_source("{not", name="broken"))
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # Only acme can make an agent of the tools; globex's definition names a tool it does not have.
            spec = agents_pb2.AgentSpec(instructions="You count letters.", tools=["counter.*"])
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await agents_pb2_grpc.AgentServiceStub(globex_channel).CreateAgent(
                    agents_pb2.CreateAgentRequest(name="counter", spec=spec)
                )
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await agents_pb2_grpc.AgentServiceStub(acme_channel).CreateAgent(
                agents_pb2.CreateAgentRequest(name="counter", spec=spec)
            )
            run = planner_pb2_grpc.PlannerServiceStub(acme_channel).Run(
                planner_pb2.RunRequest(task="How many letters has meshpilot?", agent="counter")
            )
            events = [event async for event in run]
        finally:
            await acme_channel.close()
            await globex_channel.close()
            keys.close()
    results = [json.loads(e.tool_result.result.string_value or "null") for e in events if e.HasField("tool_result")]
    observed = [e.tool_result for e in events if e.HasField("tool_result")]
    assert not observed[0].HasField("error"), observed
    assert events[-1].final_answer.answer == "It has 9 letters.", results

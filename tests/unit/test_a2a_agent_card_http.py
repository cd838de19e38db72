"""The agent card over HTTP: the edge's router, mounted on a test app, reads it from an in-process planner."""

from __future__ import annotations

import httpx
import pytest
from a2a.client.card_resolver import A2ACardResolver
from fastapi import FastAPI

from services.common import load_config
from services.common.auth import ApiKeyStore
from services.edge import agent_card
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM


def edge(planner: Planner) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(agent_card.router)
    app.state.planner_channel = planner.channel
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


async def test_the_a2a_sdk_resolves_the_well_known_card(tmp_path) -> None:
    config = load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner, edge(planner) as http:
        card = await A2ACardResolver(http, "http://edge").get_agent_card()
        raw = (await http.get("/.well-known/agent-card.json")).json()

    assert card.name == "MeshPilot" and [s.id for s in card.skills] == ["default"]
    assert card.supported_interfaces[0].protocol_binding == "GRPC"
    assert raw["supportedInterfaces"][0]["url"] == planner.server.address
    assert raw["capabilities"] == {"streaming": True, "pushNotifications": False, "extendedAgentCard": True}


@pytest.mark.parametrize("key", [None, "mpk_not_a_key"])
async def test_without_a_valid_key_the_card_is_a_401_that_says_what_to_send(tmp_path, key) -> None:
    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner, edge(planner) as http:
        refused = await http.get("/.well-known/agent-card.json", headers=headers)
        keys = ApiKeyStore(config.auth.keys_path)
        good = keys.create("alice")[1]
        keys.close()
        card = await http.get("/.well-known/agent-card.json", headers={"authorization": f"Bearer {good}"})

    assert refused.status_code == 401
    assert refused.json()["error"]["status"] == "UNAUTHENTICATED"
    assert "authorization: Bearer" in refused.json()["error"]["message"]
    assert card.status_code == 200 and "bearer" in card.json()["securitySchemes"]


async def test_a_planner_that_is_down_is_a_503_not_a_trace(tmp_path) -> None:
    config = load_config(data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}})
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        await planner.server.stop(0)
        async with edge(planner) as http:
            down = await http.get("/.well-known/agent-card.json")

    assert down.status_code == 503
    assert down.json()["error"]["status"] == "UNAVAILABLE"


async def test_the_edge_app_serves_the_card_behind_its_own_authentication(tmp_path) -> None:
    from services.edge.app import create_app

    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, auth={"enabled": True}
    )
    async with Planner(config, ScriptedLLM([]), FakeTools()) as planner:
        keys = ApiKeyStore(config.auth.keys_path)
        key = keys.create("alice")[1]
        keys.close()
        app = create_app(config, planner_channel=planner.channel, inference_channel=planner.channel)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as http,
        ):
            refused = await http.get("/.well-known/agent-card.json")
            card = await http.get("/.well-known/agent-card.json", headers={"authorization": f"Bearer {key}"})

    assert refused.status_code == 401
    assert card.status_code == 200 and [s["id"] for s in card.json()["skills"]] == ["default"]

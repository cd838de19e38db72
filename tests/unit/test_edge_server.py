"""EdgeServer: serves the app on a real port, is found healthy by `meshpilot up`'s HTTP probe, drains on stop, and
names the setting to change when its port is taken."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from meshpilot.cli.mesh import _check_port_free, _unless_stopped, wait_http_healthy, wait_serving
from services.common import MeshConfig, load_config
from services.common.config import ConfigError
from services.edge.app import create_app, edge_auth_required
from services.edge.server import EdgeServer


@pytest.fixture
def config(tmp_path: Path) -> MeshConfig:
    config = load_config(data_dir=str(tmp_path))
    config.edge.port = 0
    config.edge.grace_seconds = 1
    return config


async def test_serves_health_on_its_port_and_stops(config: MeshConfig) -> None:
    app = create_app(config)
    server = EdgeServer(config.edge, app)
    await server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert await wait_serving(url, timeout=10)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
    finally:
        await server.stop()
    assert app.state.draining
    assert not await wait_http_healthy(url, timeout=0.5)


async def test_a_slow_stream_in_flight_finishes_during_the_drain(config: MeshConfig) -> None:
    app = create_app(config)
    release = asyncio.Event()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await release.wait()
        return {"done": "yes"}

    server = EdgeServer(config.edge, app)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        request = asyncio.create_task(client.get("/slow"))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.2)
        draining = app.state.draining
        release.set()
        response = await request
        await stopping
    assert draining
    assert response.json() == {"done": "yes"}


async def test_a_taken_port_is_a_config_error_naming_the_setting(config: MeshConfig) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config.edge.port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=r"edge\.port"):
            await EdgeServer(config.edge, create_app(config)).start()


def test_the_edge_url_reaches_a_wildcard_bind_on_loopback() -> None:
    config = load_config()
    config.edge.host = "0.0.0.0"
    assert config.edge.url() == "http://127.0.0.1:8080"
    config.edge.host = "::1"
    assert config.edge.url() == "http://[::1]:8080"


def test_the_edge_section_refuses_nonsense() -> None:
    with pytest.raises(ConfigError, match=r"edge\.port"):
        load_config(edge={"port": 70000})
    with pytest.raises(ConfigError, match=r"edge\.max_request_bytes"):
        load_config(edge={"max_request_bytes": 10})


@pytest.mark.parametrize(
    ("enabled", "planner_host", "edge_host", "required"),
    [
        (None, "127.0.0.1", "127.0.0.1", False),
        (None, "0.0.0.0", "127.0.0.1", True),
        (None, "127.0.0.1", "0.0.0.0", True),
        (None, "::1", "localhost", False),
        (True, "127.0.0.1", "127.0.0.1", True),
        (False, "0.0.0.0", "0.0.0.0", False),
    ],
)
def test_the_edge_asks_for_keys_where_the_mesh_does_or_it_binds_beyond_loopback(
    enabled: bool | None, planner_host: str, edge_host: str, required: bool
) -> None:
    config = load_config()
    config.auth.enabled = enabled
    config.planner.server.host = planner_host
    config.edge.host = edge_host
    assert edge_auth_required(config) is required


def test_up_finds_a_taken_edge_port_before_starting_the_edge() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="MESHPILOT_EDGE__PORT"):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", 0)


async def test_a_stop_while_the_edge_starts_cancels_the_wait() -> None:
    stop = asyncio.Event()
    never = asyncio.Event()

    async def check() -> bool:
        await never.wait()
        return True

    waiting = asyncio.ensure_future(_unless_stopped(check(), stop))
    await asyncio.sleep(0)
    stop.set()
    assert await waiting is None

    async def answer() -> bool:
        return False

    assert await _unless_stopped(answer(), asyncio.Event()) is False

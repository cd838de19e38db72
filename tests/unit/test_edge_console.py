"""The web console's routes (services/edge/console.py): the redirects to it, its static files with a policy that lets
the page load only itself, and refusals of anything else."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi import FastAPI

from services.common import load_config
from services.edge import console
from services.edge.app import create_app
from services.edge.errors import install_error_handlers
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client():
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(console.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
        yield client


async def test_the_root_and_the_bare_path_redirect_to_the_console(client) -> None:
    for path in ("/", "/console"):
        reply = await client.get(path)
        assert reply.status_code == 307 and reply.headers["location"] == "/console/"


async def test_the_page_and_its_files_are_served_with_a_policy_that_allows_only_this_origin(client) -> None:
    page = await client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css"), ("favicon.svg", "image/svg")):
        reply = await client.get(f"/console/{name}")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind), name
        assert reply.content == (console.STATIC_DIR / name).read_bytes()


async def test_the_page_loads_nothing_from_elsewhere(client) -> None:
    page = (await client.get("/console/")).text
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert references and all(not re.match(r"^[a-z]+:|^//", ref) for ref in references), references
    script = (await client.get("/console/console.js")).text
    # Text from runs reaches the page only as text nodes: no HTML parsing anywhere in the script.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    assert "http://" not in script and "https://" not in script


@pytest.mark.parametrize("name", ["runs_api.py", "..%2Fruns_api.py", "index.htm", "x" * 5000])
async def test_other_files_are_not_found_with_a_bounded_openai_error(client, name) -> None:
    reply = await client.get(f"/console/{name}")
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert "/console/" in error["message"] and len(error["message"]) < 300
    assert "def " not in reply.text


def test_the_console_files_ship_in_the_package() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.name for pattern in package_data["services.edge"] for p in (ROOT / "services/edge").glob(pattern)}
    assert set(console.FILES) <= shipped


async def test_with_authentication_on_the_page_loads_without_a_key_and_its_api_calls_need_one(tmp_path) -> None:
    config = load_config(data_dir=str(tmp_path), auth={"enabled": True})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    app = create_app(config, planner_channel=channel, inference_channel=channel)
    async with (
        channel,
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client,
    ):
        api = await client.get("/v1/runs")
        pages = [await client.get(path) for path in ("/", "/console/", "/console/console.js")]

    assert api.status_code == 401
    assert [page.status_code for page in pages] == [307, 200, 200]

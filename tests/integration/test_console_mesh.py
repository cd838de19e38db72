"""The web console in a real headless Chromium (Debian's chromium driven by playwright) against a real mesh: the four
services and the HTTP edge as processes, the default model. The page starts a run of an agent whose tool needs
approval, shows it live, the Approve click resumes it, and the answer appears.

With MESHPILOT_SCREENSHOTS=docs the screenshots of the runs list, of the run waiting for approval and of its timeline
once answered are written there (docs/console-runs.png, console-approval.png, console-run.png); otherwise to the
test's temporary directory.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc
from tests.conftest import free_port
from tests.integration.processes import ROOT, ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
SERVICES = ("knowledge", "inference", "planner", "tools")
APPROVAL_TASK = "What is the capital of France?"


class Mesh:
    """The services and the edge of one test module; ``url`` is the edge's."""

    def __init__(self, services: ServiceProcesses, edge: subprocess.Popen[bytes], url: str) -> None:
        self.services, self.edge, self.url = services, edge, url

    def post(self, path: str, body: dict) -> dict:
        reply = httpx.post(self.url + path, json=body, timeout=300)
        assert reply.status_code in (200, 202), reply.text
        return reply.json()


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the edge exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the edge did not answer {url} within {timeout:g}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("console-mesh")
    # The planner signs approvals and the tools service checks them with this key: written before either starts.
    (data_dir / "approval.key").write_text(secrets.token_hex(32))
    port = free_port()
    env = {"MESHPILOT_EDGE__PORT": str(port), "MESHPILOT_EDGE__GRACE_SECONDS": "1"}
    # No /metrics: their ports (port + 1000) are not checked for being free, and this test does not read them.
    env.update({f"MESHPILOT_{name.upper()}__SERVER__METRICS": "false" for name in SERVICES})
    services = ServiceProcesses(data_dir, SERVICES, env=env)
    edge: subprocess.Popen[bytes] | None = None
    try:
        services.start_all()
        with grpc.insecure_channel(services.target("planner")) as channel:
            spec = agents_pb2.AgentSpec(
                instructions="You answer questions about countries with the country_facts tool.",
                tools=["country_facts"],
                approval_required=["country_facts"],
                policy=agents_pb2.PolicySpec(name="guided"),
            )
            agents_pb2_grpc.AgentServiceStub(channel).CreateAgent(
                agents_pb2.CreateAgentRequest(name="careful-geo", spec=spec), timeout=30
            )
        log = data_dir / "edge.log"
        with log.open("ab") as out:
            edge = subprocess.Popen(
                [sys.executable, "-m", "services.edge"], cwd=ROOT, env=services.env, stdout=out, stderr=out
            )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", edge, log)
        yield Mesh(services, edge, url)
    finally:
        if edge is not None and edge.poll() is None:
            edge.terminate()
            edge.wait(timeout=30)
        services.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    named = os.environ.get("MESHPILOT_SCREENSHOTS")
    return ROOT / named if named else tmp_path


def test_the_console_follows_a_live_run_and_an_approval_click_resumes_it(mesh, browser, tmp_path) -> None:
    shots = screenshot_dir(tmp_path)
    # Other runs, so the list has something to show: one answered, one left waiting for a human.
    answered = mesh.post("/v1/agents/default/runs", {"task": "What currency is used in Japan?"})
    assert answered["state"] == "RUN_STATE_SUCCEEDED", answered

    page: Page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(mesh.url + "/")
    expect(page).to_have_url(mesh.url + "/console/")
    expect(page.locator("#new-agent option[value='careful-geo']")).to_have_count(1)
    page.select_option("#new-agent", "careful-geo")
    page.fill("#new-task", APPROVAL_TASK)
    page.click(".new-run button[type=submit]")

    # The run view, live: the model's step and the tool call that waits for approval arrive over the stream.
    page.wait_for_url("**/console/#/runs/*")
    run_id = page.url.rsplit("/", 1)[1]
    request = page.locator(".event.approval-requested")
    expect(request.locator("button.approve")).to_be_visible(timeout=240_000)
    expect(request).to_contain_text("country_facts")
    expect(request.locator("pre.json")).to_contain_text("France")
    expect(page.locator(".run-head .badge")).to_have_text("waiting for approval")
    expect(page.locator(".event.model-output")).to_have_count(1)

    page.screenshot(path=str(shots / "console-approval.png"), full_page=True)
    page.click(".event.approval-requested button.approve")

    expect(page.locator(".event.final-answer")).to_be_visible(timeout=240_000)
    expect(page.locator("#answer")).to_contain_text("Paris")
    expect(page.locator(".event.approved")).to_have_count(1)
    expect(page.locator(".event.tool-result pre.json")).to_contain_text("Paris")
    expect(page.locator(".event.approval-requested button")).to_have_count(0)
    expect(page.locator(".run-head .badge")).to_have_text("succeeded")
    stored = httpx.get(f"{mesh.url}/v1/runs/{run_id}", timeout=30).json()
    assert stored["state"] == "RUN_STATE_SUCCEEDED" and "Paris" in stored["answer"]
    page.screenshot(path=str(shots / "console-run.png"), full_page=True)

    waiting = mesh.post("/v1/agents/careful-geo/runs", {"task": "What is the capital of Kenya?"})
    assert waiting["state"] == "RUN_STATE_WAITING_FOR_APPROVAL", waiting
    page.goto(mesh.url + "/console/#/runs")
    rows = page.locator("tr.run-row")
    expect(rows).to_have_count(3)
    expect(page.locator(f"tr[data-run='{waiting['run_id']}'] .badge")).to_have_text("waiting for approval")
    expect(page.locator(f"tr[data-run='{run_id}'] td.answer")).to_contain_text("Paris")
    # As tall as the list: the page's height, not the window's.
    page.set_viewport_size({"width": 1280, "height": 360})
    page.screenshot(path=str(shots / "console-runs.png"), full_page=True)

    page.select_option("#state-filter", "waiting_for_approval")
    expect(rows).to_have_count(1)
    page.goto(mesh.url + "/console/#/health")
    expect(page.locator("table.health tbody tr")).to_have_count(4)
    expect(page.locator("table.health .badge.succeeded")).to_have_count(4)
    page.close()

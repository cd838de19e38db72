"""The web console in a real headless Chromium shows markup from a run (a tool's result, the model's answer, the
task) as text: nothing in it runs or becomes an element. The edge is served on a real socket; the planner runs in
process with a scripted model and a tool that returns hostile HTML."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, async_playwright

from meshpilot.planner.v1 import agents_pb2
from services.common import load_config
from services.edge.app import create_app
from services.edge.server import EdgeServer
from services.planner.types import ToolOutcome
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "<script>window.__pwned = 'script'</script>"
IMAGE = "<img src=x onerror=\"window.__pwned = 'img'\">"
TASK = "<b>Which</b> note? <svg onload=\"window.__pwned = 'svg'\"></svg>"


def react_call(tool: str, arguments: dict[str, str]) -> str:
    return json.dumps({"thought": "look it up", "tool_calls": [{"tool": tool, "arguments": arguments}]})


def react_answer(text: str) -> str:
    return json.dumps({"thought": "done", "final_answer": text})


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        await browser.close()


async def test_markup_in_a_tool_result_an_answer_and_a_task_shows_as_text(tmp_path, browser) -> None:
    async def hostile(name: str, arguments: dict[str, str]) -> ToolOutcome:
        return ToolOutcome(result={"country": "France", "note": SCRIPT + IMAGE}, duration_s=0.01)

    tools = FakeTools()
    tools.execute_hook = hostile
    llm = ScriptedLLM([react_call("country_facts", {"country": "France"}), react_answer(IMAGE + " Paris")])
    config = load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, edge={"port": 0, "grace_seconds": 1}
    )
    async with Planner(config, llm, tools) as planner:
        spec = agents_pb2.AgentSpec(instructions="Answer.", tools=["*"], policy=agents_pb2.PolicySpec(name="react"))
        await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="open", spec=spec))
        edge = EdgeServer(
            config.edge, create_app(config, planner_channel=planner.channel, inference_channel=planner.channel)
        )
        await edge.start()
        url = f"http://127.0.0.1:{edge.port}"
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                run = (await client.post("/v1/agents/open/runs", json={"task": TASK})).json()
            assert run["state"] == "RUN_STATE_SUCCEEDED", run
            page = await browser.new_page()
            await page.goto(f"{url}/console/#/runs/{run['run_id']}")
            await page.locator(".event.final-answer").wait_for()
            result = await page.locator(".event.tool-result pre").inner_text()
            final = await page.locator(".event.final-answer .final").inner_text()
            title = await page.locator(".run-head h1.task").inner_text()
            await page.goto(f"{url}/console/#/runs")
            await page.locator(f"tr[data-run='{run['run_id']}']").wait_for()
            row = await page.locator(f"tr[data-run='{run['run_id']}'] td.task").inner_text()
            pwned = await page.evaluate("window.__pwned")
            injected = await page.locator("main script, main img, main svg, main b").count()
            await page.close()
        finally:
            await edge.stop()

    assert SCRIPT in json.loads(result)["note"] and IMAGE in json.loads(result)["note"]
    assert final == IMAGE + " Paris"
    assert title == TASK
    assert row.startswith("<b>Which</b> note?")
    assert pwned is None, f"markup from the run ran in the page: {pwned}"
    assert injected == 0

"""The web console in a real headless Chromium, the edge on a real socket, the planner in process with a scripted
model and fake tools: markup from a run (a tool's result, the model's answer, the task) shows as text, nothing in it
runs or becomes an element; and a timeline whose stream breaks (the edge restarted mid-run) picks up where it was,
every event once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, async_playwright

from meshpilot.planner.v1 import agents_pb2
from services.common import MeshConfig, load_config
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


async def start_edge(config: MeshConfig, planner: Planner, port: int = 0) -> EdgeServer:
    edge_config = config.edge.model_copy(update={"port": port})
    app = create_app(config, planner_channel=planner.channel, inference_channel=planner.channel)
    edge = EdgeServer(edge_config, app)
    await edge.start()
    return edge


async def open_agent(planner: Planner) -> None:
    spec = agents_pb2.AgentSpec(instructions="Answer.", tools=["*"], policy=agents_pb2.PolicySpec(name="react"))
    await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="open", spec=spec))


@pytest.fixture
def config(tmp_path: Path) -> MeshConfig:
    return load_config(
        data_dir=str(tmp_path), planner={"server": {"port": 0, "metrics": False}}, edge={"port": 0, "grace_seconds": 1}
    )


async def test_markup_in_a_tool_result_an_answer_and_a_task_shows_as_text(config, browser) -> None:
    async def hostile(name: str, arguments: dict[str, str]) -> ToolOutcome:
        return ToolOutcome(result={"country": "France", "note": SCRIPT + IMAGE}, duration_s=0.01)

    tools = FakeTools()
    tools.execute_hook = hostile
    llm = ScriptedLLM([react_call("country_facts", {"country": "France"}), react_answer(IMAGE + " Paris")])
    async with Planner(config, llm, tools) as planner:
        await open_agent(planner)
        edge = await start_edge(config, planner)
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


async def test_a_timeline_whose_stream_breaks_resumes_after_its_last_event(config, browser) -> None:
    llm = ScriptedLLM([react_call("country_facts", {"country": "France"}), react_answer("Paris.")])
    # The second model call waits: the run is live, half done, while the edge goes away and comes back.
    second_step = llm.holds[1] = asyncio.Event()
    async with Planner(config, llm, FakeTools()) as planner:
        await open_agent(planner)
        edge = await start_edge(config, planner)
        url = f"http://127.0.0.1:{edge.port}"
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                reply = await client.post("/v1/agents/open/runs", json={"task": "Capital of France?", "wait": False})
            run_id = reply.json()["run_id"]
            page = await browser.new_page()
            await page.goto(f"{url}/console/#/runs/{run_id}")
            await page.locator(".event.tool-result").wait_for()
            before = sequences(await page.locator(".event .seq").all_inner_texts())
            await edge.stop()
            edge = await start_edge(config, planner, edge.port or 0)
            second_step.set()
            await page.locator(".event.final-answer").wait_for(timeout=30_000)
            after = sequences(await page.locator(".event .seq").all_inner_texts())
            answer = await page.locator("#answer").inner_text()
            await page.close()
            async with httpx.AsyncClient(base_url=url) as client:
                stored = (await client.get(f"/v1/runs/{run_id}")).json()["events"]
        finally:
            await edge.stop()

    # Every event but step_started has a card: each once, in order, those after the break included.
    assert after == [event["sequence"] for event in stored if "step_started" not in event]
    assert after[: len(before)] == before and len(after) > len(before)
    assert answer == "Paris."
    llm.assert_consumed()


def sequences(labels: list[str]) -> list[int]:
    """The sequence numbers of the timeline's cards, from their labels ("#3 +0.2s")."""
    return [int(label.split()[0].removeprefix("#")) for label in labels]


async def test_a_reject_click_with_a_reason_becomes_the_calls_error_and_the_run_goes_on(config, browser) -> None:
    llm = ScriptedLLM([react_call("country_facts", {"country": "France"}), react_answer("I may not look that up.")])
    tools = FakeTools()
    async with Planner(config, llm, tools) as planner:
        spec = agents_pb2.AgentSpec(
            instructions="Answer.",
            tools=["*"],
            approval_required=["country_facts"],
            policy=agents_pb2.PolicySpec(name="react"),
        )
        await planner.agents.CreateAgent(agents_pb2.CreateAgentRequest(name="careful", spec=spec))
        edge = await start_edge(config, planner)
        url = f"http://127.0.0.1:{edge.port}"
        try:
            page = await browser.new_page()
            # From the agent's card to the runs page with the agent chosen.
            await page.goto(f"{url}/console/#/agents")
            card = page.locator(".card.agent", has_text="careful")
            await card.get_by_text("needs approval").wait_for()
            await card.get_by_role("link", name="Start a run").click()
            await page.locator("#new-agent option[value='careful']").wait_for(state="attached")
            chosen = await page.locator("#new-agent").input_value()
            await page.fill("#new-task", "Capital of France?")
            await page.click(".new-run button[type=submit]")
            request = page.locator(".event.approval-requested")
            await request.locator("button.reject").wait_for()
            await request.locator("input.reason").fill("not <i>today</i>")
            await request.locator("button.reject").click()
            await page.locator(".event.final-answer").wait_for()
            error = await page.locator(".event.tool-error pre").inner_text()
            rejected = await page.locator(".event.rejected").count()
            buttons = await page.locator(".event.approval-requested button").count()
            await page.close()
        finally:
            await edge.stop()

    assert chosen == "careful"
    assert error == "a human rejected this call: not <i>today</i>"
    assert rejected == 1 and buttons == 0
    assert tools.calls == []
    llm.assert_consumed()

"""The agent loop against fake model and tool clients: steps, observations, budgets and prompts."""

from __future__ import annotations

import asyncio
import json

from services.common import InvalidArgumentError, UnavailableError
from services.planner import AgentLoop, Budget, ToolOutcome, ToolSpec, Turn
from services.planner.grounding import Fact, collect_facts
from services.planner.prompt import NO_ANSWER, system_prompt
from services.planner.types import Failed, Finished, ModelOutput, StepStarted, ToolCalled, ToolReturned
from tests.unit.planner_fakes import FACTS, FakeTools, ScriptedLLM, answer, call

PARIS = "The capital of France is Paris."
BUDGET = Budget(max_steps=6, max_tokens=10_000, timeout_s=60.0)


async def run(llm, tools, task="What is the capital of France?", history=(), budget=BUDGET, **kwargs):
    agent = AgentLoop(llm, tools, step_max_tokens=64, history_turns=4, **kwargs)
    return [event async for event in agent.run(task, list(history), budget)]


async def test_tool_call_then_answer_emits_every_step_in_order() -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer(PARIS)])
    tools = FakeTools()
    events = await run(llm, tools)

    assert [type(e) for e in events] == [
        StepStarted,
        ModelOutput,
        ToolCalled,
        ToolReturned,
        StepStarted,
        ModelOutput,
        Finished,
    ]
    assert events[2] == ToolCalled(1, "call-1", "country_facts", {"country": "France"})
    assert events[3].outcome.result["capital"] == "Paris"
    final = events[-1]
    assert final.answer == PARIS
    assert final.usage.total_tokens == 220
    assert tools.calls[0][:3] == ("call-1", "country_facts", {"country": "France"})


async def test_observation_is_shown_to_the_model_on_the_next_step() -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer(PARIS)])
    await run(llm, FakeTools())

    second = llm.requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": call("country_facts", country="France")}
    assert second[-1]["role"] == "user"
    observation, question = second[-1]["content"].split("\n")
    assert observation.startswith("Observation: {")
    assert '"capital": "Paris"' in observation
    assert question == "The question was: What is the capital of France?"


async def test_first_step_must_call_a_tool_and_the_answer_is_grounded_in_results() -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer(PARIS)])
    await run(llm, FakeTools())

    first, second = (request["schema"]["anyOf"] for request in llm.requests)
    assert [o["properties"]["tool"]["const"] for o in first] == ["country_facts", "calculator"]
    assert all("final_answer" not in o["properties"] for o in first)
    # After a result the only action is an answer stating one of its facts; the country asked about is not one.
    assert second == [
        {
            "type": "object",
            "properties": {
                "final_answer": {
                    "enum": [
                        "The capital of France is Paris.",
                        "The currency of France is Euro (EUR, €).",
                        "The region of France is Europe.",
                        NO_ANSWER,
                    ]
                }
            },
            "required": ["final_answer"],
            "additionalProperties": False,
        }
    ]


async def test_a_tool_that_failed_is_not_offered_again() -> None:
    llm = ScriptedLLM([call("calculator", expression="France"), call("country_facts", country="France"), answer(PARIS)])
    tools = FakeTools()

    async def failing_calculator(name, arguments):
        if name == "calculator":
            return ToolOutcome(error="name 'France' is not defined")
        return ToolOutcome(result=FACTS["France"])

    tools.execute_hook = failing_calculator
    events = await run(llm, tools)

    second = llm.requests[1]["schema"]["anyOf"]
    assert [o["properties"]["tool"]["const"] for o in second] == ["country_facts"]
    assert events[-1].answer == PARIS


async def test_when_every_tool_failed_the_agent_can_only_say_it_found_nothing() -> None:
    llm = ScriptedLLM([call("country_facts", country="Atlantis"), answer(NO_ANSWER)])
    tools = FakeTools()
    tools.tools = tools.tools[:1]
    events = await run(llm, tools)

    assert llm.requests[1]["schema"]["anyOf"][0]["properties"]["final_answer"] == {"enum": [NO_ANSWER]}
    assert events[-1].answer == NO_ANSWER


def test_facts_are_named_by_their_nearest_key_and_stated_as_sentences() -> None:
    result = {"timezones": ["Asia/Tokyo"], "rows": [{"name": "Paris"}, {"name": "Lyon"}], "country": "Japan", "n": 3}
    facts = collect_facts(result, "Japan", exclude=["japan"])

    assert facts == [
        Fact("n", "3", "Japan"),
        Fact("name", "Paris", "Japan"),
        Fact("name", "Lyon", "Japan"),
        Fact("timezones", "Asia/Tokyo", "Japan", list_size=1),
    ]
    assert [fact.sentence() for fact in facts] == [
        "The n of Japan is 3.",
        "The name of Japan is Paris.",
        "The name of Japan is Lyon.",
        "The timezone of Japan is Asia/Tokyo.",
    ]
    assert Fact("timezones", "Europe/Madrid", "Spain", list_size=3).sentence() == (
        "The timezones of Spain include Europe/Madrid."
    )
    assert collect_facts(391, "17 * 23")[0].sentence() == "The result of 17 * 23 is 391."
    assert Fact("phone_code", "+33", "").sentence() == "Phone code: +33"


async def test_without_tools_the_model_may_answer_at_once() -> None:
    llm = ScriptedLLM([answer("Hello!")])
    events = await run(llm, FakeTools(tools=[]), task="Say hello")

    assert events[-1] == Finished("Hello!", llm.usage, events[-1].duration_s)


async def test_tool_error_observation_lets_the_run_go_on() -> None:
    llm = ScriptedLLM(
        [call("country_facts", country="Atlantis"), call("country_facts", country="France"), answer(PARIS)]
    )
    events = await run(llm, FakeTools())

    results = [e for e in events if isinstance(e, ToolReturned)]
    assert results[0].outcome.error == "no country named 'Atlantis'"
    observation = llm.requests[1]["messages"][-1]["content"].split("\n")[0]
    assert json.loads(observation.removeprefix("Observation: ")) == {"error": "no country named 'Atlantis'"}
    assert events[-1].answer == PARIS


async def test_unknown_tool_and_bad_arguments_become_observations() -> None:
    llm = ScriptedLLM(
        [call("weather", city="Paris"), call("country_facts"), call("country_facts", country="France"), answer(PARIS)]
    )
    events = await run(llm, FakeTools())

    errors = [e.outcome.error for e in events if isinstance(e, ToolReturned)][:2]
    assert "no tool named 'weather'" in errors[0]
    assert "arguments.country is required" in errors[1]
    assert isinstance(events[-1], Finished)


async def test_output_that_is_not_an_action_becomes_an_observation() -> None:
    llm = ScriptedLLM(['{"tool": "country_fa', call("country_facts", country="France"), answer(PARIS)])
    events = await run(llm, FakeTools())

    assert "not complete JSON" in llm.requests[1]["messages"][-1]["content"]
    assert events[-1].answer == PARIS


async def test_step_budget_ends_the_run_with_resource_exhausted() -> None:
    llm = ScriptedLLM([call("country_facts", country="France")] * 2)
    events = await run(llm, FakeTools(), budget=Budget(max_steps=2, max_tokens=10_000, timeout_s=60))

    assert events[-1].code == "RESOURCE_EXHAUSTED"
    assert "step budget" in events[-1].message and "max_steps" in events[-1].message
    assert len(llm.requests) == 2


async def test_token_budget_ends_the_run_with_resource_exhausted() -> None:
    llm = ScriptedLLM([call("country_facts", country="France")] * 3)
    events = await run(llm, FakeTools(), budget=Budget(max_steps=6, max_tokens=200, timeout_s=60))

    assert events[-1].code == "RESOURCE_EXHAUSTED"
    assert "token budget" in events[-1].message and "max_tokens" in events[-1].message
    assert "220" in events[-1].message
    assert len(llm.requests) == 2


async def test_time_budget_ends_the_run_with_deadline_exceeded() -> None:
    async def slow(name, arguments):
        await asyncio.sleep(30)
        return ToolOutcome(result={})

    tools = FakeTools()
    tools.execute_hook = slow
    llm = ScriptedLLM([call("country_facts", country="France")])
    events = await run(llm, tools, budget=Budget(max_steps=6, max_tokens=10_000, timeout_s=0.2))

    assert events[-1].code == "DEADLINE_EXCEEDED"
    assert "time budget" in events[-1].message and "timeout" in events[-1].message


async def test_remaining_time_is_the_deadline_of_each_call() -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer(PARIS)])
    tools = FakeTools()
    await run(llm, tools, budget=Budget(max_steps=6, max_tokens=10_000, timeout_s=30))

    timeouts = [r["timeout"] for r in llm.requests] + [tools.calls[0][3]]
    assert all(0 < t <= 30 for t in timeouts)
    assert llm.requests[1]["timeout"] <= llm.requests[0]["timeout"]


async def test_unavailable_model_ends_the_run_with_unavailable() -> None:
    llm = ScriptedLLM([UnavailableError("inference: connection refused")])
    events = await run(llm, FakeTools())

    assert events[-1] == Failed("UNAVAILABLE", "inference: connection refused")


async def test_unavailable_tools_end_the_run_with_unavailable() -> None:
    tools = FakeTools()
    tools.list_error = UnavailableError("tools: connection refused")
    events = await run(ScriptedLLM([]), tools)

    assert events == [Failed("UNAVAILABLE", "tools: connection refused")]


async def test_rejected_model_request_keeps_its_code() -> None:
    llm = ScriptedLLM([InvalidArgumentError("inference: json_schema is not supported")])
    events = await run(llm, FakeTools())

    assert events[-1].code == "INVALID_ARGUMENT"


async def test_history_turns_are_in_the_prompt_before_the_task() -> None:
    history = [Turn(f"question {i}", f"answer {i}") for i in range(6)]
    llm = ScriptedLLM([call("country_facts", country="France"), answer("Euro (EUR, €)")])
    await run(llm, FakeTools(), task="Which currency does that country use?", history=history)

    messages = llm.requests[0]["messages"]
    assert messages[0]["role"] == "system"
    shown = [m["content"] for m in messages[1:-1]]
    assert shown[0] == "question 2"  # only the last 4 turns
    assert shown[1] == json.dumps({"final_answer": "answer 2"})
    assert shown[-1] == json.dumps({"final_answer": "answer 5"})
    assert messages[-1] == {"role": "user", "content": "Which currency does that country use?"}


async def test_system_prompt_lists_tools_and_only_examples_whose_tools_exist() -> None:
    llm = ScriptedLLM([call("country_facts", country="France"), answer(PARIS)])
    tools = FakeTools()
    tools.tools = tools.tools[:1]
    await run(llm, tools)

    system = llm.requests[0]["messages"][0]["content"]
    assert '- country_facts {"country": string}: Facts about a country\n' in system
    assert "calculator" not in system
    # Examples call the tool with the argument name its schema declares.
    assert '{"tool": "country_facts", "arguments": {"country": "Peru"}}' in system
    assert "User: What currency does that country use?" in system  # the follow-up example


def test_tool_descriptions_are_cut_to_their_first_sentence() -> None:
    tool = ToolSpec(
        "sparql_query",
        "Run a SPARQL query on the graph (prefix mp: <https://x/>; classes mp:Country). Example: {...}",
        {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
    )

    assert '- sparql_query {"query": string, "limit": integer}: Run a SPARQL query on the graph\n' in (
        system_prompt([tool]) + "\n"
    )


async def test_a_tool_that_returned_nothing_is_not_offered_again() -> None:
    llm = ScriptedLLM([call("calculator", expression="1"), call("country_facts", country="France"), answer(PARIS)])
    tools = FakeTools()

    async def empty_calculator(name, arguments):
        return ToolOutcome(result={} if name == "calculator" else FACTS["France"])

    tools.execute_hook = empty_calculator
    events = await run(llm, tools)

    assert [o["properties"]["tool"]["const"] for o in llm.requests[1]["schema"]["anyOf"]] == ["country_facts"]
    assert events[-1].answer == PARIS

"""Policies decide over a RunSnapshot, no sockets: what they ask the model, what its output means, what they learn."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.planner import POLICIES
from services.planner.grounding import Fact, collect_facts, subject_of
from services.planner.guardrails import fence_close, fence_open
from services.planner.policies import (
    Answer,
    CallTools,
    Context,
    Decision,
    GuidedPolicy,
    NewPlan,
    Note,
    PlanExecutePolicy,
    Policy,
    PolicyOptions,
    ReActPolicy,
)
from services.planner.policies.base import NONCE_KEY
from services.planner.policies.guided import MAX_ARGUMENT_CHARS, MAX_LOOKUPS
from services.planner.prompt import (
    MAX_SPAN_WORDS,
    MAX_SPANS,
    NO_ANSWER,
    grounded_answer_options,
    quoted_arguments,
    request_spans,
    system_prompt,
)
from services.planner.state import AgentRef, CallRecord, CallStatus, RunSnapshot, StepRecord
from services.planner.types import Budget, ToolOutcome, ToolSpec, Turn
from tests.unit.planner_fakes import CALCULATOR, COUNTRY_FACTS, FACTS, answer, call

CAPITAL = "What is the capital of France?"
CURRENT_TIME = ToolSpec(
    "current_time",
    "Get the current date and time in a time zone.",
    {"type": "object", "properties": {"timezone": {"type": "string"}}},
)
UTC_NOW = {"time": "2025-01-01T12:00:00+00:00", "weekday": "Wednesday", "timezone": "UTC", "utc_offset": "+00:00"}
TOOLS = [COUNTRY_FACTS, CALCULATOR]
FOUND = ToolOutcome(result=FACTS["France"])
FAILED = ToolOutcome(error="no country named 'Atlantis'")


def snapshot(task: str = CAPITAL, history: list[Turn] | None = None) -> RunSnapshot:
    return RunSnapshot(
        "run-1", "session-1", task, AgentRef("test", 1, {}), Budget(6, 10_000, 60.0), history=history or []
    )


def context(tools: list[ToolSpec] | None = None, instructions: str = "You answer with tools.") -> Context:
    return Context(instructions, TOOLS if tools is None else tools)


def step(
    policy: Policy, state: RunSnapshot, ctx: Context, output: str, outcomes: list[ToolOutcome] | None = None
) -> Decision:
    """One step the way the executor takes it: the request, the model's ``output``, then, for tool calls, their
    ``outcomes``."""
    state.step += 1
    policy.request(state, ctx)
    decision = policy.on_output(state, ctx, output)
    if isinstance(decision, CallTools):
        outcomes = outcomes or [ToolOutcome(result={})] * len(decision.calls)
        record = StepRecord(state.step, output)
        for index, ((tool, arguments), outcome) in enumerate(zip(decision.calls, outcomes, strict=True), start=1):
            call_id = f"call-{state.step}-{index}"
            done = CallRecord(call_id, tool, arguments, f"run-1/{call_id}", CallStatus.DONE)
            done.result, done.error = outcome.result, outcome.error
            record.calls.append(done)
        state.steps.append(record)
        policy.on_results(state, ctx, record)
    elif isinstance(decision, Note):
        state.steps.append(StepRecord(state.step, output, note=decision.text))
    elif isinstance(decision, NewPlan):
        state.steps.append(StepRecord(state.step, output, note=f"Plan (revision {decision.revision})"))
    return decision


def tool_calls(*calls: tuple[str, dict[str, Any]], **fields: str) -> str:
    """A react / plan_execute output calling ``calls`` in one step."""
    return json.dumps({**fields, "tool_calls": [{"tool": tool, "arguments": arguments} for tool, arguments in calls]})


def offered_tools(schema: dict[str, Any]) -> list[str]:
    return [o["properties"]["tool"]["const"] for o in schema["anyOf"] if "tool" in o["properties"]]


def offered_answers(schema: dict[str, Any]) -> list[str] | None:
    """The sentences a grounded answer may be, or None if the schema offers something else."""
    options = schema["anyOf"]
    if len(options) != 1 or "enum" not in options[0]["properties"].get("final_answer", {}):
        return None
    return options[0]["properties"]["final_answer"]["enum"]


# Guided


def test_guided_system_prompt_starts_with_the_instructions_and_shows_only_examples_whose_tools_exist() -> None:
    request = GuidedPolicy().request(snapshot(), context([COUNTRY_FACTS], "You are a geography tutor."))

    system = request.messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith("You are a geography tutor.\nReply with one JSON object")
    assert '- country_facts {"country": string}: Facts about a country\n' in system["content"]
    assert "calculator" not in system["content"]
    # Examples call the tool with the argument name its schema declares.
    assert '{"tool": "country_facts", "arguments": {"country": "Peru"}}' in system["content"]
    assert "User: What currency does that country use?" in system["content"]  # the follow-up example
    assert request.messages[1:] == [{"role": "user", "content": CAPITAL}]


def test_tool_descriptions_are_cut_to_their_first_sentence() -> None:
    tool = ToolSpec(
        "sparql_query",
        "Run a SPARQL query on the graph (prefix mp: <https://x/>; classes mp:Country). Example: {...}",
        {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
    )

    assert '- sparql_query {"query": string, "limit": integer}: Run a SPARQL query on the graph\n' in (
        system_prompt([tool]) + "\n"
    )


def test_each_described_argument_gets_a_line_saying_whether_it_is_optional() -> None:
    # Measured on 40 BFCL test tasks: 13 -> 19 correct calls once the model read what each argument means and which
    # it may leave out (before, it filled "units" of a circle's area with "circle").
    tool = ToolSpec(
        "area",
        "Area of a circle.",
        {
            "type": "object",
            "required": ["radius"],
            "properties": {
                "radius": {"type": "number", "description": "The radius."},
                "units": {"type": "string", "description": "Units of the radius (defaults to 'meters'). " + "x" * 200},
                "note": {"type": "string"},
            },
        },
    )

    lines = system_prompt([tool]).split("Tools:\n", 1)[1].split("\n\n", 1)[0].splitlines()

    assert lines[0] == '- area {"radius": number, "units": string, "note": string}: Area of a circle'
    assert lines[1] == '  "radius" (number): The radius.'
    assert lines[2].startswith("  \"units\" (string, optional): Units of the radius (defaults to 'meters'). xx")
    assert lines[2].endswith("...") and len(lines[2]) < 140  # long descriptions are cut
    assert len(lines) == 3  # no line for an argument without a description


def test_guided_history_turns_come_before_the_task() -> None:
    history = [Turn("question 1", "answer 1"), Turn("question 2", "answer 2")]
    request = GuidedPolicy().request(snapshot("Which currency does that country use?", history), context())

    assert request.messages[1:] == [
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": json.dumps({"final_answer": "answer 1"})},
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": json.dumps({"final_answer": "answer 2"})},
        {"role": "user", "content": "Which currency does that country use?"},
    ]


def test_guided_first_step_offers_only_tool_calls() -> None:
    schema = GuidedPolicy().request(snapshot(), context()).json_schema

    assert offered_tools(schema) == ["country_facts", "calculator"]
    assert all("final_answer" not in option["properties"] for option in schema["anyOf"])


def test_guided_tool_call_output_becomes_one_call() -> None:
    decision = GuidedPolicy().on_output(snapshot(), context(), call("country_facts", country="France"))

    assert decision == CallTools([("country_facts", {"country": "France"})])


def test_after_facts_that_answer_only_grounded_sentences_or_no_answer_are_offered() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context()
    step(policy, state, ctx, call("country_facts", country="France"), [FOUND])

    schema = policy.request(state, ctx).json_schema
    # The currency and region do not answer a question about the capital; the country asked about is no fact.
    assert schema == {
        "anyOf": [
            {
                "type": "object",
                "properties": {"final_answer": {"enum": ["The capital of France is Paris.", NO_ANSWER]}},
                "required": ["final_answer"],
                "additionalProperties": False,
            }
        ]
    }
    assert state.memory["facts"] == [{"key": "capital", "value": "Paris", "subject": "France", "list_size": 0}]


def test_guided_observation_and_the_question_again_follow_each_action() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context()
    action = call("country_facts", country="France")
    step(policy, state, ctx, action, [FOUND])

    messages = policy.request(state, ctx).messages
    assert messages[-2] == {"role": "assistant", "content": action}
    assert messages[-1]["role"] == "user"
    observation, question = messages[-1]["content"].split("\n")
    assert json.loads(unfenced(observation.removeprefix("Observation: "), state)) == FACTS["France"]
    assert question == f"The question was: {CAPITAL}"


def unfenced(text: str, state: RunSnapshot) -> str:
    """The text inside the run's data fence; AssertionError if ``text`` is not exactly one fenced block."""
    nonce = state.memory[NONCE_KEY]
    assert text.startswith(fence_open(nonce)) and text.endswith(fence_close(nonce)), text
    inner = text[len(fence_open(nonce)) : -len(fence_close(nonce))]
    assert nonce not in inner
    return inner


def test_guided_error_observation_is_shown_as_an_error() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context()
    step(policy, state, ctx, call("country_facts", country="Atlantis"), [FAILED])

    observation = policy.request(state, ctx).messages[-1]["content"].split("\n")[0]
    assert json.loads(unfenced(observation.removeprefix("Observation: "), state)) == {
        "error": "no country named 'Atlantis'"
    }


def test_facts_that_do_not_answer_the_question_are_not_offered_and_their_tool_is_spent() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot("Write a haiku about the sea."), context([CURRENT_TIME, *TOOLS])
    step(policy, state, ctx, call("current_time", timezone="UTC"), [ToolOutcome(result=UTC_NOW)])

    schema = policy.request(state, ctx).json_schema
    assert offered_tools(schema) == ["country_facts", "calculator"]
    assert "facts" not in state.memory
    assert state.memory["spent"] == ["current_time"]


@pytest.mark.parametrize("outcome", [FAILED, ToolOutcome(result={})], ids=["failed", "returned nothing"])
def test_a_tool_that_failed_or_returned_nothing_is_not_offered_again(outcome: ToolOutcome) -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context()
    step(policy, state, ctx, call("calculator", expression="France"), [outcome])

    assert offered_tools(policy.request(state, ctx).json_schema) == ["country_facts"]


def test_when_every_tool_is_spent_the_only_answer_is_no_answer() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context([COUNTRY_FACTS])
    step(policy, state, ctx, call("country_facts", country="Atlantis"), [FAILED])

    assert offered_answers(policy.request(state, ctx).json_schema) == [NO_ANSWER]


def test_after_max_lookups_without_an_answer_the_only_answer_is_no_answer() -> None:
    tools = [ToolSpec(f"lookup_{i}", "Looks up.", {"type": "object"}) for i in range(MAX_LOOKUPS + 2)]
    policy, state, ctx = GuidedPolicy(), snapshot(), context(tools)
    for tool in tools[:MAX_LOOKUPS]:
        assert offered_answers(policy.request(state, ctx).json_schema) is None
        step(policy, state, ctx, call(tool.name), [ToolOutcome(result={"unrelated": "x"})])

    assert state.memory["lookups"] == MAX_LOOKUPS
    assert offered_answers(policy.request(state, ctx).json_schema) == [NO_ANSWER]


def test_guided_output_that_is_not_json_becomes_a_note_with_an_error_observation() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(), context()
    decision = step(policy, state, ctx, '{"tool": "country_fa')

    assert isinstance(decision, Note)
    error = json.loads(decision.text)["error"]
    assert "not complete JSON" in error
    assert "not complete JSON" in policy.request(state, ctx).messages[-1]["content"]
    # Greedy decoding would write it again: it spends a lookup.
    assert state.memory == {"lookups": 1, NONCE_KEY: state.memory[NONCE_KEY]}


def test_guided_broken_action_naming_a_tool_spends_it_and_two_end_in_the_honest_answer() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot("Write a haiku about the sea."), context()
    runaway = '{"tool": "calculator", "arguments": {"expression": "1-2-1-2-1-2-1-2'
    step(policy, state, ctx, runaway)
    assert state.memory == {"lookups": 1, "spent": ["calculator"], NONCE_KEY: state.memory[NONCE_KEY]}
    offered = [o["properties"]["tool"]["const"] for o in policy.request(state, ctx).json_schema["anyOf"]]
    assert "calculator" not in offered and offered

    step(policy, state, ctx, '{"tool": "country_facts", "arguments": {"country": "seaseasea')
    assert policy.request(state, ctx).json_schema == {"anyOf": grounded_answer_options([])}


def test_guided_caps_string_arguments_that_set_no_length_of_their_own() -> None:
    schema = GuidedPolicy().request(snapshot(), context()).json_schema
    arguments = {o["properties"]["tool"]["const"]: o["properties"]["arguments"] for o in schema["anyOf"]}
    assert arguments["country_facts"]["properties"]["country"]["maxLength"] == MAX_ARGUMENT_CHARS


CIRCUMFERENCE = ToolSpec(
    "calculate_circumference",
    "Circumference of a circle.",
    {
        "type": "object",
        "properties": {
            "radius": {"type": "integer"},
            "unit": {"type": "string"},
            "method": {"type": "string", "enum": ["exact", "approximate"]},
            "returnAsFraction": {"type": "boolean"},
        },
        "required": ["radius"],
    },
)


def offered_arguments(task: str, tool: ToolSpec = CIRCUMFERENCE) -> list[str]:
    schema = GuidedPolicy().request(snapshot(task), context([tool])).json_schema
    (option,) = schema["anyOf"]
    return list(option["properties"]["arguments"]["properties"])


@pytest.mark.parametrize(
    ("task", "offered"),
    [
        ("What is the circumference of a circle with radius 4?", ["radius"]),
        ("Circumference of a circle of radius 4, in the unit inches.", ["radius", "unit"]),
        ("Circumference, radius 4 units, approximate please", ["radius", "unit", "method"]),
        ("Circumference for radius 4; return it as a fraction", ["radius", "returnAsFraction"]),
    ],
)
def test_guided_offers_only_the_optional_arguments_the_task_asks_for(task: str, offered: list[str]) -> None:
    assert offered_arguments(task) == offered


RESTAURANTS = ToolSpec(
    "find_restaurant",
    "Find a restaurant.",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "diet": {"type": "array", "items": {"type": "string", "enum": ["Vegan", "Gluten-free"]}},
            "format": {"type": "string", "description": "Listing format: 'brief' or 'full menu'. Default 'brief'."},
            "notebook": {"type": "string", "description": "Letters, digits, '_' or '-'."},
            "include_hours": {"type": "boolean"},
        },
        "required": ["location"],
    },
)


@pytest.mark.parametrize(
    ("task", "offered"),
    [
        ("A restaurant in Oslo", ["location"]),
        ("A vegan restaurant in Oslo", ["location", "diet"]),  # a choice of its items' enum
        ("A gluten-free restaurant in Oslo", ["location", "diet"]),
        ("A restaurant in Oslo, with the full menu", ["location", "format"]),  # a choice its description quotes
        ("A restaurant in Oslo, including opening hours", ["location", "include_hours"]),  # words' starts
        ("A restaurant in Oslo - anything", ["location"]),  # '-' is punctuation, not a choice
        ("A restaurant in Oslo, not in the veganic district", ["location"]),  # a choice is a whole word
        ("An unincluded restaurant in Oslo hours", ["location"]),  # a name's word starts a word of the task
    ],
)
def test_an_optional_argument_is_asked_for_by_its_choices_or_the_starts_of_words(task: str, offered: list[str]) -> None:
    assert offered_arguments(task, RESTAURANTS) == offered


def test_a_tool_that_requires_nothing_keeps_its_optional_arguments() -> None:
    clock = ToolSpec("current_time", "The time.", {"type": "object", "properties": {"timezone": {"type": "string"}}})
    assert offered_arguments("What time is it in Tokyo?", clock) == ["timezone"]


def test_guided_json_that_is_no_action_becomes_a_note() -> None:
    decision = GuidedPolicy().on_output(snapshot(), context(), json.dumps({"tool": "calculator"}))

    assert isinstance(decision, Note)
    assert '"final_answer" or "tool" and "arguments"' in json.loads(decision.text)["error"]


def test_guided_answer_is_stripped_and_an_empty_one_is_no_answer() -> None:
    policy = GuidedPolicy()

    assert policy.on_output(snapshot(), context(), answer("  Paris. ")) == Answer("Paris.")
    assert policy.on_output(snapshot(), context(), answer("  ")) == Answer(NO_ANSWER)


def test_without_tools_the_guided_model_may_answer_freely() -> None:
    schema = GuidedPolicy().request(snapshot("Say hello"), context([])).json_schema

    assert [list(option["properties"]) for option in schema["anyOf"]] == [["final_answer"]]
    assert schema["anyOf"][0]["properties"]["final_answer"]["type"] == "string"


@pytest.mark.parametrize(
    ("key", "question", "answers"),
    [
        ("capital", CAPITAL, True),
        ("currency", CAPITAL, False),
        ("capitals", "List the capital.", True),  # plural key, singular word
        ("timezones", "What timezone is Morocco in?", True),
        ("timezones", "Which time zone is Morocco in?", True),  # alias
        ("phone_code", "How do I dial Japan?", True),
        ("currency", "Which money do they use in Japan?", True),
        ("region", "Which continent is Ghana on?", True),
        ("capital", "法国的首都是哪里？", True),
        ("phone_code", "日本的电话区号是多少？", True),
        ("timezones", "摩洛哥在哪个时区？", True),
        ("result", "What is 17 * 23?", True),  # generic keys answer whatever was asked of the tool
        ("value", "Write a haiku about the sea.", True),
        ("time", "Write a haiku about the sea.", False),
        ("datetime", "What time is it in Tokyo?", True),  # mcp-server-time's key
        ("datetime", "东京现在几点？", True),
        ("datetime", "Write a haiku about the sea.", False),
        ("day_of_week", "What day is it in Paris?", True),
        ("utc_offset", "Write a haiku about the sea.", False),
        ("id", "What is the id?", False),  # key parts shorter than 3 letters never match
        # A "how many" question takes a count of what it names, and a count answers nothing else.
        ("timezones_count", "How many time zones does Latvia have?", True),
        ("timezones_count", "拉脱维亚有几个时区？", True),
        ("countries_count", "How many countries use the Euro?", True),
        ("countries_count", "What is the number of countries in Polynesia?", True),
        ("countries_count", "How many time zones does Latvia have?", False),
        ("timezones_count", "Which time zone is Latvia in?", False),
        ("timezones", "How many time zones does Latvia have?", False),  # "x" is no number
        ("result", "How many days are in 3 weeks?", False),
    ],
)
def test_fact_answers_when_the_question_names_its_key(key: str, question: str, answers: bool) -> None:
    assert Fact(key, "x", "subject").answers(question) is answers


@pytest.mark.parametrize(("value", "answers"), [("21", True), ("1,234", True), ("-2.5", True), ("nan", False)])
def test_a_number_answers_a_how_many_question(value: str, answers: bool) -> None:
    assert Fact("result", value, "3 * 7").answers("How many days are in 3 weeks?") is answers
    assert Fact("timezones", value, "").answers("How many time zones does Latvia have?") is answers


def test_a_count_is_stated_as_a_number_of_things() -> None:
    assert Fact("timezones_count", "3", "Portugal").sentence() == "The number of timezones of Portugal is 3."
    assert Fact("countries_count", "7", "").sentence() == "Number of countries: 7"


def test_the_rest_of_a_cut_list_is_no_fact() -> None:
    facts = collect_facts({"countries": ["France", "... 12 more"], "note": "... and more"}, "Europe")
    assert [fact.value for fact in facts] == ["France", "... and more"]


@pytest.mark.parametrize(
    ("arguments", "subject"),
    [
        (["France"], "France"),
        ([True, " Japan "], "Japan"),
        ([17], "17"),
        (["SELECT (COUNT(?c) AS ?n) WHERE { ?c mp:region ?r }"], ""),  # code is no subject
        (["a\nb"], ""),
        (["x" * 81], ""),
        ([], ""),
    ],
)
def test_the_subject_of_a_call_is_a_name_it_was_asked_about(arguments: list[object], subject: str) -> None:
    assert subject_of(arguments) == subject


@pytest.mark.parametrize(
    ("question", "name", "result", "offered"),
    [
        # The answer is the name asked about: offered, since no other fact answers.
        (
            "What is the capital of Luxembourg?",
            "Luxembourg",
            {"country": "Luxembourg", "capital": "Luxembourg", "currency": "Euro"},
            ["The capital of Luxembourg is Luxembourg."],
        ),
        # The name asked about repeated ("the capital of Bridgetown is Bridgetown") is no answer beside a real one.
        (
            "Which country has Bridgetown as its capital?",
            "Bridgetown",
            {"country": "Barbados", "capital": "Bridgetown"},
            ["The country of Bridgetown is Barbados."],
        ),
        ("Who is the president of France?", "France", {"country": "France", "capital": "Paris"}, None),
    ],
)
def test_a_fact_repeating_the_name_asked_about_answers_only_when_nothing_else_does(
    question: str, name: str, result: dict[str, Any], offered: list[str] | None
) -> None:
    policy, state, ctx = GuidedPolicy(), snapshot(question), context()
    step(policy, state, ctx, call("country_facts", name=name), [ToolOutcome(result=result)])

    if offered is None:  # nothing answers: the tool is spent and the next step offers another lookup
        assert state.memory.get("facts") is None and state.memory["spent"] == ["country_facts"]
    else:
        assert offered_answers(policy.request(state, ctx).json_schema) == [*offered, NO_ANSWER]


def test_a_how_many_question_is_answered_with_the_count_beside_a_list() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot("How many time zones does Portugal have?"), context()
    result = {"country": "Portugal", "timezones": ["Atlantic/Azores", "Atlantic/Madeira", "Europe/Lisbon"]}
    result["timezones_count"] = 3
    step(policy, state, ctx, call("country_facts", name="Portugal"), [ToolOutcome(result=result)])

    assert offered_answers(policy.request(state, ctx).json_schema) == [
        "The number of timezones of Portugal is 3.",
        NO_ANSWER,
    ]


def test_a_count_from_a_query_is_stated_without_the_query() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot("How many countries are in Polynesia?"), context()
    query = "SELECT (COUNT(?c) AS ?countries) WHERE { ?c mp:subregion/rdfs:label 'Polynesia'@en }"
    outcome = ToolOutcome(result={"rows": [{"countries": 10}], "truncated": False})
    step(policy, state, ctx, call("sparql_query", query=query), [outcome])

    assert offered_answers(policy.request(state, ctx).json_schema) == ["Countries: 10", NO_ANSWER]


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


def test_a_calculator_result_answers_an_arithmetic_question() -> None:
    policy, state, ctx = GuidedPolicy(), snapshot("What is 17 * 23?"), context()
    step(policy, state, ctx, call("calculator", expression="17 * 23"), [ToolOutcome(result={"result": 391})])

    assert offered_answers(policy.request(state, ctx).json_schema) == ["The result of 17 * 23 is 391.", NO_ANSWER]


# ReAct


def test_react_schema_offers_parallel_tool_calls_or_a_final_answer() -> None:
    policy = ReActPolicy(PolicyOptions(max_parallel_tool_calls=3))
    request = policy.request(snapshot(), context(instructions="You are a careful researcher."))

    calls, final = request.json_schema["anyOf"]
    assert calls["required"] == ["thought", "tool_calls"]
    array = calls["properties"]["tool_calls"]
    assert (array["type"], array["minItems"], array["maxItems"]) == ("array", 1, 3)
    assert [o["properties"]["tool"]["const"] for o in array["items"]["anyOf"]] == ["country_facts", "calculator"]
    assert array["items"]["anyOf"][0]["properties"]["arguments"] == COUNTRY_FACTS.input_schema
    assert final["required"] == ["thought", "final_answer"]
    system = request.messages[0]["content"]
    assert system.startswith("You are a careful researcher.\n")
    assert "up to 3" in system
    assert f"- country_facts: Facts about a country. {json.dumps(COUNTRY_FACTS.input_schema)}" in system
    assert request.messages[1:] == [{"role": "user", "content": CAPITAL}]


def test_react_without_tools_offers_only_the_answer() -> None:
    schema = ReActPolicy().request(snapshot(), context([])).json_schema

    assert [option["required"] for option in schema["anyOf"]] == [["thought", "final_answer"]]


def test_react_output_with_three_calls_is_one_step_of_three_calls() -> None:
    calls = [
        ("country_facts", {"country": "France"}),
        ("country_facts", {"country": "Japan"}),
        ("calculator", {"expression": "2 + 2"}),
    ]

    decision = ReActPolicy().on_output(snapshot(), context(), tool_calls(*calls, thought="Look up all three."))

    assert decision == CallTools(calls)


def test_react_observations_are_shown_by_call_id() -> None:
    policy, state, ctx = ReActPolicy(), snapshot(), context()
    output = tool_calls(
        ("country_facts", {"country": "France"}), ("country_facts", {"country": "Atlantis"}), thought=""
    )
    step(policy, state, ctx, output, [FOUND, FAILED])

    messages = policy.request(state, ctx).messages
    assert messages[-2] == {"role": "assistant", "content": output}
    lines = messages[-1]["content"].split("\n")
    assert lines[0] == "Observations:"
    first, second = (line.split(": ", 1) for line in lines[1:])
    assert first[0] == "call-1-1 country_facts"
    assert json.loads(unfenced(first[1], state)) == FACTS["France"]
    assert second[0] == "call-1-2 country_facts"
    assert json.loads(unfenced(second[1], state)) == {"error": "no country named 'Atlantis'"}


def test_react_final_answer() -> None:
    output = json.dumps({"thought": "Known.", "final_answer": " Paris "})

    assert ReActPolicy().on_output(snapshot(), context(), output) == Answer("Paris")


@pytest.mark.parametrize(
    ("output", "error"),
    [
        (tool_calls(*[("calculator", {})] * 3), "at most 2 tool calls per step"),
        (json.dumps({"tool_calls": []}), '"tool_calls" must be a non-empty list'),
        (json.dumps({"tool_calls": [{"tool": "calculator"}]}), 'each tool call needs "tool"'),
        (json.dumps({"thought": "hmm"}), 'the action needs "tool_calls" or "final_answer"'),
        (json.dumps({"final_answer": "  "}), 'the action needs "tool_calls" or "final_answer"'),
        (json.dumps(["a list"]), "the action must be a JSON object"),
        ('{"thought": "cut sho', "not complete JSON"),
    ],
)
def test_react_malformed_output_becomes_a_note_saying_what_is_wrong(output: str, error: str) -> None:
    decision = ReActPolicy(PolicyOptions(max_parallel_tool_calls=2)).on_output(snapshot(), context(), output)

    assert isinstance(decision, Note)
    assert error in json.loads(decision.text)["error"]


# Plan and execute


def plan(*steps: str) -> str:
    return json.dumps({"plan": list(steps)})


def test_plan_execute_first_asks_for_a_plan() -> None:
    policy = PlanExecutePolicy(PolicyOptions(max_plan_steps=3))
    request = policy.request(snapshot(), context(instructions="You plan trips."))

    assert request.messages[0]["content"].startswith("You plan trips.\nYou work in two phases.")
    assert request.messages[1] == {"role": "user", "content": CAPITAL}
    assert "Write the plan" in request.messages[-1]["content"]
    assert request.json_schema["required"] == ["plan"]
    assert request.json_schema["properties"]["plan"]["maxItems"] == 3


def test_a_plan_output_is_a_new_plan_remembered_for_the_next_steps() -> None:
    policy, state = PlanExecutePolicy(PolicyOptions(max_plan_steps=2)), snapshot()

    decision = policy.on_output(state, context(), plan(" Look up France ", "Answer", "One too many"))

    assert decision == NewPlan(["Look up France", "Answer"], revision=1)
    assert state.memory == {"plan": ["Look up France", "Answer"], "index": 0, "replan": False, "revision": 1}


@pytest.mark.parametrize("output", [plan(), plan("  "), json.dumps({"steps": ["a"]}), "not json"])
def test_a_bad_plan_becomes_a_note_and_no_plan(output: str) -> None:
    state = snapshot()
    decision = PlanExecutePolicy().on_output(state, context(), output)

    assert isinstance(decision, Note)
    assert "error" in json.loads(decision.text)
    assert "plan" not in state.memory


def test_plan_execute_asks_for_each_plan_step_by_name_then_for_the_answer() -> None:
    policy, state, ctx = PlanExecutePolicy(), snapshot(), context()
    step(policy, state, ctx, plan("Look up France", "State its capital"))

    execute = policy.request(state, ctx)
    assert execute.messages[-1]["content"].startswith("Plan step 1 of 2: Look up France\n")
    assert [list(option["properties"]) for option in execute.json_schema["anyOf"]] == [["tool_calls"], ["step_result"]]

    step(policy, state, ctx, tool_calls(("country_facts", {"country": "France"})), [FOUND])
    assert state.memory["index"] == 1
    assert policy.request(state, ctx).messages[-1]["content"].startswith("Plan step 2 of 2: State its capital\n")

    decision = step(policy, state, ctx, json.dumps({"step_result": " Paris "}))
    assert decision == Note("Result of plan step 2: Paris")
    assert state.memory["index"] == 2

    final = policy.request(state, ctx)
    assert (
        final.messages[-1]["content"]
        == f'Every step of the plan is done. Answer the task as {{"final_answer": "..."}}: {CAPITAL}'
    )
    assert final.json_schema["required"] == ["final_answer"]
    assert policy.on_output(state, ctx, answer(" Paris ")) == Answer("Paris")


def test_a_failed_plan_step_asks_for_a_new_plan_until_max_replans_then_moves_on() -> None:
    policy, state, ctx = PlanExecutePolicy(PolicyOptions(max_replans=1)), snapshot(), context()
    lookup = tool_calls(("country_facts", {"country": "Atlantis"}))
    step(policy, state, ctx, plan("Look up Atlantis", "Answer"))

    step(policy, state, ctx, lookup, [FAILED])
    assert state.memory["replan"] is True and state.memory["replans"] == 1
    again = policy.request(state, ctx)
    assert "The last step failed; write a new plan for what is left." in again.messages[-1]["content"]
    assert again.json_schema["required"] == ["plan"]

    assert step(policy, state, ctx, plan("Look up Atlantis again", "Answer")) == NewPlan(
        ["Look up Atlantis again", "Answer"], revision=2
    )
    assert state.memory["index"] == 0
    step(policy, state, ctx, lookup, [FAILED])
    # No re-plans left: the failure stays an observation and the plan goes on.
    assert state.memory["replan"] is False and state.memory["index"] == 1
    assert policy.request(state, ctx).messages[-1]["content"].startswith("Plan step 2 of 2: Answer\n")


def test_plan_execute_without_tools_offers_only_step_results() -> None:
    policy, state, ctx = PlanExecutePolicy(), snapshot(), context([])
    step(policy, state, ctx, plan("Think"))

    assert [list(o["properties"]) for o in policy.request(state, ctx).json_schema["anyOf"]] == [["step_result"]]


@pytest.mark.parametrize(
    ("output", "error"),
    [
        (json.dumps({"final_answer": "early"}), 'give "tool_calls" or "step_result" for this plan step'),
        (tool_calls(*[("calculator", {})] * 5), "at most 4 tool calls per step"),
    ],
)
def test_a_malformed_plan_step_output_becomes_a_note_and_the_step_stays(output: str, error: str) -> None:
    policy, state, ctx = PlanExecutePolicy(), snapshot(), context()
    step(policy, state, ctx, plan("Look up France"))

    decision = step(policy, state, ctx, output)

    assert isinstance(decision, Note) and error in json.loads(decision.text)["error"]
    assert state.memory["index"] == 0


# Every policy


SCRIPTS: dict[str, list[tuple[str, list[ToolOutcome] | None]]] = {
    "guided": [(call("country_facts", country="France"), [FOUND])],
    "react": [(tool_calls(("country_facts", {"country": "France"}), thought=""), [FOUND])],
    "plan_execute": [
        (plan("Look up France", "Answer"), None),
        (tool_calls(("country_facts", {"country": "Atlantis"})), [FAILED]),
    ],
}


def test_every_policy_has_a_script_here() -> None:
    assert set(SCRIPTS) == set(POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_policy_continues_from_a_snapshot_that_went_through_json(name: str) -> None:
    """A run resumed in another process decides exactly as the one that journaled it."""
    policy, state, ctx = POLICIES[name](), snapshot(), context()
    for output, outcomes in SCRIPTS[name]:
        step(policy, state, ctx, output, outcomes)

    restored = RunSnapshot.from_json(state.to_json())

    assert restored == state  # memory included (react keeps none: its state is the transcript)
    fresh = POLICIES[name]()
    assert fresh.request(restored, ctx) == policy.request(state, ctx)


# Arguments quoted from the request


NAMED = ToolSpec(
    "country_facts",
    "Facts about a country.",
    {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12, "x-from-request": True}},
        "required": ["name"],
    },
)


@pytest.mark.parametrize(
    ("text", "spans", "not_spans"),
    [
        (
            "How many time zones does Latvia have?",
            ["Latvia", "time zones", "How"],
            ["Latgabria", "have?", "Latvia have?"],
        ),
        ("What is the calling code of Virgin Islands (US)?", ["Virgin Islands (US)", "(US)"], ["Islands (US", "(US)?"]),
        ("Who is the president of Macau S.A.R.?", ["Macau S.A.R.", "Macau S.A.R"], ["S.A.R.?"]),
        ("不丹的首都是哪里？", ["不丹", "首都"], ["不丹的首都是哪里？"]),
        ("圣马丁岛（荷兰部分）的首都是哪里？", ["圣马丁岛（荷兰部分）", "荷兰部分"], ["圣马丁岛（"]),
        ("  ", [], []),
    ],
)
def test_request_spans_are_runs_of_words_or_cjk_characters_without_the_punctuation_around_them(
    text: str, spans: list[str], not_spans: list[str]
) -> None:
    found = request_spans(text)
    assert set(spans) <= set(found) and not set(not_spans) & set(found)
    assert all(len(span.split()) <= MAX_SPAN_WORDS for span in found)
    assert len(found) == len(set(found))


def test_a_quoted_argument_is_narrowed_to_the_spans_that_fit_its_length() -> None:
    narrowed = quoted_arguments(NAMED.input_schema, ["Is Latvia in the European Union?"])
    enum = narrowed["properties"]["name"]["enum"]
    assert "Latvia" in enum and "European" in enum and "European Union" not in enum  # 14 characters > maxLength 12
    assert narrowed["properties"]["name"] == {"type": "string", "enum": enum}  # the marker and bounds are gone
    assert NAMED.input_schema["properties"]["name"]["x-from-request"] is True  # the tool's own schema is untouched


def test_a_long_conversation_offers_at_most_max_spans_the_shortest_first() -> None:
    earlier = [" ".join(f"word{i}" for i in range(2000))]
    enum = quoted_arguments(NAMED.input_schema, ["Where is Peru?", *earlier])["properties"]["name"]["enum"]
    assert len(enum) == MAX_SPANS
    assert enum[:3] == ["Where", "is", "Peru"] and all(" " not in span for span in enum)


def test_an_argument_no_span_fits_keeps_its_bounds() -> None:
    narrowed = quoted_arguments(NAMED.input_schema, ["Internationalisation"])  # 20 characters > maxLength 12
    assert narrowed["properties"]["name"] == {"type": "string", "minLength": 1, "maxLength": 12}


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "string", "x-from-request": "yes"},  # only true marks an argument
        {"type": "integer", "x-from-request": True},  # only a string can be quoted
        {"x-from-request": True},
    ],
)
def test_a_marker_that_is_not_true_on_a_string_is_ignored(spec: dict[str, Any]) -> None:
    schema = {"type": "object", "properties": {"name": spec}, "required": ["name"]}
    assert quoted_arguments(schema, ["How big is France?"]) is schema


def test_a_schema_without_the_marker_or_texts_without_spans_is_left_as_it_is() -> None:
    assert quoted_arguments(COUNTRY_FACTS.input_schema, ["How big is France?"]) is COUNTRY_FACTS.input_schema
    assert quoted_arguments(NAMED.input_schema, [" ?! "]) is NAMED.input_schema


def test_guided_calls_name_only_what_the_conversation_named() -> None:
    policy, ctx = GuidedPolicy(), context([NAMED])
    state = snapshot("And its currency?", history=[Turn("What is the capital of France?", "It is Paris.")])

    [option] = policy.request(state, ctx).json_schema["anyOf"]
    enum = option["properties"]["arguments"]["properties"]["name"]["enum"]
    assert {"France", "Paris", "currency"} <= set(enum) and "Latvia" not in enum
    assert policy.on_output(state, ctx, call("country_facts", name="France")) == CallTools(
        [("country_facts", {"name": "France"})]
    )

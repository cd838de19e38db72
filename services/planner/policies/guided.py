"""The guided policy for small models: look a fact up first, then answer with a sentence that states one of them."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from services.planner.grounding import Fact, collect_facts, subject_of
from services.planner.policies.base import (
    Answer,
    CallTools,
    Context,
    Decision,
    ModelRequest,
    Note,
    Policy,
    data_nonce,
    parse_json_object,
)
from services.planner.prompt import (
    NO_ANSWER,
    Step,
    action_schema,
    build_messages,
    fenced_observation,
    free_answer_option,
    grounded_answer_options,
    observation_text,
    tool_call_options,
)
from services.planner.state import RunSnapshot, StepRecord
from services.planner.types import ToolSpec

# Tool calls that found nothing answering the question before the only answer left is NO_ANSWER: one more look with
# another tool helps when the model picked the wrong one; beyond that it is guessing.
MAX_LOOKUPS = 2
# Longest string argument the model may write (unless the tool's schema says otherwise): a country, an expression, a
# short query. Longer is a 135M model repeating itself.
MAX_ARGUMENT_CHARS = 200
_NAMED_TOOL = re.compile(r'"tool":\s*"([^"]+)"')


class GuidedPolicy(Policy):
    """Narrows each step's schema so that a 135M model answers reliably (measured in services/planner/README.md):

    - the first action must be a tool call;
    - once a tool returned facts that answer the question (``Fact.answers``: the question names the fact's key), the
      only action left is a final answer stating one of them as a sentence, or "I could not find the answer."; a fact
      repeating what the call was asked about ("capital": "Bridgetown" for "Bridgetown") counts only when no other
      fact answers (the capital of Luxembourg is Luxembourg);
    - a tool that failed, returned nothing that answers the question, or was named in an action that was not complete
      JSON is not offered again (under greedy decoding the model would repeat the call); after MAX_LOOKUPS such
      attempts the answer is "I could not find the answer.";
    - a second look is a lookup: tools that need a human's approval are offered only as the first action, before any
      tool output was read, so nothing a tool returns can lead to such a call (without this, a run whose lookup found
      nothing had only append_note left to call);
    - string arguments are capped at MAX_ARGUMENT_CHARS;
    - a tool offers only the optional arguments the task asks for (``prompt.asked_arguments``);
    - an argument the tool marks ``x-from-request`` (a country's name) is a span of the conversation's words
      (``prompt.quoted_arguments``).

    Memory: ``facts`` (answering facts so far), ``spent`` (tools not offered again), ``lookups`` (calls made),
    ``data_nonce`` (the fence of tool output).
    """

    name = "guided"

    def request(self, state: RunSnapshot, context: Context) -> ModelRequest:
        nonce = data_nonce(state)
        steps = [Step(record.action, _observation(record, nonce)) for record in state.steps]
        messages = build_messages(
            context.tools, state.history, state.task, steps, context.instructions, context.examples,
            builtin_examples=context.builtin_examples,
        )  # fmt: skip
        return ModelRequest(messages, action_schema(self._options(state, context.tools)))

    def _options(self, state: RunSnapshot, tools: list[ToolSpec] | Any) -> list[dict[str, Any]]:
        facts = [Fact(**f) for f in state.memory.get("facts", [])]
        if facts:
            return grounded_answer_options(facts)
        if not tools:
            return [free_answer_option()]
        if state.memory.get("lookups", 0) >= MAX_LOOKUPS:
            return grounded_answer_options([])
        spent = set(state.memory.get("spent", []))
        offered = [t for t in tools if t.name not in spent]
        if state.memory.get("lookups", 0):
            offered = [t for t in offered if not t.requires_approval]
        earlier = [text for turn in state.history for text in (turn.task, turn.answer)]
        options = tool_call_options(offered, MAX_ARGUMENT_CHARS, asked_in=state.task, earlier=earlier)
        return options or grounded_answer_options([])

    def on_output(self, state: RunSnapshot, context: Context, text: str) -> Decision:
        try:
            action = parse_json_object(text)
        except ValueError as e:
            # Greedy decoding would write the same broken action again: it counts as a lookup of the tool it named,
            # which is not offered again.
            state.memory["lookups"] = state.memory.get("lookups", 0) + 1
            if named := _NAMED_TOOL.search(text):
                state.memory.setdefault("spent", []).append(named.group(1))
            return Note(observation_text({"error": str(e)}))
        if isinstance(action.get("final_answer"), str):
            return Answer(action["final_answer"].strip() or NO_ANSWER)
        if isinstance(action.get("tool"), str) and isinstance(action.get("arguments"), dict):
            return CallTools([(action["tool"], action["arguments"])])
        return Note(observation_text({"error": 'the action needs "final_answer" or "tool" and "arguments"'}))

    def on_results(self, state: RunSnapshot, context: Context, step: StepRecord) -> None:
        memory = state.memory
        for call in step.calls:
            memory["lookups"] = memory.get("lookups", 0) + 1
            found: list[Fact] = []
            if call.error is None:
                asked = [v for v in call.arguments.values() if isinstance(v, str | int | float)]
                subject = subject_of(asked)
                found = [f for f in collect_facts(call.result, subject, exclude=asked) if f.answers(state.task)]
                if not found:
                    # Only a fact repeating the name asked about answers: the capital of Luxembourg is Luxembourg.
                    found = [f for f in collect_facts(call.result, subject) if f.answers(state.task)]
            if found:
                memory.setdefault("facts", []).extend(asdict(f) for f in found)
            else:
                memory.setdefault("spent", []).append(call.tool)


def _observation(record: StepRecord, nonce: str) -> str:
    if record.note is not None:
        return record.note
    return "; ".join(fenced_observation(call.observation, nonce) for call in record.calls)

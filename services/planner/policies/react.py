"""ReAct for capable models: reasoning text, then several tool calls at once (run concurrently) or a final answer."""

from __future__ import annotations

from typing import Any

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
    parse_tool_calls,
)
from services.planner.prompt import UNTRUSTED_DATA, dumps, fenced_observation, observation_text, tool_call_options
from services.planner.state import RunSnapshot, StepRecord

MAX_THOUGHT_CHARS = 600
MAX_ANSWER_CHARS = 2000

REACT_PROMPT = """{instructions}
Think step by step. Reply with one JSON object and nothing else:
{{"thought": "<your reasoning>", "tool_calls": [{{"tool": "<name>", "arguments": {{...}}}}, ...]}} to call tools
(up to {limit}; they run at the same time, so ask for every independent lookup in one step), or
{{"thought": "<your reasoning>", "final_answer": "<the answer>"}} when the observations hold the answer.
{untrusted}

Tools (name: description; arguments as JSON Schema):
{tools}"""


def tool_catalogue(context: Context) -> str:
    """Every tool with its full description and argument schema: a capable model reads them as they are; then the
    agent's examples as task -> call."""
    lines = [f"- {t.name}: {t.description.strip()} {dumps(t.input_schema)}" for t in context.tools]
    if context.examples:
        lines.append("\nExample calls:")
        lines += [f"- {e.task} -> {dumps({'tool': e.tool, 'arguments': e.arguments})}" for e in context.examples]
    return "\n".join(lines) or "(none)"


def transcript_messages(state: RunSnapshot) -> list[dict[str, str]]:
    """Earlier turns, the task, then each step's output and what came of it (observations by call id, fenced)."""
    nonce = data_nonce(state)
    messages: list[dict[str, str]] = []
    for turn in state.history:
        messages += [{"role": "user", "content": turn.task}, {"role": "assistant", "content": turn.answer}]
    messages.append({"role": "user", "content": state.task})
    for record in state.steps:
        messages.append({"role": "assistant", "content": record.action})
        messages.append({"role": "user", "content": step_observations(record, nonce)})
    return messages


def step_observations(record: StepRecord, nonce: str) -> str:
    """A step's note (the planner's own words), or each call's observation fenced as tool data."""
    if record.note is not None:
        return record.note
    lines = [f"{c.call_id} {c.tool}: {fenced_observation(c.observation, nonce)}" for c in record.calls]
    return "Observations:\n" + "\n".join(lines)


def tool_calls_schema(context: Context, limit: int) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"anyOf": tool_call_options(context.tools)},
        "minItems": 1,
        "maxItems": limit,
    }


class ReActPolicy(Policy):
    """Each step the model writes its reasoning, then either tool calls (up to ``max_parallel_tool_calls``, executed
    concurrently) or a final answer. The schema is enforced by constrained decoding; the reasoning is free text."""

    name = "react"

    def request(self, state: RunSnapshot, context: Context) -> ModelRequest:
        limit = self.options.max_parallel_tool_calls
        system = REACT_PROMPT.format(
            instructions=context.instructions.strip(), limit=limit, untrusted=UNTRUSTED_DATA,
            tools=tool_catalogue(context),
        )  # fmt: skip
        thought = {"type": "string", "maxLength": MAX_THOUGHT_CHARS}
        answer = {
            "type": "object",
            "properties": {
                "thought": thought,
                "final_answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS},
            },
            "required": ["thought", "final_answer"],
            "additionalProperties": False,
        }
        options = [answer]
        if context.tools:
            options.insert(
                0,
                {
                    "type": "object",
                    "properties": {"thought": thought, "tool_calls": tool_calls_schema(context, limit)},
                    "required": ["thought", "tool_calls"],
                    "additionalProperties": False,
                },
            )
        messages = [{"role": "system", "content": system}, *transcript_messages(state)]
        return ModelRequest(messages, {"anyOf": options})

    def on_output(self, state: RunSnapshot, context: Context, text: str) -> Decision:
        try:
            action = parse_json_object(text)
            if isinstance(action.get("final_answer"), str) and action["final_answer"].strip():
                return Answer(action["final_answer"].strip())
            if "tool_calls" in action:
                return CallTools(parse_tool_calls(action["tool_calls"], self.options.max_parallel_tool_calls))
            raise ValueError('the action needs "tool_calls" or "final_answer"')
        except ValueError as e:
            return Note(observation_text({"error": str(e)}))

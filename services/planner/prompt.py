"""What the model sees: the system prompt with tools and worked examples, the chat of a run, and the action schema."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.planner.types import ToolSpec, Turn

MAX_ANSWER_CHARS = 160
NO_ANSWER = "I could not find the answer."
MAX_ANSWERS = 64

SYSTEM_PROMPT = """You are MeshPilot, an assistant that answers questions with tools.
Reply with one JSON object and nothing else:
{{"tool": "<tool name>", "arguments": {{...}}}} to call a tool, or
{{"final_answer": "<answer>"}} once an observation holds the answer.

Tools:
{tools}

Examples:
{examples}"""


@dataclass(frozen=True)
class Step:
    """One finished step of the run: the model's action text and the observation it led to (None for none)."""

    action: str
    observation: str | None


@dataclass(frozen=True)
class Example:
    """A worked example shown in the system prompt; ``history`` holds earlier turns of the same conversation."""

    task: str
    steps: tuple[tuple[dict[str, Any], dict[str, Any]], ...]
    answer: str
    history: tuple[tuple[str, str], ...] = ()


EXAMPLES: tuple[Example, ...] = (
    Example(
        task="What is the capital of Peru?",
        steps=(
            (
                {"tool": "country_facts", "arguments": {"country": "Peru"}},
                {"country": "Peru", "capital": "Lima", "currency": "Peruvian sol (PEN, S/.)", "region": "Americas"},
            ),
        ),
        answer="capital: Lima",
    ),
    Example(
        task="What is 12 * 7?",
        steps=(({"tool": "calculator", "arguments": {"expression": "12 * 7"}}, {"result": 84}),),
        answer="result: 84",
    ),
    Example(
        history=(("What is the capital of Kenya?", "capital: Nairobi"),),
        task="What currency does that country use?",
        steps=(
            (
                {"tool": "country_facts", "arguments": {"country": "Kenya"}},
                {
                    "country": "Kenya",
                    "capital": "Nairobi",
                    "currency": "Kenyan shilling (KES, KSh)",
                    "region": "Africa",
                },
            ),
        ),
        answer="currency: Kenyan shilling (KES, KSh)",
    ),
)


def answer_candidates(observations: Sequence[Any], exclude: Iterable[str] = ()) -> list[str]:
    """The facts the tools returned, as answers the model may choose from, plus NO_ANSWER.

    Each scalar in the results becomes "key: value" (the value alone where no key names it), in order of appearance,
    without repeats, at most MAX_ANSWERS. Values in ``exclude`` (what the agent itself asked about, such as the
    arguments of its tool calls) are left out: repeating the question is not an answer.
    """
    excluded = {str(value).strip().lower() for value in exclude}
    found: dict[str, None] = {}

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, str(name))
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            text = str(value).strip()
            fact = f"{key}: {text}" if key else text
            if text and text.lower() not in excluded and len(fact) <= MAX_ANSWER_CHARS and len(found) < MAX_ANSWERS:
                found[fact] = None

    for observation in observations:
        walk(observation, None)
    found[NO_ANSWER] = None
    return list(found)


def dumps(value: Any) -> str:
    """Compact JSON with the separators the constrained decoder emits, so examples and outputs look alike."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _tool_line(tool: ToolSpec) -> str:
    properties = tool.input_schema.get("properties") or {}
    args = ", ".join(f'"{name}": {spec.get("type", "value")}' for name, spec in properties.items())
    return f"- {tool.name} {{{args}}}: {tool.description.strip().splitlines()[0] if tool.description else ''}".rstrip()


def _render_example(example: Example, tool_names: set[str]) -> str | None:
    if any(action["tool"] not in tool_names for action, _ in example.steps):
        return None
    lines = []
    for task, answer in example.history:
        lines += [f"User: {task}", f"Assistant: {dumps({'final_answer': answer})}"]
    lines.append(f"User: {example.task}")
    for action, observation in example.steps:
        lines += [f"Assistant: {dumps(action)}", f"Observation: {dumps(observation)}"]
    lines.append(f"Assistant: {dumps({'final_answer': example.answer})}")
    return "\n".join(lines)


def system_prompt(tools: Sequence[ToolSpec]) -> str:
    """The system prompt: the agent's role, the action format, the tools and the examples whose tools exist."""
    names = {tool.name for tool in tools}
    examples = [text for example in EXAMPLES if (text := _render_example(example, names))]
    return SYSTEM_PROMPT.format(
        tools="\n".join(_tool_line(tool) for tool in tools) or "(none)",
        examples="\n\n".join(examples) or "(none)",
    )


def build_messages(
    tools: Sequence[ToolSpec], history: Sequence[Turn], task: str, steps: Sequence[Step]
) -> list[dict[str, str]]:
    """The chat for the next step: system prompt, earlier turns, the task, then each action and its observation."""
    messages = [{"role": "system", "content": system_prompt(tools)}]
    for turn in history:
        messages.append({"role": "user", "content": turn.task})
        messages.append({"role": "assistant", "content": dumps({"final_answer": turn.answer})})
    messages.append({"role": "user", "content": task})
    for step in steps:
        messages.append({"role": "assistant", "content": step.action})
        if step.observation is not None:
            messages.append({"role": "user", "content": f"Observation: {step.observation}"})
    return messages


def action_schema(
    tools: Sequence[ToolSpec], *, allow_final: bool = True, answers: Sequence[str] | None = None
) -> dict[str, Any]:
    """JSON Schema of one action: a call of exactly one known tool with its arguments, or (if allowed) a final answer.

    With ``answers`` the final answer must be one of them (grounded in what the tools returned); otherwise it is free
    text of at most MAX_ANSWER_CHARS, so a small model cannot ramble into the step's token limit.
    """
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {
                "tool": {"const": tool.name},
                "arguments": tool.input_schema or {"type": "object"},
            },
            "required": ["tool", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    if allow_final or not options:
        options.append(
            {
                "type": "object",
                "properties": {
                    "final_answer": {"enum": list(answers)}
                    if answers
                    else {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS}
                },
                "required": ["final_answer"],
                "additionalProperties": False,
            }
        )
    return {"anyOf": options}

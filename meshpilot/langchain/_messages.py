"""LangChain messages, tools and schemas as the inference service takes them: chats in the planner's action format
(services.planner.prompt) and JSON Schemas for its constrained decoding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jsonschema
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from services.common.errors import quoted
from services.planner.policies.guided import MAX_ARGUMENT_CHARS
from services.planner.prompt import (
    DEFAULT_INSTRUCTIONS,
    Step,
    action_schema,
    build_messages,
    dumps,
    fenced_observation,
    free_answer_option,
    tool_call_options,
)
from services.planner.types import ToolSpec, Turn

# tool_choice values besides a tool's name: "any" is LangChain's word for "required".
TOOL_CHOICES = ("auto", "required", "any", "none")
_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def tool_spec(tool: Any) -> ToolSpec:
    """A bound tool (BaseTool, function, pydantic model or OpenAI tool dict) as the planner's ToolSpec; ValueError
    when its arguments schema is not a JSON object schema (the action format passes arguments as an object)."""
    try:
        function = convert_to_openai_tool(tool)["function"]
    except (KeyError, TypeError, ValueError) as e:
        # LangChain's own message quotes the whole object: not repeated, it may be megabytes.
        raise ValueError(
            f"cannot bind {type(tool).__name__} {quoted(str(tool))} as a tool; pass a BaseTool, a function, a "
            "pydantic model or an OpenAI tool dict"
        ) from e
    name = function["name"]
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    _check_object_schema(schema, f"tool {quoted(name)}")
    return ToolSpec(name, function.get("description") or "", schema)


def tool_choice_of(choice: Any, tools: Sequence[ToolSpec]) -> str:
    """``tool_choice`` as "auto", "required", "none" or a bound tool's name; ValueError for anything else."""
    if choice is None or choice is False:
        return "auto"
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    names = [tool.name for tool in tools]
    if isinstance(choice, str) and (choice in TOOL_CHOICES or choice in names):
        return choice
    raise ValueError(
        f"tool_choice {quoted(str(choice))} is not one of {', '.join(TOOL_CHOICES)} or a bound tool's name "
        f"({', '.join(names)})"
    )


def tools_schema(tools: Sequence[ToolSpec], choice: str) -> dict[str, Any]:
    """The JSON Schema of the model's reply: a call of one of the offered tools (its arguments constrained by the
    tool's own schema), or also a short final answer when ``choice`` is "auto", or only that when it is "none"."""
    if choice == "none":
        return action_schema([free_answer_option()])
    offered = [tool for tool in tools if choice in ("auto", "required") or tool.name == choice]
    options = tool_call_options(offered, MAX_ARGUMENT_CHARS)
    return action_schema([*options, free_answer_option()] if choice == "auto" else options)


def output_schema(schema: Any) -> dict[str, Any]:
    """The JSON Schema of ``with_structured_output``'s ``schema`` (a pydantic model, a JSON Schema, an OpenAI tool or
    a TypedDict); ValueError unless it describes a JSON object."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        found = schema.model_json_schema()
    elif isinstance(schema, dict) and schema.get("type") == "function" and isinstance(schema.get("function"), dict):
        found = schema["function"].get("parameters") or {}
    elif isinstance(schema, dict) and ("type" in schema or "properties" in schema):
        found = schema
    else:
        try:
            found = convert_to_json_schema(schema)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"with_structured_output takes a pydantic model, a JSON Schema or a TypedDict, not "
                f"{type(schema).__name__} {quoted(str(schema))}"
            ) from e
    _check_object_schema(found, "the output schema")
    return found


def _check_object_schema(schema: Any, what: str) -> None:
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        kind = str(schema.get("type")) if isinstance(schema, dict) else type(schema).__name__
        raise ValueError(
            f"{what} must describe a JSON object (type: object), not {quoted(kind)}; wrap the value in a property"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"{what} is not a valid JSON Schema: {e.message[:200]}") from e


def text_of(message: BaseMessage, index: int) -> str:
    """The text of a message; ValueError for content the inference service cannot take (images, audio...)."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"message {index} has a {kind!r} content block; ChatMeshPilot takes text only")
    return "".join(parts)


def plain_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """The messages one for one (system, user, assistant, tool); an assistant's tool calls in the action format."""
    chat = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.type)
        if role is None:
            raise ValueError(f"message {i} is a {message.type!r} message; use system, human, ai or tool messages")
        content = text_of(message, i)
        if isinstance(message, AIMessage) and message.tool_calls:
            content = "\n".join(dumps({"tool": call["name"], "arguments": call["args"]}) for call in message.tool_calls)
        chat.append({"role": role, "content": content})
    return chat


def action_chat(messages: Sequence[BaseMessage], tools: Sequence[ToolSpec], nonce: str) -> list[dict[str, str]]:
    """The chat in the planner's format (``build_messages``): the system prompt listing ``tools`` with the system
    messages as its instructions, earlier questions and answers, the last question, then each tool call made since
    with its result fenced as data (``nonce``)."""
    last = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=None)
    if last is None:
        raise ValueError("the messages hold no HumanMessage; a model with tools answers the last human message")
    instructions = "\n".join(text_of(m, i) for i, m in enumerate(messages) if isinstance(m, SystemMessage))
    history, task = [], None
    for i, message in enumerate(messages[:last]):
        if isinstance(message, HumanMessage):
            task = text_of(message, i)
        elif isinstance(message, AIMessage) and not message.tool_calls and task is not None:
            history.append(Turn(task, text_of(message, i)))
            task = None
    steps = _steps(messages, last, nonce)
    return build_messages(tools, history, text_of(messages[last], last), steps, instructions or DEFAULT_INSTRUCTIONS)


def _steps(messages: Sequence[BaseMessage], last: int, nonce: str) -> list[Step]:
    """The tool calls after the last human message, each with the observation of its ToolMessage."""
    results = {m.tool_call_id: m for m in messages[last + 1 :] if isinstance(m, ToolMessage)}
    steps = []
    for i, message in enumerate(messages[last + 1 :], start=last + 1):
        if isinstance(message, ToolMessage | SystemMessage):
            continue
        if not isinstance(message, AIMessage) or not message.tool_calls:
            raise ValueError(
                f"message {i} ({message.type}) follows the last human message without calling a tool; "
                "a model with tools continues only from tool calls and their results, so add a HumanMessage after it"
            )
        for call in message.tool_calls:
            result = results.get(call["id"] or "")
            observation = (
                fenced_observation(_observation(result, i), nonce)
                if result is not None
                else fenced_observation({"error": "no result"}, nonce)
            )
            steps.append(Step(dumps({"tool": call["name"], "arguments": call["args"]}), observation))
    return steps


def _observation(message: ToolMessage, index: int) -> Any:
    """A tool's result as the model reads it: its JSON when the content is JSON text, an error as {"error": ...}."""
    text = text_of(message, index)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return {"error": value} if message.status == "error" else value

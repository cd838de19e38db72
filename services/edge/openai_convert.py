"""OpenAI chat completions <-> the inference service's Generate: messages, sampling, constraints for tool calls and
JSON responses, and the response objects and stream chunks in OpenAI's exact shapes."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from meshpilot.common.v1 import common_pb2
from meshpilot.inference.v1 import inference_pb2
from services.edge.errors import bad_request
from services.edge.openai_models import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
)

# The planner's action format and its per-tool schemas (services/planner/prompt.py): the inference service's
# constrained decoding then makes every tool call JSON that matches its function's parameters.
from services.planner.prompt import action_schema, dumps, tool_call_options, tool_lines
from services.planner.types import ToolSpec

TOOL_INSTRUCTIONS = """Reply with one JSON object and nothing else:
{{"tool": "<tool name>", "arguments": {{...}}}} to call a tool{answer}.

Tools:
{tools}"""
ANSWER_LINE = ', or\n{"final_answer": "<answer>"} to answer without a tool'

# How an answer action starts (its only key): from here on its string is streamed as content while it is decoded.
_ANSWER_START = re.compile(r'\s*\{\s*"final_answer"\s*:\s*"')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")

_FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_STOP_STRING: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    # A cancelled generation only reaches a client whose request is still open when the service shut down.
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
}


@dataclass(frozen=True)
class ToolMode:
    """How one request's output is read: ``tools`` offered (empty: plain text or JSON, streamed as it comes), and
    whether the model may answer instead of calling one (tool_choice auto)."""

    tools: tuple[ToolSpec, ...] = ()
    may_answer: bool = True
    answer_is_json: bool = False

    @property
    def active(self) -> bool:
        return bool(self.tools)


@dataclass
class Completion:
    """One model output read as OpenAI reads it: text content or tool calls, and why it ended."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{index}].content[{j}] is of type {part.type[:32]!r}; this model reads text only: send "
                "parts of type 'text' with a 'text' field",
                param=f"messages[{index}].content[{j}].type",
            )
        parts.append(part.text)
    return "".join(parts)


def _assistant_text(message: ChatMessage, index: int) -> str:
    """An assistant turn as the model wrote it: its text, and each tool call in the action format."""
    lines = [text] if (text := _text_of(message, index)) else []
    for j, call in enumerate(message.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            raise bad_request(
                f"messages[{index}].tool_calls[{j}].function.arguments is not JSON; send the arguments object as "
                "JSON text, as the model returned it",
                param=f"messages[{index}].tool_calls[{j}].function.arguments",
            ) from None
        lines.append(dumps({"tool": call.function.name, "arguments": arguments}))
    return "\n".join(lines)


def _unicode(text: str, param: str) -> str:
    """``text``, or a 400 naming ``param`` when it holds a lone surrogate (JSON's "\\ud800" escapes decode to one),
    which protobuf strings (UTF-8) cannot carry."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param} holds a lone UTF-16 surrogate at character {e.start}; send valid Unicode (pair each \\ud800-"
            "\\udbff escape with a \\udc00-\\udfff one)",
            param=param,
        ) from None
    return text


def chat_messages(request: ChatCompletionRequest, mode: ToolMode) -> list[inference_pb2.ChatMessage]:
    """The request's messages in the inference service's roles, the tool instructions added to the system prompt."""
    messages: list[inference_pb2.ChatMessage] = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        text = _assistant_text(message, i) if role == "assistant" else _text_of(message, i)
        messages.append(inference_pb2.ChatMessage(role=role, content=_unicode(text, f"messages[{i}].content")))
    if mode.active:
        instructions = TOOL_INSTRUCTIONS.format(
            answer=ANSWER_LINE if mode.may_answer else "", tools=tool_lines(mode.tools)
        )
        if messages and messages[0].role == "system":
            messages[0].content = f"{messages[0].content.rstrip()}\n\n{instructions}"
        else:
            messages.insert(0, inference_pb2.ChatMessage(role="system", content=instructions))
    return messages


def tool_mode(request: ChatCompletionRequest) -> ToolMode:
    """What tool_choice asks for: no tools (none, or no tools given), one of them or an answer (auto, the default),
    any of them (required), or the named one."""
    choice = request.tool_choice
    if not request.tools:
        if choice is not None and choice != "none":
            raise bad_request(
                "tool_choice is set but tools is empty; send the tools to choose from, or leave tool_choice out",
                param="tool_choice",
            )
        return ToolMode()
    if choice == "none":
        return ToolMode()
    specs = [
        ToolSpec(tool.function.name, tool.function.description, tool.function.parameters or {})
        for tool in request.tools
    ]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise bad_request("tools names a function twice; give each function one unique name", param="tools")
    for i, spec in enumerate(specs):
        if spec.input_schema and spec.input_schema.get("type", "object") != "object":
            raise bad_request(
                f"tools[{i}].function.parameters must be a JSON Schema of type 'object' (the arguments object)",
                param=f"tools[{i}].function.parameters",
            )
    answer_is_json = _response_schema(request) is not None
    if isinstance(choice, NamedToolChoice):
        chosen = [spec for spec in specs if spec.name == choice.function.name]
        if not chosen:
            raise bad_request(
                f"tool_choice names function {choice.function.name[:64]!r}, which is not in tools; name one of "
                f"{', '.join(names)[:500]}",
                param="tool_choice",
            )
        return ToolMode(tuple(chosen), may_answer=False, answer_is_json=answer_is_json)
    return ToolMode(tuple(specs), may_answer=choice != "required", answer_is_json=answer_is_json)


def _response_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON Schema response_format asks for (json_object: any object), or None for text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request(
            "response_format of type json_schema needs json_schema.schema (a JSON Schema); add it or use "
            "type json_object",
            param="response_format.json_schema",
        )
    return fmt.json_schema.schema_


def output_schema(request: ChatCompletionRequest, mode: ToolMode) -> dict[str, Any] | None:
    """The JSON Schema the output is constrained to: one action of the offered tools (or an answer, with the
    response format's schema when one is asked for), else the response format's, else None (free text)."""
    response = _response_schema(request)
    if not mode.active:
        return response
    options = tool_call_options(mode.tools)
    if mode.may_answer:
        answer: dict[str, Any] = response if response is not None else {"type": "string", "minLength": 1}
        options.append(
            {
                "type": "object",
                "properties": {"final_answer": answer},
                "required": ["final_answer"],
                "additionalProperties": False,
            }
        )
    return action_schema(options)


def _unsupported(request: ChatCompletionRequest) -> None:
    if request.n not in (None, 1):
        raise bad_request(f"n is {request.n}; this endpoint returns one choice: set n to 1 or leave it out", "n")
    if request.logprobs:
        raise bad_request("logprobs are not available from this endpoint; set logprobs to false", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise bad_request(f"{name} is not supported; leave it out or set it to 0", name)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream: true; remove it or set stream", "stream_options")


def _stop_strings(request: ChatCompletionRequest) -> list[str]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop has {len(stop)} strings; send at most {MAX_STOP_STRINGS}", "stop")
    for value in stop:
        if not value or len(value) > MAX_STOP_CHARS:
            raise bad_request(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return stop


def to_generate_request(request: ChatCompletionRequest) -> tuple[inference_pb2.GenerateRequest, ToolMode]:
    """The Generate call for ``request`` and how to read its output; OpenAIError (400) naming the field otherwise."""
    _unsupported(request)
    try:
        return _generate_request(request)
    except UnicodeEncodeError as e:  # a lone surrogate outside the messages: in a tool, a schema, a stop string
        raise bad_request(
            f"the request holds a lone UTF-16 surrogate ({e.object[e.start : e.end]!a}); send valid Unicode"
        ) from None


def _generate_request(request: ChatCompletionRequest) -> tuple[inference_pb2.GenerateRequest, ToolMode]:
    mode = tool_mode(request)
    sampling = inference_pb2.SamplingParams()
    if request.temperature is not None:
        sampling.temperature = request.temperature
    if request.top_p is not None:
        sampling.top_p = request.top_p
    if request.seed is not None:
        sampling.seed = request.seed
    generate = inference_pb2.GenerateRequest(
        model=request.model,
        chat=inference_pb2.ChatInput(messages=chat_messages(request, mode)),
        max_tokens=request.max_completion_tokens or request.max_tokens or 0,
        sampling=sampling,
        stop=_stop_strings(request),
    )
    schema = output_schema(request, mode)
    if schema is not None:
        generate.constraint.json_schema = json.dumps(schema, ensure_ascii=False)
    return generate, mode


def finish_reason(reason: int) -> str:
    return _FINISH_REASONS.get(reason, "stop")  # type: ignore[call-overload]


def _string_prefix(body: str) -> tuple[str, bool]:
    """The decoded text of a JSON string whose body (after the opening quote) begins ``body``, as far as it is
    complete (an escape cut in half waits for the rest), and whether its closing quote was reached."""
    i, cut, closed = 0, 0, False
    while i < len(body):
        char = body[i]
        if char == '"':
            cut, closed = i, True
            break
        if char != "\\":
            i += 1
            cut = i
            continue
        if i + 1 >= len(body):
            break
        if body[i + 1] != "u":
            i += 2
        else:
            if not _HEX4.fullmatch(body[i + 2 : i + 6]):
                break
            high = 0xD800 <= int(body[i + 2 : i + 6], 16) <= 0xDBFF
            # A high surrogate decodes only with the low one after it.
            if high and not (body[i + 6 : i + 8] == "\\u" and _HEX4.fullmatch(body[i + 8 : i + 12])):
                break
            i += 12 if high else 6
        cut = i
    try:
        return json.loads(f'"{body[:cut]}"', strict=False), closed
    except ValueError:  # an escape JSON does not have: the constrained decoder never writes one
        return "", closed


def partial_answer(text: str) -> str | None:
    """The answer an action's text has given so far, when it is an answer action ({"final_answer": "..."}), else
    None (a tool call, or not yet known)."""
    start = _ANSWER_START.match(text)
    return _string_prefix(text[start.end() :])[0] if start else None


class AnswerStream:
    """Content deltas of an answer action while it is decoded, so that a reply under tool_choice auto streams like
    plain text; a tool call streams nothing here (it is sent whole at the end)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = ""

    @property
    def started(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str) -> str:
        self.text += delta
        answer = partial_answer(self.text)
        if answer is None or len(answer) <= len(self.sent):
            return ""
        new, self.sent = answer[len(self.sent) :], answer
        return new


def read_output(text: str, reason: int, mode: ToolMode) -> Completion:
    """The model's output as OpenAI content or tool calls. In tool mode the output is one action (constrained), unless
    it was cut by max_tokens: then the text as it is, finish_reason length."""
    finished = finish_reason(reason)
    if not mode.active:
        return Completion(text, finish_reason=finished)
    try:
        action = json.loads(text)
    except ValueError:
        # Cut by max_tokens: an answer's text so far, else what the model wrote.
        answer = None if mode.answer_is_json else partial_answer(text)
        return Completion(text if answer is None else answer, finish_reason=finished)
    if isinstance(action, dict) and "tool" in action:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": action["tool"],
                "arguments": json.dumps(action.get("arguments", {}), ensure_ascii=False),
            },
        }
        return Completion(None, [call], "tool_calls")
    answer = action.get("final_answer", "") if isinstance(action, dict) else action
    content = answer if isinstance(answer, str) and not mode.answer_is_json else json.dumps(answer, ensure_ascii=False)
    return Completion(content, finish_reason=finished)


def usage_of(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _message(completion: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": completion.content, "refusal": None}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return message


def completion_response(
    completion_id: str, model: str, completion: Completion, usage: common_pb2.Usage
) -> dict[str, Any]:
    """A whole chat.completion object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": _message(completion), "logprobs": None, "finish_reason": completion.finish_reason}
        ],
        "usage": usage_of(usage),
    }


def chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One chat.completion.chunk: a delta of choice 0 (``delta`` None: the usage chunk, with no choices). With
    include_usage every chunk has a usage field, null but on the last (OpenAI's stream_options contract)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage:
        body["usage"] = usage
    return body


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls as a stream delta: each with its index, the whole arguments in one piece."""
    return [{"index": i, **call} for i, call in enumerate(calls)]

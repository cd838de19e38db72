"""The OpenAI chat-completions request as pydantic models: what the edge accepts, bounded, with fields it ignores."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's own limits where it states them (function names, stop strings, tools per request).
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class _Lenient(BaseModel):
    """Unknown fields are ignored, as OpenAI's server does: clients send fields of newer API versions."""

    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Lenient):
    name: str = Field(..., pattern=FUNCTION_NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, at most 64.")
    description: str = Field("", max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments (an object).")
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Lenient):
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., description="The arguments as JSON text.")


class ToolCall(_Lenient):
    id: str = Field("", max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: str = Field(..., max_length=64)
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=128)


class FunctionName(_Lenient):
    name: str = Field(..., max_length=64)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Lenient):
    name: str = Field(..., pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    # "schema" shadows a BaseModel attribute; the alias keeps the wire name.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """POST /v1/chat/completions. Fields the mesh cannot honour (n > 1, logprobs, penalties) are refused by the
    converter with what to change; ones that change nothing (user, metadata, store) are ignored."""

    model: str = Field(..., max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    max_tokens: int | None = Field(None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**31)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = Field(None, max_length=256)

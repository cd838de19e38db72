"""ChatMeshPilot: the inference service as a LangChain chat model, with tool calls and structured output produced by
its constrained decoding."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict
from operator import itemgetter
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.langchain._connection import OPENING, MeshConnection
from meshpilot.langchain._messages import (
    action_chat,
    output_schema,
    plain_chat,
    tool_choice_of,
    tool_spec,
    tools_schema,
)
from services.common.config import load_config
from services.common.errors import bounded
from services.common.tls import TlsIdentity
from services.planner.guardrails import new_nonce
from services.planner.policies.base import parse_json_object
from services.planner.types import ToolSpec

_FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP_STRING: "stop",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
# What bind_tools / with_structured_output bind; other call options are refused rather than silently ignored.
_CALL_OPTIONS = frozenset({"tools", "tool_choice", "response_format"})


class ChatMeshPilot(BaseChatModel):
    """A chat model served by MeshPilot's inference service (``InferenceService.Generate`` over gRPC).

    - ``invoke``/``ainvoke`` and ``stream``/``astream``: text deltas as AIMessageChunks, the last one with usage
      metadata (tokens, cached prompt tokens) and the finish reason.
    - ``bind_tools``: the reply is produced under a JSON Schema (the inference service's constrained decoding), so a
      tool call always names a bound tool and its arguments always validate against that tool's schema. The chat is
      rendered in the planner's action format (services.planner.prompt), tool results fenced as data.
      ``tool_choice``: "auto" (a call or a short answer, at most 160 characters, the planner's cap for small models),
      "required"/"any", "none", or a tool's name. A reply with tools bound arrives as one chunk (an action is known
      once it is complete).
    - ``with_structured_output``: the reply is JSON valid against the schema (pydantic model or JSON Schema).

    gRPC failures raise services.common MeshErrors whose message names the service, its address and what to change.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target: str = Field(default_factory=lambda: load_config().inference.server.target())
    """The inference service's address (host:port or dns:///name:port); default: the mesh config's (what `meshpilot up`
    serves: $MESHPILOT_CONFIG and MESHPILOT_* variables apply)."""
    model: str = ""
    """A model id from ListModels; empty selects the service's default model."""
    api_key: SecretStr | None = None
    """Sent as a bearer token with every call (for an inference service behind authentication)."""
    tls: TlsIdentity | None = None
    """Mutual TLS: the certificate to present and the mesh CA to trust (services.common.tls.tls_identity)."""
    tls_server_name: str | None = None
    """The name the server's certificate must carry (e.g. "inference"), when it is not the target's host."""
    temperature: float | None = None
    """0 is greedy; None leaves the service default (1)."""
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int = Field(0, ge=0)
    """Upper bound on generated tokens; 0 selects the service default."""
    stop: list[str] | None = None
    """Generation stops before any of these strings."""
    timeout: float | None = Field(None, gt=0)
    """Deadline of one call, seconds; None: no deadline."""

    _connection: MeshConnection | None = PrivateAttr(default=None)
    # Fences tool results in the prompt: random, so tool output cannot close its fence, and kept for the model's
    # lifetime, so successive calls of one conversation share their prompt's prefix (the service's prefix cache).
    _nonce: str = PrivateAttr(default_factory=new_nonce)

    @property
    def _llm_type(self) -> str:
        return "meshpilot"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"target": self.target, "model": self.model, "temperature": self.temperature, "seed": self.seed}

    def connection(self) -> MeshConnection:
        """The channel to the inference service, opened on first use and shared by every binding of this model."""
        with OPENING:
            if self._connection is None:
                self._connection = MeshConnection(
                    "inference",
                    self.target,
                    api_key=self.api_key.get_secret_value() if self.api_key else None,
                    tls=self.tls,
                    server_name=self.tls_server_name,
                )
            return self._connection

    def close(self) -> None:
        """Closes the channel (a later call opens it again)."""
        if self._connection is not None:
            self._connection.close()

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with ``tools`` offered on every call; ValueError for no tools, duplicate names, a schema that
        is not an object, or an unknown ``tool_choice``.

        ``parallel_tool_calls`` and ``strict`` are taken for the agents that pass them: a reply holds one tool call
        and its arguments always follow the tool's schema (constrained decoding), so neither changes anything.
        """
        specs = [tool_spec(tool) for tool in tools]
        if not specs:
            raise ValueError("bind_tools needs at least one tool")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(bounded(f"bound tools need distinct names, got {', '.join(names)}"))
        choice = tool_choice_of(tool_choice, specs)
        return self.bind(tools=[asdict(spec) for spec in specs], tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """This model replying with JSON valid against ``schema`` (the inference service's json_schema constraint),
        parsed: an instance of ``schema`` when it is a pydantic model, else a dict. With ``include_raw``: a dict of
        ``raw`` (the AIMessage), ``parsed`` and ``parsing_error``. ``method="json_mode"``: any JSON object, no schema.
        ValueError for a schema that is not an object."""
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method {method!r} is not one of json_schema, function_calling, json_mode")
        if kwargs.pop("strict", None) is False:
            raise ValueError("ChatMeshPilot's structured output is always strict (constrained decoding)")
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments: {', '.join(sorted(kwargs))}")
        json_schema = {"type": "object"} if method == "json_mode" else output_schema(schema)
        llm = self.bind(response_format=json_schema)
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        parser: Runnable[Any, Any] = (
            PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()  # type: ignore[arg-type]
        )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, options: dict[str, Any]
    ) -> tuple[inference_pb2.GenerateRequest, _Reply]:
        unknown = sorted(k for k in options if k not in _CALL_OPTIONS and not k.startswith("ls_"))
        if unknown:
            raise ValueError(f"ChatMeshPilot does not take {', '.join(unknown)}; set fields on the model instead")
        tools = [ToolSpec(**spec) for spec in options.get("tools") or []]
        response_format = options.get("response_format")
        if tools and response_format is not None:
            raise ValueError("bind tools or ask for structured output, not both on one call")
        request = inference_pb2.GenerateRequest(model=self.model, max_tokens=self.max_tokens)
        request.stop.extend([*(self.stop or []), *(stop or [])])
        chat = action_chat(messages, tools, self._nonce) if tools else plain_chat(messages)
        request.chat.messages.extend(inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
        for name in ("temperature", "top_p", "top_k", "seed"):
            if (value := getattr(self, name)) is not None:
                setattr(request.sampling, name, value)
        if tools:
            schema = tools_schema(tools, options.get("tool_choice") or "auto")
            request.constraint.json_schema = json.dumps(schema, ensure_ascii=False)
        elif response_format is not None:
            request.constraint.json_schema = json.dumps(response_format, ensure_ascii=False)
        return request, _Reply(actions=bool(tools))

    def _open(self, request: inference_pb2.GenerateRequest) -> Callable[[Any], Any]:
        return lambda channel: inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=self.timeout)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, reply = self._request(messages, stop, kwargs)
        for response in self.connection().stream(self._open(request)):
            for chunk in reply.add(response):
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, reply = self._request(messages, stop, kwargs)
        async for response in self.connection().astream(self._open(request)):
            for chunk in reply.add(response):
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))


class _Reply:
    """One Generate stream as chunks: text deltas as they arrive and a last chunk with usage and finish reason; with
    tools bound (``actions``) the text is an action, held back and turned into a tool call or an answer at the end."""

    def __init__(self, *, actions: bool) -> None:
        self._actions = actions
        self._held: list[str] = []

    def add(self, response: inference_pb2.GenerateResponse) -> list[ChatGenerationChunk]:
        chunks = []
        if response.text and self._actions:
            self._held.append(response.text)
        elif response.text:
            chunks.append(ChatGenerationChunk(message=AIMessageChunk(content=response.text)))
        if response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            chunks.append(self._last(response))
        return chunks

    def _last(self, response: inference_pb2.GenerateResponse) -> ChatGenerationChunk:
        usage = UsageMetadata(
            input_tokens=response.usage.prompt_tokens,
            output_tokens=response.usage.completion_tokens,
            total_tokens=response.usage.total_tokens,
            input_token_details={"cache_read": response.usage.cached_prompt_tokens},
        )
        finish_reason = _FINISH_REASONS.get(response.finish_reason, "stop")
        metadata = {"model_name": response.model, "model_provider": "meshpilot", "finish_reason": finish_reason}
        content, calls = self._action() if self._actions else ("", [])
        if calls:
            metadata["finish_reason"] = "tool_calls"
        message = AIMessageChunk(
            content=content,
            tool_call_chunks=calls,
            usage_metadata=usage,
            response_metadata=metadata,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": metadata["finish_reason"]})

    def _action(self) -> tuple[str, list[Any]]:
        """(answer text, tool call chunks) of the held action; an action cut short (max_tokens) stays as text."""
        text = "".join(self._held)
        try:
            action = parse_json_object(text)
        except ValueError:
            return text, []
        if isinstance(action.get("tool"), str):
            arguments = json.dumps(action.get("arguments") or {}, ensure_ascii=False)
            call = tool_call_chunk(name=action["tool"], args=arguments, id=f"call_{uuid.uuid4().hex}", index=0)
            return "", [call]
        return str(action.get("final_answer", text)), []

"""Proto <-> engine conversion for the inference service, with the request checks that need no model."""

from __future__ import annotations

import math

from inference_core import (
    Constraint,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
)
from meshpilot.common.v1 import common_pb2
from meshpilot.inference.v1 import inference_pb2
from services.common import InvalidArgumentError
from services.common.auth import DEFAULT_TENANT

_CONSTRAINT_KINDS = {"json_schema": "json_schema", "regex": "regex", "ebnf_grammar": "ebnf"}
_FINISH_REASONS = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: inference_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}


def input_of(
    request: inference_pb2.GenerateRequest | inference_pb2.CountTokensRequest,
) -> tuple[str | None, list[dict[str, str]] | None]:
    """(prompt, messages) with exactly one set; raises InvalidArgumentError when the input is missing or empty."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("the request has no input; set prompt (raw text) or chat (messages)")
    if which == "prompt":
        if not request.prompt:
            raise InvalidArgumentError("prompt is empty; send some text")
        return request.prompt, None
    if not request.chat.messages:
        raise InvalidArgumentError("chat has no messages; send at least one message")
    return None, [{"role": m.role, "content": m.content} for m in request.chat.messages]


def sampling_of(proto: inference_pb2.SamplingParams) -> SamplingParams:
    """Service defaults for unset fields (temperature 1, top_p 1, top_k off, repetition_penalty 1)."""
    temperature = proto.temperature if proto.HasField("temperature") else 1.0
    top_p = proto.top_p if proto.HasField("top_p") else 1.0
    top_k = proto.top_k if proto.HasField("top_k") else 0
    penalty = proto.repetition_penalty if proto.HasField("repetition_penalty") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"sampling.temperature must be >= 0 (0 is greedy), got {temperature:g}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"sampling.top_p must be in (0, 1], got {top_p:g}")
    if top_k < 0:
        raise InvalidArgumentError(f"sampling.top_k must be >= 0 (0 disables it), got {top_k}")
    if not math.isfinite(penalty) or penalty <= 0:
        raise InvalidArgumentError(f"sampling.repetition_penalty must be > 0 (1 disables it), got {penalty:g}")
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=proto.seed if proto.HasField("seed") else None,
        repetition_penalty=penalty,
    )


def constraint_of(proto: inference_pb2.OutputConstraint) -> Constraint | None:
    which = proto.WhichOneof("kind")
    if which is None:
        return None
    value = getattr(proto, which)
    if not value.strip():
        raise InvalidArgumentError(f"constraint.{which} is empty; send the {which.replace('_', ' ')} text or unset it")
    return Constraint(kind=_CONSTRAINT_KINDS[which], value=value)  # type: ignore[arg-type]


def to_generation_request(
    request: inference_pb2.GenerateRequest,
    *,
    default_max_tokens: int,
    request_id: str,
    context_length: int,
    tenant: str = DEFAULT_TENANT,
) -> GenerationRequest:
    """Validates a GenerateRequest for a model of ``context_length`` tokens and converts it, served for ``tenant``;
    raises InvalidArgumentError saying what to change."""
    prompt, messages = input_of(request)
    if request.max_tokens < 0:
        raise InvalidArgumentError(
            f"max_tokens must be >= 0 (0 selects the default {default_max_tokens}), got {request.max_tokens}"
        )
    if request.max_tokens > context_length:
        raise InvalidArgumentError(
            f"max_tokens must be at most {context_length}, the model's context (prompt and output together), "
            f"got {request.max_tokens}"
        )
    for i, stop in enumerate(request.stop):
        if not stop:
            raise InvalidArgumentError(f"stop[{i}] is an empty string; remove it")
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        messages=messages,
        max_tokens=request.max_tokens or default_max_tokens,
        sampling=sampling_of(request.sampling),
        stop=list(request.stop),
        constraint=constraint_of(request.constraint) if request.HasField("constraint") else None,
        tenant=tenant,
    )


def to_generate_response(chunk: GenerationChunk, model_id: str) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids, model=model_id)
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[chunk.finish_reason]
    if chunk.usage is not None:
        response.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=chunk.usage.prompt_tokens,
                completion_tokens=chunk.usage.completion_tokens,
                total_tokens=chunk.usage.total_tokens,
                cached_prompt_tokens=chunk.usage.cached_prompt_tokens,
            )
        )
    if chunk.timings is not None:
        response.timings.CopyFrom(
            common_pb2.Timings(
                queue_ms=chunk.timings.queue_ms,
                time_to_first_token_ms=chunk.timings.time_to_first_token_ms,
                total_ms=chunk.timings.total_ms,
                decode_tokens_per_second=chunk.timings.decode_tokens_per_second,
            )
        )
    return response


def to_model(info: ModelInfo, *, is_default: bool) -> inference_pb2.Model:
    return inference_pb2.Model(
        id=info.id,
        backend=info.backend,
        context_length=info.context_length,
        device=info.device,
        dtype=info.dtype,
        is_default=is_default,
    )

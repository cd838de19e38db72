"""The CPU twin's reading of a TensorRT-LLM backend request: named input arrays to an inference_core GenerationRequest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import text_codec

from inference_core import Constraint, GenerationRequest, SamplingParams

# TensorRT-LLM's guided_decoding_guide_type values and the engine constraint each becomes ("json": any JSON value).
GUIDE_TYPES = {"json_schema": "json_schema", "json": "json_schema", "regex": "regex", "ebnf_grammar": "ebnf"}
ANY_JSON_SCHEMA = "{}"
UNSUPPORTED_WHEN_SET = ("lora_task_id", "lora_weights", "lora_config")
UNSUPPORTED_FLAGS = ("return_log_probs", "return_context_logits", "return_generation_logits")


@dataclass(frozen=True)
class TwinRequest:
    """One request as the twin serves it: the engine request plus what shapes the responses."""

    generation: GenerationRequest
    prompt_ids: list[int]
    streaming: bool
    exclude_input_in_output: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    return_perf_metrics: bool


def parse_request(
    inputs: Mapping[str, np.ndarray],
    tokenizer: Any,
    *,
    exclude_input_default: bool,
    guided_decoding: bool,
    special_prefix: list[int],
) -> TwinRequest:
    """Converts the tensorrt_llm inputs of one request (batch size 1) into a TwinRequest.

    Raises ValueError with a message naming the input and what to send instead: for a batch larger than one, and for
    features the torch engine does not have (beams, LoRA, log probs, logits, bad words, embedding bias, presence and
    frequency penalties, min_tokens above 1, another end_id).
    """
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("input_ids is missing; send the prompt's token ids")
    ids = np.asarray(ids)
    if ids.ndim > 1 and ids.shape[0] != 1:
        raise ValueError(f"the CPU twin serves one sequence per request; got a batch of {ids.shape[0]}, send 1")
    length = _scalar(inputs, "input_lengths", ids.size)
    prompt_ids = [int(i) for i in ids.reshape(-1)[: int(length)]]
    if not prompt_ids:
        raise ValueError("input_ids is empty; send a non-empty prompt")
    _reject_unsupported(inputs, tokenizer)
    # The engine tokenizes text itself and adds the tokenizer's special prefix (BOS) again.
    body = (
        prompt_ids[len(special_prefix) :]
        if special_prefix and prompt_ids[: len(special_prefix)] == special_prefix
        else prompt_ids
    )
    prompt = text_codec.decode(tokenizer, body, skip_special_tokens=False)
    stops = (
        [
            text_codec.decode(tokenizer, word, skip_special_tokens=False)
            for word in text_codec.ids_list_to_token_lists(inputs["stop_words_list"])
        ]
        if inputs.get("stop_words_list") is not None
        else []
    )
    generation = GenerationRequest(
        prompt=prompt,
        max_tokens=int(_scalar(inputs, "request_output_len", 0)),
        sampling=_sampling(inputs),
        stop=[s for s in stops if s],
        constraint=_constraint(inputs, guided_decoding),
    )
    return TwinRequest(
        generation=generation,
        prompt_ids=prompt_ids,
        streaming=_flag(inputs, "streaming", False),
        exclude_input_in_output=_flag(inputs, "exclude_input_in_output", exclude_input_default),
        return_num_input_tokens=_flag(inputs, "return_num_input_tokens", False),
        return_num_output_tokens=_flag(inputs, "return_num_output_tokens", False),
        return_perf_metrics=_flag(inputs, "return_perf_metrics", False),
    )


def _sampling(inputs: Mapping[str, np.ndarray]) -> SamplingParams:
    top_k = int(_scalar(inputs, "runtime_top_k", 0))
    top_p = float(_scalar(inputs, "runtime_top_p", 0.0))
    temperature = float(_scalar(inputs, "temperature", 1.0))
    seed = inputs.get("seed")
    repetition_penalty = float(_scalar(inputs, "repetition_penalty", 1.0))
    # TensorRT-LLM decodes greedily unless top_k > 1 or top_p > 0 asks for sampling.
    if (top_k <= 1 and top_p <= 0.0) or temperature == 0.0:
        return SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    return SamplingParams(
        temperature=temperature,
        top_k=max(top_k, 0),
        top_p=top_p if top_p > 0.0 else 1.0,
        seed=None if seed is None else int(np.asarray(seed).reshape(-1)[0]),
        repetition_penalty=repetition_penalty,
    )


def _constraint(inputs: Mapping[str, np.ndarray], guided_decoding: bool) -> Constraint | None:
    guide_type = text_codec.strings(inputs.get("guided_decoding_guide_type"))
    guide = text_codec.strings(inputs.get("guided_decoding_guide"))
    if not guide_type:
        if guide:
            raise ValueError("guided_decoding_guide was sent without guided_decoding_guide_type; send both")
        return None
    if not guided_decoding:
        raise ValueError(
            "guided decoding is disabled in this model repository; regenerate it with guided_decoding_backend=xgrammar"
        )
    kind = GUIDE_TYPES.get(guide_type[0])
    if kind is None:
        raise ValueError(
            f"guided_decoding_guide_type {guide_type[0]!r} is not supported by the CPU twin; use one of "
            + ", ".join(GUIDE_TYPES)
        )
    if guide_type[0] == "json":
        return Constraint(kind="json_schema", value=ANY_JSON_SCHEMA)
    if not guide:
        raise ValueError(f"guided_decoding_guide is empty; send the {guide_type[0]} text")
    return Constraint(kind=kind, value=guide[0])  # type: ignore[arg-type]


def _reject_unsupported(inputs: Mapping[str, np.ndarray], tokenizer: Any) -> None:
    for name in UNSUPPORTED_WHEN_SET:
        if inputs.get(name) is not None:
            raise ValueError(f"{name} is not supported by the CPU twin (no LoRA in the torch engine); leave it unset")
    for name in UNSUPPORTED_FLAGS:
        if _flag(inputs, name, False):
            raise ValueError(f"{name} is not supported by the CPU twin's torch engine; leave it unset or false")
    for name in ("beam_width", "num_return_sequences"):
        if int(_scalar(inputs, name, 1)) > 1:
            raise ValueError(f"{name} > 1 is not supported by the CPU twin (greedy or sampled, one sequence); send 1")
    for name in ("presence_penalty", "frequency_penalty"):
        if float(_scalar(inputs, name, 0.0)) != 0.0:
            raise ValueError(f"{name} is not supported by the CPU twin's torch engine; leave it unset or 0")
    if int(_scalar(inputs, "min_tokens", 0)) > 1:
        raise ValueError("min_tokens above 1 is not supported by the CPU twin's torch engine; leave it unset")
    end_id = inputs.get("end_id")
    if end_id is not None and int(np.asarray(end_id).reshape(-1)[0]) != tokenizer.eos_token_id:
        raise ValueError(
            f"end_id {int(np.asarray(end_id).reshape(-1)[0])} differs from the model's end token "
            f"{tokenizer.eos_token_id}; the CPU twin stops only at the model's own; leave end_id unset"
        )
    bad = inputs.get("bad_words_list")
    if bad is not None and text_codec.ids_list_to_token_lists(bad):
        raise ValueError("bad_words is not supported by the CPU twin's torch engine; leave it unset")
    bias = inputs.get("embedding_bias")
    if bias is not None and np.asarray(bias).size and np.any(np.asarray(bias) != 0):
        raise ValueError("embedding_bias_words is not supported by the CPU twin's torch engine; leave it unset")


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default: Any) -> Any:
    value = inputs.get(name)
    if value is None or np.asarray(value).size == 0:
        return default
    return np.asarray(value).reshape(-1)[0].item()


def _flag(inputs: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    return bool(_scalar(inputs, name, default))

"""Our request's sampling, limits and constraint as OpenVINO GenAI's GenerationConfig fields, and its finish back."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from inference_core.errors import InvalidRequestError
from inference_core.types import Constraint, FinishReason, GenerationRequest

STRUCTURED_FIELDS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "grammar"}
"""Our constraint kind -> the StructuredOutputConfig field that carries it (EBNF goes in as xgrammar's GBNF)."""


PROMPT_LOOKUP_NGRAM = 3
"""The longest n-gram of a sequence's last tokens that prompt lookup looks for earlier in it (the torch engine's too)."""


def generation_fields(
    request: GenerationRequest, max_new_tokens: int, eos_token_ids: Iterable[int], prompt_lookup_tokens: int = 0
) -> dict[str, Any]:
    """The GenerationConfig attributes of ``request`` (validated already). Stop strings are not passed: the engine
    matches them on the streamed text, as the torch engine does, and stops the request itself.
    prompt_lookup_tokens: the draft length of a pipeline built with prompt lookup (it refuses requests without one)."""
    sampling = request.sampling
    fields: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "stop_token_ids": set(eos_token_ids),
        "num_return_sequences": 1,
        "repetition_penalty": sampling.repetition_penalty,
    }
    fields |= prompt_lookup_fields(prompt_lookup_tokens)
    if sampling.is_greedy:
        fields["do_sample"] = False
    else:
        fields["do_sample"] = True
        fields["temperature"] = sampling.temperature
        fields["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            fields["top_k"] = sampling.top_k
        # rng_seed 0 would mean "the pipeline's default seed", the same for every unseeded request.
        fields["rng_seed"] = sampling.seed if sampling.seed is not None else secrets.randbits(31) + 1
    return fields


def prompt_lookup_fields(prompt_lookup_tokens: int) -> dict[str, int]:
    """What every request to a pipeline built with prompt lookup must carry (none when it is off)."""
    if prompt_lookup_tokens <= 0:
        return {}
    return {"num_assistant_tokens": prompt_lookup_tokens, "max_ngram_size": PROMPT_LOOKUP_NGRAM}


def structured_fields(constraint: Constraint) -> dict[str, str]:
    """The StructuredOutputConfig attribute holding ``constraint``."""
    name = STRUCTURED_FIELDS.get(constraint.kind)
    if name is None:
        raise InvalidRequestError(
            f"constraint kind {constraint.kind!r} is unknown; use one of {', '.join(STRUCTURED_FIELDS)}"
        )
    return {name: constraint.value}


def finish_reason(status_name: str, output_finish: str, generated: int, max_new_tokens: int) -> FinishReason:
    """Why the pipeline ended a request it finished by itself (the engine ends stop strings and aborts): LENGTH
    when the limit was reached, else STOP (end of sequence, or the grammar completed)."""
    if status_name in ("CANCEL", "DROPPED_BY_HANDLE", "DROPPED_BY_PIPELINE"):
        return FinishReason.CANCELLED
    if output_finish == "LENGTH" or generated >= max_new_tokens:
        return FinishReason.LENGTH
    return FinishReason.STOP

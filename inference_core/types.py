"""The engine's request, stream chunk and model description types, independent of any transport."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Literal

ConstraintKind = Literal["json_schema", "regex", "ebnf"]

DEFAULT_TENANT = "default"
"""The tenant of a request that names none: with one tenant, the engine serves requests as they come."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Validated by the engine; bad values raise InvalidRequestError.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it. Must be >= 0.
    top_p: nucleus mass in (0, 1]; 1 keeps every token.
    top_k: keep the k most likely tokens; 0 disables. Must be >= 0.
    seed: makes sampling reproducible for this request alone (each request owns its random generator);
        None draws a fresh seed.
    repetition_penalty: > 1 discourages tokens already in the prompt or output (HF/CTRL rule); 1 disables. Must be > 0.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """Restricts the output to a formal language: a JSON Schema (JSON text), a regex, or an EBNF grammar (GBNF, root rule "root")."""

    kind: ConstraintKind
    value: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt`` (raw text, tokenized as is) or ``messages`` (a chat rendered with the
    tokenizer's chat template, generation prompt added) is set.

    max_tokens caps generated tokens (>= 1); generation also ends at the model's context length.
    stop: generation ends before the first occurrence of any of these strings, which are never streamed.
    tenant: whom the request is served for; the scheduler shares queue places and batch slots between tenants
        (see inference_core.admission). The caller validates it (the inference service takes a tenant name).
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    constraint: Constraint | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str = DEFAULT_TENANT


class FinishReason(enum.Enum):
    """Why a generation ended."""

    STOP = "stop"
    """The model emitted an end-of-sequence token (with a constraint: the grammar completed)."""
    LENGTH = "length"
    """max_tokens or the context length was reached."""
    STOP_STRING = "stop_string"
    """A stop string was produced; it is not part of the text."""
    CANCELLED = "cancelled"
    """The request was aborted."""


@dataclass(frozen=True)
class Usage:
    """Token accounting of one generation."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one generation in milliseconds (and decode speed after the first token)."""

    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_second: float


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of a generation stream: ``text`` is new since the previous chunk, ``token_ids`` the tokens it covers
    (text may lag its tokens while a multibyte character or a possible stop string is held back).
    finish_reason, usage and timings are set on the last chunk only.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a served model is: the id clients name, its backend ("torch", "triton", "fake"), context length in tokens,
    device ("cpu", "cuda:0" or a URL) and dtype name."""

    id: str
    backend: str
    context_length: int
    device: str
    dtype: str

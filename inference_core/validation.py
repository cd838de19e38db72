"""Request checks shared by every engine (no torch needed)."""

from __future__ import annotations

import math

from inference_core.errors import InvalidRequestError
from inference_core.types import SamplingParams

MAX_SEED = 2**64 - 1


def validate_sampling(params: SamplingParams) -> None:
    """Raises InvalidRequestError naming the field and its allowed range."""
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if not math.isfinite(params.repetition_penalty) or params.repetition_penalty <= 0:
        raise InvalidRequestError(f"repetition_penalty must be > 0 (1 disables it), got {params.repetition_penalty}")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise InvalidRequestError(f"seed must be in [0, 2**64 - 1], got {params.seed}")

"""Per-row token selection: repetition penalty, temperature, top-k, top-p, and a per-request random generator."""

from __future__ import annotations

import secrets

import torch

from inference_core.types import SamplingParams
from inference_core.validation import validate_sampling


class RowSampler:
    """Chooses the next token of one sequence from its logits row.

    Each sampler owns its random generator, so a seeded request draws the same tokens whatever else runs beside it.
    ``observe(token_id)`` must be called for every prompt and generated token (it feeds the repetition penalty).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device) -> None:
        validate_sampling(params)
        self.params = params
        self._presence: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._presence = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._generator: torch.Generator | None = None
        if not params.is_greedy:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def observe(self, token_ids: list[int] | int) -> None:
        if self._presence is not None:
            self._presence[token_ids] = True

    def sample(self, logits: torch.Tensor) -> int:
        """``logits`` is one row (vocab,), already masked by any constraint; it may be modified in place."""
        p = self.params
        logits = logits.float()
        if self._presence is not None:
            penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self._presence[: logits.shape[-1]], penalized, logits)
        if p.is_greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            threshold = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

"""The torch forward passes: prefill a prompt, then decode one token at a time against its KV cache."""

from __future__ import annotations

from typing import Any

import torch

from inference_core.model_loading import LoadedModel


class TorchModelRunner:
    """Runs a HF causal LM. Only the engine loop thread calls it. The KV cache object is opaque to callers."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = loaded.device

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Returns the last position's logits row (vocab,) and the KV cache of the prompt."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    @torch.inference_mode()
    def decode(self, token_id: int, cache: Any) -> torch.Tensor:
        """Feeds one token after those in ``cache`` (extending it) and returns the next logits row."""
        input_ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1]

    def warm_up(self) -> None:
        """One tiny prefill and decode, so one-time costs (thread pools, kernel selection) are paid before serving."""
        logits, cache = self.prefill([0, 1, 2, 3])
        self.decode(int(torch.argmax(logits)), cache)

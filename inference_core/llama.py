"""A batched forward pass for Llama-family decoders over a slot KV cache: the fast path of the torch backend.

HF's ``generate`` pays Python and cache-object overhead per layer and cannot mix sequences of different lengths without
padding. This runner keeps the model's own weights (fused into one QKV and one gate/up matrix per layer), writes
keys/values straight into :class:`~inference_core.kv_cache.SlotKVCache` and attends with torch's SDPA, so one decode step
serves every running sequence whatever its length. The arithmetic follows HF's Llama (RMSNorm in fp32, rotary tables in
fp32), which keeps greedy output token-for-token equal to ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inference_core.kv_cache import KVShape, SlotKVCache


def supports(model: Any) -> str | None:
    """None if ``model`` can run on this runner, else the reason it cannot."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not llama"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biased projections are not supported"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope scaling {rope.get('rope_type')!r} is not supported"
    return None


def _rope_theta(config: object) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    out: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaRunner:
    """Runs prefill chunks and batched decode steps of a HF ``LlamaForCausalLM`` over a :class:`SlotKVCache`."""

    def __init__(self, model: Any, max_len: int) -> None:
        """``model``: a HF LlamaForCausalLM (typed Any: HF's attribute access is dynamic)."""
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"LlamaRunner cannot run this model: {reason}")
        config = model.config
        self.num_heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight.detach()
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=torch.cat(
                    [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]
                )
                .detach()
                .contiguous(),
                out=layer.self_attn.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach().contiguous(),
                down=layer.mlp.down_proj.weight.detach(),
            )
            for layer in model.model.layers
        ]
        inv_freq = 1.0 / (
            _rope_theta(config)
            ** (
                torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=self.device, dtype=torch.float)
                / self.head_dim
            )
        )
        freqs = torch.outer(torch.arange(max_len, device=self.device, dtype=torch.float), inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = table.cos().to(self.dtype), table.sin().to(self.dtype)
        self.max_len = max_len

    def kv_shape(self) -> KVShape:
        return KVShape(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(self.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: SlotKVCache,
        write: list[tuple[int, int]],
        read: slice | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        batch, steps = tokens.shape
        x = self.embed[tokens]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            q, k, v = F.linear(h, layer.qkv).split([q_size, kv_size, kv_size], dim=-1)
            q = self._rotate(q.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache.keys[index], cache.values[index]
            for row, (slot, start) in enumerate(write):
                keys[slot, :, start : start + steps] = k[row]
                values[slot, :, start : start + steps] = v[row]
            attn = F.scaled_dot_product_attention(
                q,
                keys[read, :, :kv_len],
                values[read, :, :kv_len],
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=True,
            )
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, steps, q_size), layer.out)
            h = self._norm(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the last position of each row of ``hidden`` ``[batch, steps, hidden]``."""
        return F.linear(self._norm(hidden[:, -1], self.final_norm), self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, tokens: list[int], start: int, cache: SlotKVCache, slot: int) -> torch.Tensor:
        """Computes ``tokens`` at positions ``start..`` of ``slot`` (whose positions < start are filled); fp32 logits
        of the last token, shape ``[vocab]``."""
        steps = len(tokens)
        end = start + steps
        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        mask = None
        if start > 0:
            # Query i (at position start+i) sees keys 0..start+i.
            mask = torch.arange(end, device=self.device)[None, :] <= positions[0, :, None]
        hidden = self._forward(
            ids, positions, cache, [(slot, start)], slice(slot, slot + 1), end, mask, causal=start == 0
        )
        return self.logits(hidden)[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int], cache: SlotKVCache) -> torch.Tensor:
        """One step for rows 0..B-1 of the cache: row b holds ``lengths[b]`` positions and appends ``tokens[b]``.
        Returns fp32 logits ``[B, vocab]``."""
        batch = len(tokens)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        positions = torch.tensor(lengths, device=self.device).unsqueeze(1)
        kv_len = max(lengths) + 1
        mask = None
        if min(lengths) != max(lengths):
            mask = (torch.arange(kv_len, device=self.device)[None, :] <= positions).view(batch, 1, 1, kv_len)
        write = [(row, lengths[row]) for row in range(batch)]
        hidden = self._forward(ids, positions, cache, write, slice(0, batch), kv_len, mask, causal=False)
        return self.logits(hidden)

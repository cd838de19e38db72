"""A batched forward pass for Llama-family decoders over a slot KV cache: the fast path of the torch backend.

HF's ``generate`` pays Python and cache-object overhead per layer and cannot mix sequences of different lengths without
padding. This runner keeps the model's own weights (fused into one QKV and one gate/up matrix per layer, laid out
``[in, out]`` so small-batch matmuls run at full speed), writes keys/values straight into
:class:`~inference_core.kv_cache.SlotKVCache`, and computes one *step* in one pass over the weights: a decode token for
every running sequence plus prompt chunks of sequences being admitted (a mixed batch, as in vLLM's chunked prefill).
The arithmetic follows HF's Llama (RMSNorm in fp32, rotary tables in fp32), which keeps greedy output token-for-token
equal to ``generate``.

Shared-prefix ("cascade") attention: agent calls resend the same system prompt and tool schemas, so the running rows
usually start with the same few hundred tokens. When they do, a decode step attends to that shared prefix once for all
rows (one matmul over one copy of its keys) and to each row's own suffix separately, then merges the two softmaxes by
their log-sum-exp. It reads the prefix's keys and values once per step instead of once per row, which at 16 rows and
~700-token prompts is most of the attention's memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inference_core.kv_cache import KVShape, SlotKVCache
from inference_core.quantize import Projection, packing_available, projection

CASCADE_MIN_SHARED = 64
"""Shortest shared prefix (tokens) worth a separate attention pass; below it one pass over whole rows is cheaper."""


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


def _input_major(*linears: Any) -> torch.Tensor:
    """The weights of ``linears`` (nn.Linear, ``[out, in]``) stacked along ``out`` and laid out ``[in, out]``, so that
    ``x @ w`` computes them all at once. Each module's weight becomes a view of the new tensor (same values, transposed
    strides): the model keeps working and its weights are not held twice."""
    fused = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[:, start : start + rows].t()
        start += rows
    return fused


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Projection
    out: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection


@dataclass(frozen=True)
class Chunk:
    """Tokens to compute in ``slot`` at positions ``start..start+len(tokens)-1`` (positions < start are filled):
    a piece of a prompt, or a draft to verify (``all_logits``: logits after every token, not just the last)."""

    slot: int
    start: int
    tokens: list[int]
    all_logits: bool = False


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``[..., L, d]`` and its log-sum-exp ``[..., L]``; ``mask`` is additive (0 or -inf)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, attn_mask=mask)
        return out, lse
    return _math_attention_with_lse(q, k, v, mask)


def _math_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain torch ops (any device; the softmax in fp32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), v), lse


# torch's CPU flash-attention kernel, which also returns the log-sum-exp (SDPA's public API does not).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class LlamaRunner:
    """Runs steps (batched decode plus prompt chunks) of a HF ``LlamaForCausalLM`` over a :class:`SlotKVCache`."""

    def __init__(
        self,
        model: Any,
        max_len: int,
        weights: str = "fp32",
        packed: bool | None = None,
        release_weights: bool = False,
    ) -> None:
        """``model``: a HF LlamaForCausalLM (typed Any: HF's attribute access is dynamic). ``weights``: the format of
        the projections and the LM head (inference_core.quantize): fp32 computes with the model's own weights, exactly
        as HF does; bf16 and int8 compute steps of up to REDUCED_MAX_ROWS tokens with smaller copies of them, faster
        and not token-for-token equal. ``packed``: compute them on oneDNN-packed copies of the weights (None: where
        ``packing_available``); the model's own weights are then used only by the model itself, and
        ``release_weights`` empties its projections' weights as they are packed (the model cannot run by itself
        afterwards; the embedding, norms and a tied LM head are kept, the runner reads them)."""
        if release_weights and packed is False:
            raise ValueError("release_weights needs packed weights: unpacked, the runner computes with the model's own")
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"LlamaRunner cannot run this model: {reason}")
        config = model.config
        self.num_heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.group = self.num_heads // self.kv_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight.detach()
        self.weights = weights
        self.packed = packing_available(self.device, self.dtype) if packed is None else packed
        self.lm_head = model.get_output_embeddings().weight.detach()
        # Unpacked fp32 keeps F.linear over the model's head (HF's op); otherwise the head is a copy, and the
        # embedding lookup keeps the model's tensor even when the head shares it.
        self.head: Projection | None = None
        if weights != "fp32" or self.packed:
            self.head = projection(self.lm_head.t(), weights, packed=self.packed)
        self.final_norm = model.model.norm.weight.detach()
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj)]
            groups.append((mlp.down_proj,))
            qkv, out, gate_up, down = (self._projection(group, release_weights) for group in groups)
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=qkv,
                    out=out,
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=gate_up,
                    down=down,
                )
            )
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

    def _projection(self, linears: tuple[Any, ...], release: bool) -> Projection:
        """One projection computing ``linears`` (nn.Linear, same input) at once. Unpacked, their weights are fused
        into one ``[in, out]`` tensor that the modules view (``_input_major``); packed, the packed copy is made from
        the weights stacked as they are (``[out, in]``, oneDNN's input layout: no transposed copy), and with
        ``release`` the modules' own weights are emptied right after, so that loading never holds two copies."""
        if not self.packed:
            return projection(_input_major(*linears), self.weights)
        stacked = torch.cat([linear.weight.detach() for linear in linears])
        packed = projection(stacked.t(), self.weights, packed=True)
        if release:
            for linear in linears:
                linear.weight.data = torch.empty(0, dtype=self.dtype, device=self.device)
        return packed

    def kv_shape(self) -> KVShape:
        return KVShape(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF's LlamaRMSNorm: normalize in fp32, cast back, then scale (one fused kernel instead of six ops).
        normalized = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return weight * normalized.to(self.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def step(
        self,
        cache: SlotKVCache,
        tokens: list[int],
        lengths: list[int],
        chunks: list[Chunk] | tuple[Chunk, ...] = (),
        shared: int = 0,
    ) -> torch.Tensor:
        """One pass over the weights for a decode token of each of rows 0..B-1 of ``cache`` (row b holds
        ``lengths[b]`` positions and appends ``tokens[b]``) and every prompt chunk in ``chunks`` (in slots >= B).

        ``shared``: positions 0..shared-1 hold the same tokens in every decode row (their keys and values are read from
        row 0 once for all rows); 0 when unknown. A chunk may continue a decode row's slot right after the token it
        decodes (a draft): the row's new key is written before the chunk attends. Returns fp32 logits: one row per
        decode row, then per chunk its last token's row, or every token's with ``all_logits``.
        """
        batch = len(tokens)
        ids = list(tokens)
        positions = list(lengths)
        spans = []
        for chunk in chunks:
            spans.append((len(ids), len(ids) + len(chunk.tokens)))
            ids += chunk.tokens
            positions += range(chunk.start, chunk.start + len(chunk.tokens))
        ids_t = torch.tensor(ids, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        decode = _DecodePlan(self, cache, lengths, shared) if batch else None
        masks = [self._chunk_mask(chunk) for chunk in chunks]

        x = self.embed[ids_t]
        cos, sin = self.cos[positions_t].unsqueeze(1), self.sin[positions_t].unsqueeze(1)
        q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        steps = len(ids)
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            qk, v = layer.qkv(h).split([q_size + kv_size, kv_size], dim=-1)
            # Queries and keys rotate together: heads [0, num_heads) are queries, the rest keys.
            qk = self._rotate(qk.view(steps, self.num_heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = v.view(steps, self.kv_heads, self.head_dim)
            keys, values = cache.keys[index], cache.values[index]
            parts = []
            if decode is not None:
                decode.write(keys, k[:batch])
                decode.write(values, v[:batch])
                parts.append(decode.attend(q[:batch], keys, values))
            for chunk, (lo, hi), mask in zip(chunks, spans, masks, strict=True):
                parts.append(self._chunk_attention(chunk, mask, q[lo:hi], k[lo:hi], v[lo:hi], keys, values))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + layer.out(attn.reshape(steps, q_size))
            h = self._norm(x, layer.post_norm)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        rows = list(range(batch))
        for chunk, (lo, hi) in zip(chunks, spans, strict=True):
            rows += range(lo, hi) if chunk.all_logits else [hi - 1]
        return self.logits(x[rows])

    @staticmethod
    def _chunk_attention(
        chunk: Chunk,
        mask: torch.Tensor | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """Writes a chunk's keys and values ``[tokens, kv_heads, head_dim]`` into its slot of one layer's cache and
        attends its queries ``[tokens, heads, head_dim]`` to the slot up to the chunk's end."""
        end = chunk.start + len(chunk.tokens)
        keys[chunk.slot, :, chunk.start : end] = k.transpose(0, 1)
        values[chunk.slot, :, chunk.start : end] = v.transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys[chunk.slot : chunk.slot + 1, :, :end],
            values[chunk.slot : chunk.slot + 1, :, :end],
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return attn[0].transpose(0, 1)

    def _chunk_mask(self, chunk: Chunk) -> torch.Tensor | None:
        if chunk.start == 0:
            return None  # plain causal
        end = chunk.start + len(chunk.tokens)
        positions = torch.arange(chunk.start, end, device=self.device)
        # Query i (at position start+i) sees keys 0..start+i.
        return torch.arange(end, device=self.device)[None, :] <= positions[:, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states ``[rows, hidden]``."""
        normed = self._norm(hidden, self.final_norm)
        if self.head is not None:
            return self.head(normed).float()
        return F.linear(normed, self.lm_head).float()

    def prefill(self, tokens: list[int], start: int, cache: SlotKVCache, slot: int) -> torch.Tensor:
        """Computes ``tokens`` at positions ``start..`` of ``slot`` (whose positions < start are filled); fp32 logits
        of the last token, shape ``[vocab]``."""
        return self.step(cache, [], [], [Chunk(slot, start, tokens)])[0]

    def decode(self, tokens: list[int], lengths: list[int], cache: SlotKVCache, shared: int = 0) -> torch.Tensor:
        """One step for rows 0..B-1 of the cache: row b holds ``lengths[b]`` positions and appends ``tokens[b]``.
        Returns fp32 logits ``[B, vocab]``."""
        return self.step(cache, tokens, lengths, shared=shared)


class _DecodePlan:
    """What every layer's decode attention needs for one step: where rows write, their masks, the shared prefix."""

    def __init__(self, runner: LlamaRunner, cache: SlotKVCache, lengths: list[int], shared: int) -> None:
        device = runner.device
        self.batch = batch = len(lengths)
        self.kv_heads, self.group, self.head_dim = runner.kv_heads, runner.group, runner.head_dim
        self.positions = torch.tensor(lengths, device=device)
        # Row b, kv head h, position p of a layer's [slots, kv_heads, max_len, head_dim] cache, as one flat index.
        heads = torch.arange(runner.kv_heads, device=device)
        max_len = cache.max_len
        self.flat_index = (
            ((torch.arange(batch, device=device)[:, None] * runner.kv_heads + heads) * max_len)
            .add_(self.positions[:, None])
            .reshape(-1)
        )
        self.kv_len = max(lengths) + 1
        self.shared = shared if batch > 1 and shared >= CASCADE_MIN_SHARED else 0
        start = self.shared
        self.mask: torch.Tensor | None = None
        if min(lengths) != max(lengths):
            visible = torch.arange(start, self.kv_len, device=device)[None, :] <= self.positions[:, None]
            self.mask = visible.view(batch, 1, 1, -1)
            if self.shared:
                additive = torch.zeros(visible.shape, dtype=runner.dtype, device=device)
                self.mask = additive.masked_fill(~visible, float("-inf")).view(batch, 1, 1, -1)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Stores ``new`` ``[B, kv_heads, head_dim]`` at each row's position of one layer's keys or values."""
        cache.view(-1, self.head_dim).index_copy_(0, self.flat_index, new.reshape(-1, self.head_dim))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, heads, head_dim]`` -> attention output of the same shape.

        The query heads that share a key/value head are laid out as that head's query positions (``[B, kv_heads,
        group, head_dim]``), so attention reads each key once without expanding it per query head."""
        batch, kv_heads, group, dim = self.batch, self.kv_heads, self.group, self.head_dim
        grouped = q.view(batch, kv_heads, group, dim)
        if not self.shared:
            out = F.scaled_dot_product_attention(
                grouped, keys[:batch, :, : self.kv_len], values[:batch, :, : self.kv_len], attn_mask=self.mask
            )
            return out.reshape(batch, kv_heads * group, dim)
        shared = self.shared
        # Every row's queries against the one copy of the shared prefix (row 0's): [1, kv_heads, B*group, dim].
        pooled = grouped.transpose(0, 1).reshape(1, kv_heads, batch * group, dim)
        prefix_out, prefix_lse = _attention_with_lse(pooled, keys[0:1, :, :shared], values[0:1, :, :shared], None)
        prefix_out = prefix_out.view(kv_heads, batch, group, dim).transpose(0, 1)
        prefix_lse = prefix_lse.view(kv_heads, batch, group).transpose(0, 1)
        own_out, own_lse = _attention_with_lse(
            grouped, keys[:batch, :, shared : self.kv_len], values[:batch, :, shared : self.kv_len], self.mask
        )
        # softmax over both parts = each part's softmax weighted by its share of the total exp-sum.
        weight = torch.sigmoid(prefix_lse - own_lse).unsqueeze(-1).to(own_out.dtype)
        return torch.lerp(own_out, prefix_out, weight).reshape(batch, kv_heads * group, dim)

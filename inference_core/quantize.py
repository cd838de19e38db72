"""The weight formats of the torch runner's matmuls: exact fp32, bf16, or weight-only int8.

A decode step on CPU is bound by reading the weights (inference_core/README.md, "What limits speed on CPU"), so
fewer bytes per weight is the lever. ``fp32`` keeps the model's own weights and HF's arithmetic exactly. ``bf16``
and ``int8`` add a copy of every projection and of the LM head in 2 or 1 bytes per weight, used by steps of at most
REDUCED_MAX_ROWS tokens (decode steps); the activations going into those matmuls are rounded to bf16, and everything
else (embedding lookup, residual stream, norms, rotary, attention, KV cache) keeps the model's dtype. Larger steps
(prompt chunks) are bound by arithmetic, not by reading weights, and the reduced kernels were slower there than the
fp32 matmul, so they use the model's own weights: prompts are computed exactly. Both formats give up token-for-token
parity with HF; docs/bench/torch_levers.md measures what they cost and gain.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

import torch

WeightFormat = Literal["fp32", "bf16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
REDUCED_MAX_ROWS = 16
"""Most tokens a step may hold to use the reduced weights. The int8 kernel's time grows with the rows: measured on the
whole model on 2 cores, it was faster than fp32 up to ~12-16 rows and ~3x slower at 48."""


class Projection(Protocol):
    """``x @ W`` for activations ``x`` ``[rows, in]``; the result ``[rows, out]`` has ``x``'s dtype."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseProjection:
    """A weight laid out ``[in, out]`` (fp32: the model's own tensor; bf16: a copy), computed by torch.matmul."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # .to() returns x itself when the dtypes match, so fp32 runs exactly the matmul HF runs.
        return torch.matmul(x.to(self.weight.dtype), self.weight).to(x.dtype)


class Int8Projection:
    """Per-output-channel symmetric int8 weights (``W ~= q * scale``, ``|q| <= 127``) and torch's CPU weight-only int8
    kernel, ``aten._weight_int8pack_mm``. The kernel is fast with bf16 activations only: with fp32 ones it measured
    5-50x slower than the fp32 matmul (docs/bench/torch_levers.md), so activations go in as bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        """``weight``: ``[in, out]``, any float dtype."""
        rows = weight.t().float()  # [out, in]: the kernel's layout
        scale = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.qweight = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def dequantized(self) -> torch.Tensor:
        """The weights the kernel multiplies by, ``[in, out]`` fp32 (for tests and error measurements)."""
        return (self.qweight.float() * self.scale.float()[:, None]).t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)


class SmallStepProjection:
    """``reduced`` for steps of at most ``max_rows`` tokens, the exact ``[in, out]`` weight for larger ones."""

    def __init__(self, exact: torch.Tensor, reduced: Projection, max_rows: int = REDUCED_MAX_ROWS) -> None:
        self.exact = exact
        self.reduced = reduced
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return self.reduced(x)
        return torch.matmul(x, self.exact)


def projection(weight: torch.Tensor, weights: str) -> Projection:
    """``weight`` (``[in, out]``) as a projection in format ``weights`` (one of WEIGHT_FORMATS). Raises ValueError
    naming what to change when the format is unknown or cannot run on the weight's device."""
    if weights == "fp32":
        return DenseProjection(weight)
    if weights == "bf16":
        return SmallStepProjection(weight, DenseProjection(weight.to(torch.bfloat16)))
    if weights == "int8":
        if weight.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise ValueError(
                f"int8 weights need torch's CPU kernel aten._weight_int8pack_mm (torch {torch.__version__}, device "
                f"{weight.device}); use weights fp32 or bf16, or device cpu"
            )
        return SmallStepProjection(weight, Int8Projection(weight))
    raise ValueError(f"weights {weights!r} is not a weight format; use one of {', '.join(WEIGHT_FORMATS)}")

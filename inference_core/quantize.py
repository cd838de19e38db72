"""The weight formats of the torch runner's matmuls: exact fp32, bf16, or weight-only int8.

A decode step on CPU is bound by reading the weights (inference_core/README.md, "What limits speed on CPU"), so
fewer bytes per weight is the lever. ``fp32`` keeps the model's own weights and HF's arithmetic exactly. ``bf16``
and ``int8`` add a copy of every projection and of the LM head in 2 or 1 bytes per weight, used by steps of at most
REDUCED_MAX_ROWS tokens (decode steps); the activations going into those matmuls are rounded to bf16, and everything
else (embedding lookup, residual stream, norms, rotary, attention, KV cache) keeps the model's dtype. Larger steps
(prompt chunks) are bound by arithmetic, not by reading weights, and the reduced kernels were slower there than the
fp32 matmul, so they use the model's own weights: prompts are computed exactly. Both formats give up token-for-token
parity with HF; docs/bench/torch_levers.md measures what they cost and gain.

Packing (``packed=True``, the default on CPU where torch has oneDNN): each weight is reordered once, at load, into
oneDNN's blocked layout, and every step runs oneDNN's matmul on it (``torch.ops.mkldnn._linear_pointwise``, the op
inductor's weight prepacking emits). torch.matmul on a plain ``[in, out]`` tensor lets MKL lay the weight out again on
every call; at decode's 2-32 rows that cost more than the multiply itself (the 576 x 49152 LM head: 18 ms at 16 rows
plain, 6 ms packed; docs/bench/torch_levers.md, "Packed weights"). fp32 stays fp32: only the order of the additions
differs, as it does between MKL's kernels for different shapes.
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


PACK_ROWS_HINT = 16
"""The row count oneDNN is told to expect when it reorders a weight (the decode batch); the packed weight serves any
row count, and 16 measured as fast as packing for the exact count at 1-256 rows."""


def packing_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether weights of ``dtype`` on ``device`` can be packed for oneDNN: a CPU, a torch built with oneDNN, and
    fp32, or bf16 where oneDNN computes it on this CPU."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedProjection:
    """A weight reordered once into oneDNN's blocked layout and computed by oneDNN's matmul, in the weight's dtype
    (fp32, or bf16 with bf16 activations)."""

    def __init__(self, weight: torch.Tensor) -> None:
        """``weight``: ``[in, out]``; the packed copy is made from it, which is not kept."""
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), PACK_ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, None, "none", [], "")
        return out.to(x.dtype)


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
    """``reduced`` for steps of at most ``max_rows`` tokens, the exact projection (the model's own weights, packed
    or not) for larger ones."""

    def __init__(self, exact: Projection, reduced: Projection, max_rows: int = REDUCED_MAX_ROWS) -> None:
        self.exact = exact
        self.reduced = reduced
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return self.reduced(x)
        return self.exact(x)


def projection(weight: torch.Tensor, weights: str, packed: bool = False) -> Projection:
    """``weight`` (``[in, out]``) as a projection in format ``weights`` (one of WEIGHT_FORMATS), its fp32 and bf16
    matmuls on oneDNN-packed copies when ``packed`` (``packing_available``). Raises ValueError naming what to change
    when the format is unknown or cannot run on the weight's device."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights {weights!r} is not a weight format; use one of {', '.join(WEIGHT_FORMATS)}")
    if packed and not packing_available(weight.device, weight.dtype):
        raise ValueError(
            f"packed weights need a CPU and torch with oneDNN computing {weight.dtype} (device {weight.device}, "
            f"oneDNN {'available' if torch.backends.mkldnn.is_available() else 'missing'}); set torch_prepack false"
        )
    if weights == "int8" and (weight.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm")):
        raise ValueError(
            f"int8 weights need torch's CPU kernel aten._weight_int8pack_mm (torch {torch.__version__}, device "
            f"{weight.device}); use weights fp32 or bf16, or device cpu"
        )
    exact = PackedProjection(weight) if packed else DenseProjection(weight)
    if weights == "fp32":
        return exact
    if weights == "bf16":
        half = weight.to(torch.bfloat16)
        packed_half = packed and packing_available(weight.device, torch.bfloat16)
        return SmallStepProjection(exact, PackedProjection(half) if packed_half else DenseProjection(half))
    return SmallStepProjection(exact, Int8Projection(weight))

"""The torch runner's weight formats (inference_core.quantize): kernels against the fp32 matmul, the default model's
greedy output with int8 and bf16 weights against fp32's, and the setting's validation."""

from __future__ import annotations

import os
from typing import get_args

import pytest
import torch

from inference_core import TorchEngine
from inference_core.kv_cache import SlotKVCache
from inference_core.llama import LlamaRunner
from inference_core.quantize import (
    REDUCED_MAX_ROWS,
    WEIGHT_FORMATS,
    DenseProjection,
    Int8Projection,
    SmallStepProjection,
    projection,
)
from services.common.config import InferenceConfig

SHAPES = [(576, 960), (1536, 576), (576, 49152)]  # SmolLM2-135M's fused QKV, down projection and LM head


def _weight(rows: int, cols: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * cols)
    return torch.randn(rows, cols, generator=generator) * 0.05


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_int8_projection_is_within_a_percent_of_the_fp32_matmul(shape: tuple[int, int], rows: int) -> None:
    weight = _weight(*shape)
    x = torch.randn(rows, shape[0], generator=torch.Generator().manual_seed(rows))
    int8 = Int8Projection(weight)
    exact = x @ weight
    got = int8(x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # Rounding the weights to 1/127 of their row's maximum and the activations to bf16 costs ~1% of the output's scale.
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    # The kernel computes what the stored int8 weights say, up to bf16 rounding of its inputs and output.
    dequantized = x.bfloat16().float() @ int8.dequantized()
    assert torch.allclose(got, dequantized, rtol=2e-2, atol=2e-2 * dequantized.abs().max().item())


def test_int8_weights_keep_each_output_channel_to_127_steps_of_its_own_maximum() -> None:
    weight = _weight(64, 32)
    weight[:, 5] *= 1000  # one loud output channel must not coarsen the others
    int8 = Int8Projection(weight)
    assert int8.qweight.dtype == torch.int8 and int8.qweight.shape == (32, 64)
    assert int8.qweight.abs().amax(dim=1).eq(127).all()
    step = weight.abs().amax(dim=0) / 127
    # Half a step of rounding, plus the scale's own bf16 rounding (2**-9 of it, times up to 127 steps).
    assert ((int8.dequantized() - weight).abs() <= step * (0.5 + 127 * 2**-9) * 1.01).all()


def test_fp32_projection_is_the_plain_matmul_bit_for_bit_and_bf16_is_close() -> None:
    weight = _weight(576, 960)
    x = torch.randn(8, 576)
    assert torch.equal(projection(weight, "fp32")(x), torch.matmul(x, weight))
    bf16 = projection(weight, "bf16")
    assert isinstance(bf16, SmallStepProjection) and isinstance(bf16.reduced, DenseProjection)
    assert bf16.reduced.weight.dtype == torch.bfloat16
    exact = x @ weight
    assert (bf16(x) - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_steps_larger_than_a_decode_batch_use_the_exact_weights(weights: str) -> None:
    weight = _weight(576, 960)
    reduced = projection(weight, weights)
    small, large = torch.randn(REDUCED_MAX_ROWS, 576), torch.randn(REDUCED_MAX_ROWS + 1, 576)
    assert torch.equal(reduced(large), torch.matmul(large, weight))
    assert not torch.equal(reduced(small), torch.matmul(small, weight))


def test_an_unknown_format_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="use one of fp32, bf16, int8"):
        projection(_weight(4, 4), "int4")
    with pytest.raises(ValueError, match="'int4' is not a weight format"):
        TorchEngine(weights="int4")


def test_the_config_offers_exactly_the_runner_formats_with_fp32_the_default() -> None:
    field = InferenceConfig.model_fields["torch_weights"]
    assert get_args(field.annotation) == WEIGHT_FORMATS
    assert InferenceConfig().torch_weights == "fp32"


@pytest.fixture(scope="module")
def model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_core import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, hf


PROMPTS = ["What is the capital of France?", "List three prime numbers.", "Give me a synonym for happy."]
NEW_TOKENS = 8


def _greedy(runner: LlamaRunner, ids: list[int]) -> list[int]:
    cache = SlotKVCache(runner.kv_shape(), num_slots=1, max_len=len(ids) + NEW_TOKENS)
    out = [int(runner.prefill(ids, 0, cache, 0).argmax())]
    while len(out) < NEW_TOKENS:
        out.append(int(runner.decode([out[-1]], [len(ids) + len(out) - 1], cache)[0].argmax()))
    return out


@pytest.mark.slow
def test_int8_weights_give_fp32s_first_greedy_tokens_on_simple_prompts(model) -> None:
    """What is true of int8, measured: the first 8 tokens agree on these prompts, and longer answers drift
    (docs/bench/torch_levers.md: of 6 answers of 32 tokens, 2 agreed in full and the others for their first 10-27)."""
    tokenizer, hf = model
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for p in PROMPTS
    ]
    exact = LlamaRunner(hf, max_len=256)
    reduced = LlamaRunner(hf, max_len=256, weights="int8")
    assert exact.head is None and reduced.head is not None
    for ids in prompts:
        assert _greedy(reduced, ids) == _greedy(exact, ids), tokenizer.decode(ids)

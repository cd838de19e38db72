"""The torch runner's weight formats (inference_core.quantize): kernels against the fp32 matmul, oneDNN-packed weights
against the plain matmul, the default model's greedy output with int8, bf16 and packed weights against fp32's, and the
settings' validation."""

from __future__ import annotations

import os
from typing import get_args

import pytest
import torch

from inference_core import GenerationRequest, SamplingParams, TorchEngine
from inference_core.kv_cache import SlotKVCache
from inference_core.llama import LlamaRunner
from inference_core.quantize import (
    REDUCED_MAX_ROWS,
    WEIGHT_FORMATS,
    DenseProjection,
    Int8Projection,
    PackedProjection,
    SmallStepProjection,
    packing_available,
    projection,
)
from services.common.config import InferenceConfig, MeshConfig
from services.inference.server import create_engine

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")

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


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 256])
def test_packed_fp32_weights_compute_the_fp32_matmul(shape: tuple[int, int], rows: int) -> None:
    weight = _weight(*shape)
    # A transposed view, as attention's output reaches the out projection: packing must not care about strides.
    x = torch.randn(shape[0], rows, generator=torch.Generator().manual_seed(rows)).t()
    packed = projection(weight, "fp32", packed=True)
    assert isinstance(packed, PackedProjection)
    got, exact = packed(x), x.double() @ weight.double()
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # fp32 arithmetic in another order of additions: as close to the exact product as the plain matmul is.
    plain_error = ((x @ weight).double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= max(4 * plain_error, 1e-6 * exact.abs().max())


@needs_onednn
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_packed_reduced_formats_keep_their_error_and_compute_large_steps_exactly(weights: str) -> None:
    weight = _weight(576, 960)
    reduced = projection(weight, weights, packed=True)
    assert isinstance(reduced, SmallStepProjection) and isinstance(reduced.exact, PackedProjection)
    if weights == "bf16" and packing_available(dtype=torch.bfloat16):
        assert isinstance(reduced.reduced, PackedProjection) and reduced.reduced.dtype == torch.bfloat16
    small, large = torch.randn(REDUCED_MAX_ROWS, 576), torch.randn(REDUCED_MAX_ROWS + 1, 576)
    assert torch.equal(reduced(large), reduced.exact(large))
    exact = small @ weight
    assert (reduced(small) - exact).abs().max() < 0.02 * exact.abs().max()


def test_packing_is_refused_where_onednn_cannot_compute_it() -> None:
    assert not packing_available("meta")
    assert not packing_available("cpu", torch.float16)
    with pytest.raises(ValueError, match="set torch_prepack false"):
        projection(_weight(8, 8).half(), "fp32", packed=True)


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
    exact = LlamaRunner(hf, max_len=256, packed=False)
    reduced = LlamaRunner(hf, max_len=256, weights="int8")
    assert exact.head is None and reduced.head is not None
    for ids in prompts:
        assert _greedy(reduced, ids) == _greedy(exact, ids), tokenizer.decode(ids)


@needs_onednn
@pytest.mark.slow
def test_packed_fp32_weights_give_the_plain_runners_greedy_tokens_and_logits(model) -> None:
    tokenizer, hf = model
    plain = LlamaRunner(hf, max_len=256, packed=False)
    packed = LlamaRunner(hf, max_len=256)
    assert packed.packed and isinstance(packed.head, PackedProjection) and plain.head is None
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert _greedy(packed, ids) == _greedy(plain, ids), prompt
        caches = [SlotKVCache(runner.kv_shape(), num_slots=1, max_len=len(ids)) for runner in (plain, packed)]
        a, b = (runner.prefill(ids, 0, cache, 0) for runner, cache in zip((plain, packed), caches, strict=True))
        assert (a - b).abs().max() < 1e-3 * a.abs().max()


@needs_onednn
@pytest.mark.slow
@pytest.mark.parametrize("prepack", [True, False])
async def test_the_engine_releases_the_models_own_weights_only_when_it_computes_on_packed_ones(prepack: bool) -> None:
    config = MeshConfig.model_validate({"inference": {"backend": "torch", "torch_prepack": prepack}})
    engine = create_engine(config)
    assert isinstance(engine, TorchEngine)
    await engine.start()
    try:
        # The model object (and with it the projection weights it holds) is dropped once the runner packed copies.
        assert (engine._loaded.model is None) is prepack
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        request = GenerationRequest(messages=messages, max_tokens=12, sampling=SamplingParams(temperature=0))
        text = "".join([chunk.text async for chunk in engine.generate(request)])
        assert "Paris" in text
    finally:
        await engine.shutdown()


@needs_onednn
def test_releasing_the_models_weights_keeps_the_runners_output_and_empties_only_the_projections(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from inference_core.testing import write_tiny_llama

    directory = write_tiny_llama(tmp_path / "tiny")
    keeper = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    donor = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    kept = LlamaRunner(keeper, max_len=64, packed=True)
    released = LlamaRunner(donor, max_len=64, packed=True, release_weights=True)
    ids = [1, 42, 7, 99, 3]
    assert _greedy(released, ids) == _greedy(kept, ids)
    layer = donor.model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj]
    assert all(linear.weight.numel() == 0 for linear in projections)
    # What the runner reads from the model itself stays: the embedding (also the tied head's source) and the norms.
    assert donor.get_input_embeddings().weight.numel() > 0 and layer.input_layernorm.weight.numel() > 0
    assert keeper.model.layers[0].mlp.down_proj.weight.numel() > 0


def test_releasing_weights_that_are_not_packed_is_refused() -> None:
    with pytest.raises(ValueError, match="release_weights needs packed weights"):
        LlamaRunner(object(), max_len=8, packed=False, release_weights=True)

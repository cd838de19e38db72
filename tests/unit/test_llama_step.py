"""LlamaRunner.step's fast paths against its plain ones, on a small random-weight Llama (fast; the real model's parity
with HF generate: test_llama_runner.py and test_continuous_batching.py)."""

from __future__ import annotations

import pytest
import torch

from inference_core.kv_cache import SlotKVCache
from inference_core.llama import CASCADE_MIN_SHARED, Chunk, LlamaRunner
from inference_core.testing import write_tiny_llama

SHARED = [(7 * i + 3) % 500 + 10 for i in range(CASCADE_MIN_SHARED + 16)]
PROMPTS = [SHARED + [600 + i] * (3 + 2 * i) for i in range(4)]  # ragged lengths after one shared prefix


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-step"), context_length=256, layers=2, hidden_size=64)


def runner_for(tiny_dir, dtype: torch.dtype) -> LlamaRunner:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).eval()
    return LlamaRunner(model, max_len=256)


def prefilled(runner: LlamaRunner) -> tuple[SlotKVCache, list[int], list[int]]:
    cache = SlotKVCache(runner.kv_shape(), num_slots=6, max_len=256)
    firsts = [int(runner.prefill(prompt, 0, cache, slot).argmax()) for slot, prompt in enumerate(PROMPTS)]
    return cache, firsts, [len(prompt) for prompt in PROMPTS]


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("portable", [False, True], ids=["cpu-kernel", "portable"])
def test_shared_prefix_attention_equals_attending_to_each_row_whole(
    tiny_dir, dtype, tolerance, portable, monkeypatch
) -> None:
    if portable:  # the plain-torch log-sum-exp attention that non-CPU devices run
        monkeypatch.setattr("inference_core.llama._CPU_FLASH", None)
    runner = runner_for(tiny_dir, dtype)
    cache, firsts, lengths = prefilled(runner)
    plain = runner.decode(firsts, lengths, cache, shared=0)
    cache, firsts, lengths = prefilled(runner)
    cascaded = runner.decode(firsts, lengths, cache, shared=len(SHARED))
    torch.testing.assert_close(cascaded, plain, atol=tolerance * plain.abs().max().item(), rtol=0)


def test_a_draft_chunk_after_a_decode_row_gives_the_logits_of_decoding_its_tokens_one_by_one(tiny_dir) -> None:
    runner = runner_for(tiny_dir, torch.float32)
    draft = [11, 12, 13]
    cache, firsts, lengths = prefilled(runner)
    # Row 1 decodes its token and, in the same pass, three more tokens right after it in its own slot.
    fused = runner.step(cache, firsts, lengths, [Chunk(1, lengths[1] + 1, draft, all_logits=True)], shared=len(SHARED))
    assert fused.shape[0] == len(PROMPTS) + len(draft)

    cache, firsts, lengths = prefilled(runner)
    expected = [runner.decode(firsts, lengths, cache)]
    lengths = [length + 1 for length in lengths]
    for token in draft:
        # Only row 1 advances: decode it alone by running the other rows' tokens again (they are not compared).
        tokens = [*firsts]
        tokens[1] = token
        expected.append(runner.decode(tokens, lengths, cache)[1:2])
        lengths = [length + (1 if row == 1 else 0) for row, length in enumerate(lengths)]
    torch.testing.assert_close(fused[: len(PROMPTS)], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(fused[len(PROMPTS) :], torch.cat(expected[1:]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_the_portable_log_sum_exp_attention_equals_the_cpu_kernel(masked: bool) -> None:
    """The plain-torch path is what CUDA runs (no GPU here): it must agree with the CPU kernel."""
    from inference_core.llama import _CPU_FLASH, _attention_with_lse, _math_attention_with_lse

    assert _CPU_FLASH is not None, "torch 2.13 ships the CPU kernel; the fast path depends on it"
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=generator) for n in (5, 40, 40))
    mask = None
    if masked:
        visible = torch.arange(40)[None, :] < torch.tensor([40, 25, 7])[:, None]
        mask = torch.zeros(3, 1, 1, 40).masked_fill(~visible.view(3, 1, 1, 40), float("-inf"))
    fast, fast_lse = _attention_with_lse(q, k, v, mask)
    portable, portable_lse = _math_attention_with_lse(q, k, v, mask)
    torch.testing.assert_close(fast, portable, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_lse, portable_lse, atol=1e-5, rtol=1e-5)

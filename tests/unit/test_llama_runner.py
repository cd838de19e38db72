"""LlamaRunner on the real default model: staggered, chunked and prefix-cached greedy decoding equals HF (batch sizes
1-8 through the engine are in test_continuous_batching.py)."""

from __future__ import annotations

import os

import pytest
import torch

from inference_core.kv_cache import PrefixCache, SlotKVCache, common_prefix_length
from inference_core.llama import Chunk, LlamaRunner, supports

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 12
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "写一首关于月亮的短诗",
    "Explain what a KV cache is.",
    "Name a famous painter.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_core import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def references(hf):
    tokenizer, model = hf
    out = []
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        with torch.inference_mode():
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append((ids[0].tolist(), generated[0, ids.shape[1] :].tolist()))
    return out


def _run_continuous(runner: LlamaRunner, references, batch: int, chunk: int, prefix: PrefixCache | None):
    """Admits one request every other step (while rows decode), retires rows as they finish, compacting slots."""
    cache = SlotKVCache(runner.kv_shape(), num_slots=batch, max_len=1024)
    outputs: list[list[int]] = [[] for _ in references]
    pending = list(range(len(references)))
    active: list[list[int]] = []  # [request, length, last token]
    step = 0
    while pending or active:
        if pending and len(active) < batch and step % 2 == 0:
            request = pending.pop(0)
            prompt, _ = references[request]
            slot = len(active)
            position = prefix.restore(prefix.lookup(prompt), cache, slot) if prefix else 0
            while position < len(prompt):
                logits = runner.prefill(prompt[position : position + chunk], position, cache, slot)
                position += len(prompt[position : position + chunk])
            if prefix:
                prefix.insert(prompt, cache, slot)
            token = int(logits.argmax())
            outputs[request].append(token)
            active.append([request, len(prompt), token])
        if active:
            logits = runner.decode([row[2] for row in active], [row[1] for row in active], cache)
            for row, row_logits in zip(active, logits, strict=True):
                row[1] += 1
                row[2] = int(row_logits.argmax())
                outputs[row[0]].append(row[2])
            row_index = 0
            while row_index < len(active):
                request = active[row_index][0]
                if len(outputs[request]) >= len(references[request][1]):
                    last = len(active) - 1
                    cache.move(last, row_index, active[last][1])
                    active[row_index] = active[last]
                    active.pop()
                else:
                    row_index += 1
        step += 1
    return [output[: len(ref)] for output, (_, ref) in zip(outputs, references, strict=True)]


def test_the_default_model_is_supported(hf) -> None:
    assert supports(hf[1]) is None


def test_prefix_cache_and_small_chunks_keep_outputs_equal(hf, references) -> None:
    runner = LlamaRunner(hf[1], max_len=1024)
    prefix = PrefixCache(runner.kv_shape(), num_blocks=64, block_size=16)
    outputs = _run_continuous(runner, references, batch=4, chunk=7, prefix=prefix)
    assert outputs == [ref for _, ref in references]
    assert prefix.hit_rate > 0.5  # the long shared system prompt is computed once


def test_unsupported_models_are_refused_with_the_reason(hf) -> None:
    model = hf[1]
    original = model.config.hidden_act
    model.config.hidden_act = "gelu"
    try:
        assert "gelu" in (supports(model) or "")
        with pytest.raises(ValueError, match="gelu"):
            LlamaRunner(model, max_len=64)
    finally:
        model.config.hidden_act = original


def test_a_mixed_step_with_shared_prefix_attention_matches_separate_passes(hf, references) -> None:
    """Decode rows plus a prompt chunk in one pass, attending to the rows' common prefix once, give the logits of a
    plain decode step and a separate prefill (up to float rounding) and HF's greedy tokens."""
    runner = LlamaRunner(hf[1], max_len=1024)
    prompts = [prompt for prompt, _ in references[:4]]
    shared = common_prefix_length(prompts[:3])
    assert shared >= 64, "the system prompt is long enough for the shared-prefix path"
    caches = [SlotKVCache(runner.kv_shape(), num_slots=4, max_len=1024) for _ in range(2)]
    firsts = []
    for cache in caches:
        firsts = [int(runner.prefill(prompt, 0, cache, slot).argmax()) for slot, prompt in enumerate(prompts[:3])]
    lengths = [len(prompt) for prompt in prompts[:3]]
    mixed = runner.step(caches[0], firsts, lengths, [Chunk(3, 0, prompts[3])], shared=shared)
    plain = runner.decode(firsts, lengths, caches[1], shared=0)
    alone = runner.prefill(prompts[3], 0, caches[1], 3)
    torch.testing.assert_close(mixed[:3], plain, atol=2e-4, rtol=0)
    torch.testing.assert_close(mixed[3], alone, atol=2e-4, rtol=0)
    assert mixed.argmax(-1).tolist() == [*(ref[1] for _, ref in references[:3]), references[3][1][0]]
    # Both caches now hold the same keys for every row (the mixed step wrote the decode rows and the chunk).
    torch.testing.assert_close(caches[0].keys[:, :4, :, :200], caches[1].keys[:, :4, :, :200], atol=1e-4, rtol=0)

"""Step times and greedy agreement of the torch runner's weight formats (inference_core.quantize) on the default model.

    .venv/bin/python benchmarks/torch_levers.py [--rounds 8] [--tokens 32]

Prints, per variant, the fastest LlamaRunner decode step at 1, 8 and 16 rows with a short (~32 positions) and a long
(~700 positions, 640 of them a prefix shared by the rows) context, a 256-token prefill chunk, and how far each
variant's greedy output agrees with fp32's on a few chat prompts. Each weight format runs on the plain matmul and,
where torch has oneDNN, on packed weights (``inference.torch_prepack``). About 2-4 minutes on 2 cores. Results and what
they mean: docs/bench/torch_levers.md.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import inference_core  # noqa: F401  (before torch: it sets OMP_WAIT_POLICY, which libgomp reads once)

# isort: split
import torch

from inference_core.kv_cache import SlotKVCache
from inference_core.llama import Chunk, LlamaRunner
from inference_core.model_loading import LoadedModel, load_model
from inference_core.quantize import WEIGHT_FORMATS, packing_available

ROWS = (1, 8, 16)
CONTEXTS = {"short": (32, 0), "long": (700, 640)}  # (positions per row, prefix shared by the rows)
PREFILL_TOKENS = 256
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a KV cache is in two sentences.",
    "Give me a synonym for happy.",
    "Write a Python function that reverses a string.",
]


@dataclass
class Variant:
    name: str
    runner: LlamaRunner


def fastest_ms(variants: list[Variant], make_step, rounds: int) -> list[float]:
    """The fastest of ``rounds`` timings of each variant's step (``make_step(runner)`` returns it), the variants taking
    turns, so that other processes on shared cores slow them alike and the minimum is the step on quiet cores."""
    steps = [make_step(v.runner) for v in variants]
    for step in steps:
        step()
    best = [float("inf")] * len(variants)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def step_times(variants: list[Variant], rounds: int) -> dict[str, list[float]]:
    """Decode-step ms per (context, rows) and a prefill chunk's ms, per variant. The KV holds zeros: values do not
    change the work, and the rows' lengths and shared prefix are what the scheduler would pass."""
    caches = {id(v.runner): SlotKVCache(v.runner.kv_shape(), num_slots=max(ROWS) + 1, max_len=1024) for v in variants}
    out = {}
    for context, (length, shared) in CONTEXTS.items():
        for rows in ROWS:
            tokens, lengths = [1] * rows, [length + (b % 4) for b in range(rows)]

            def decode(runner: LlamaRunner, tokens=tokens, lengths=lengths, shared=shared):
                return lambda: runner.step(caches[id(runner)], tokens, lengths, (), shared)

            out[f"{context}/{rows}"] = fastest_ms(variants, decode, rounds)
    chunk = [Chunk(max(ROWS), 0, list(range(100, 100 + PREFILL_TOKENS)))]
    out["prefill"] = fastest_ms(variants, lambda r: lambda: r.step(caches[id(r)], [], [], chunk), max(2, rounds // 3))
    return out


def greedy(runner: LlamaRunner, prompt_ids: list[int], new_tokens: int) -> list[int]:
    cache = SlotKVCache(runner.kv_shape(), num_slots=1, max_len=len(prompt_ids) + new_tokens + 1)
    token = int(runner.prefill(prompt_ids, 0, cache, 0).argmax())
    out = [token]
    while len(out) < new_tokens:
        token = int(runner.decode([token], [len(prompt_ids) + len(out) - 1], cache)[0].argmax())
        out.append(token)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def variants(fp32: LoadedModel, max_len: int) -> list[Variant]:
    """Each weight format on the plain matmul (the first, fp32, is HF's arithmetic: the agreement reference), then on
    oneDNN-packed weights (``torch_prepack``, the default where ``packing_available``)."""
    packings = [False] + ([True] if packing_available() else [])
    out = [
        Variant(f"weights={w}{',packed' if packed else ''}", LlamaRunner(fp32.model, max_len, weights=w, packed=packed))
        for packed in packings
        for w in WEIGHT_FORMATS
    ]
    # The existing `dtype: bfloat16` setting: the whole model (activations, norms, attention, KV) in bf16.
    bf16_model = load_model(dtype="bfloat16")
    for packed in packings:
        runner = LlamaRunner(bf16_model.model, max_len, packed=packed)
        out.append(Variant(f"dtype=bfloat16{',packed' if packed else ''}", runner))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per cell and variant (the fastest counts)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt for the agreement check")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    loaded = load_model()
    tokenizer = loaded.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    cells = [f"{c}/{r}" for c in CONTEXTS for r in ROWS]
    print("\ndecode step, fastest of --rounds, ms (context/rows); prefill: one 256-token chunk")
    print(f"| variant | {' | '.join(cells)} | prefill | same text | common prefix (tokens of {args.tokens}) |")
    print("|---|" + "---:|" * (len(cells) + 1) + "---:|---|")
    runs = variants(loaded, 1024)
    times = step_times(runs, args.rounds)
    reference: list[list[int]] = []
    for i, variant in enumerate(runs):
        outputs = [greedy(variant.runner, ids, args.tokens) for ids in prompts]
        reference = reference or outputs
        same = sum(a == b for a, b in zip(outputs, reference, strict=True))
        prefixes = [common_prefix(a, b) for a, b in zip(outputs, reference, strict=True)]
        row = " | ".join(f"{times[c][i]:.1f}" for c in cells)
        print(
            f"| {variant.name} | {row} | {times['prefill'][i]:.0f} | {same}/{len(prompts)} | {prefixes} |", flush=True
        )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

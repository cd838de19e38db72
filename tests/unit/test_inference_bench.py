"""The inference benchmark's choice of how a peer runs (benchmarks/inference_bench.py): vLLM's dtype follows the
hardware unless a run names one, so the peer is never measured in a dtype its users would not pick on that CPU."""

from __future__ import annotations

import pytest

from benchmarks.inference_bench import vllm_dtype
from services.train import finetune


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_vllm_computes_in_bf16_only_where_the_cpu_has_it(monkeypatch, native: bool, expected: str) -> None:
    monkeypatch.setattr(finetune, "native_bf16", lambda: native)
    assert vllm_dtype("vllm") == expected


def test_a_named_dtype_wins_and_other_settings_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(finetune, "native_bf16", lambda: False)
    assert vllm_dtype("vllm@dtype=bfloat16") == "bfloat16"
    with pytest.raises(SystemExit, match="only the settings dtype"):
        vllm_dtype("vllm@max_model_len=4096")


def test_time_per_output_token_is_per_call_so_bursts_do_not_shrink_it() -> None:
    from benchmarks.inference_bench import Result, summarize

    # A constrained call whose 5 tokens came in one step's burst after 0.1 s of first token: its gaps are ~0, its
    # TPOT is what the client waited per token.
    burst = Result(ttft_s=0.1, total_s=0.5, tokens=5, gaps_s=[0.0, 0.0, 0.0, 0.4], constrained=True, text="{}")
    steady = Result(ttft_s=0.1, total_s=0.9, tokens=5, gaps_s=[0.2] * 4, constrained=False, text="hi")
    summary = summarize([burst, steady], wall=1.0)
    assert summary["itl_constrained_p50_ms"] == 0.0
    assert summary["tpot_constrained_p50_ms"] == 100.0
    assert summary["tpot_unconstrained_p50_ms"] == 200.0


def test_nonsense_peer_settings_are_refused_naming_what_to_use() -> None:
    from benchmarks.inference_bench import openvino_genai_prompt_lookup

    assert openvino_genai_prompt_lookup("openvino-genai") == 0
    assert openvino_genai_prompt_lookup("openvino-genai@prompt_lookup=3") == 3
    with pytest.raises(SystemExit, match="use a whole number"):
        openvino_genai_prompt_lookup("openvino-genai@prompt_lookup=three")
    with pytest.raises(SystemExit, match="only the settings prompt_lookup"):
        openvino_genai_prompt_lookup("openvino-genai@threads=2")
    with pytest.raises(SystemExit, match="use one of bfloat16, float32, float16"):
        vllm_dtype("vllm@dtype=" + "x" * 10_000)

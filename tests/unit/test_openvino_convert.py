"""The openvino backend's pure parts: request -> GenerationConfig fields, finish reasons, the prefix-hit estimate,
config validation, the one-time export (with a stand-in optimum-cli) and backend selection. No OpenVINO needed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from inference_core import Constraint, FinishReason, GenerationRequest, InvalidRequestError, SamplingParams
from inference_core.errors import EngineError
from inference_core.openvino_convert import finish_reason, generation_fields, structured_fields
from inference_core.openvino_engine import OpenVINOConfig
from inference_core.openvino_export import IR_FILES, ensure_ir, find_exporter, ir_directory
from inference_core.openvino_loop import PrefixIndex


def test_greedy_request_turns_sampling_off() -> None:
    request = GenerationRequest(prompt="hi", sampling=SamplingParams(temperature=0.0))
    fields = generation_fields(request, 12, [2])
    assert fields["do_sample"] is False
    assert fields["max_new_tokens"] == 12
    assert fields["stop_token_ids"] == {2}
    assert "rng_seed" not in fields and "temperature" not in fields


def test_sampled_request_keeps_its_values_and_seed() -> None:
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1234, repetition_penalty=1.2)
    fields = generation_fields(GenerationRequest(prompt="hi", sampling=sampling), 5, [2, 7])
    assert fields["do_sample"] is True
    assert (fields["temperature"], fields["top_p"], fields["top_k"], fields["rng_seed"]) == (0.7, 0.9, 40, 1234)
    assert fields["repetition_penalty"] == 1.2
    assert fields["stop_token_ids"] == {2, 7}


def test_unseeded_requests_draw_distinct_nonzero_seeds() -> None:
    request = GenerationRequest(prompt="hi", sampling=SamplingParams(temperature=1.0))
    seeds = {generation_fields(request, 5, [2])["rng_seed"] for _ in range(20)}
    assert 0 not in seeds  # 0 is the pipeline's one default seed
    assert len(seeds) > 1


def test_prompt_lookup_gives_every_request_a_draft_length() -> None:
    request = GenerationRequest(prompt="hi", sampling=SamplingParams(temperature=0.0))
    assert "num_assistant_tokens" not in generation_fields(request, 5, [2])
    fields = generation_fields(request, 5, [2], prompt_lookup_tokens=3)
    assert (fields["num_assistant_tokens"], fields["max_ngram_size"]) == (3, 3)


def test_top_k_zero_is_left_to_the_pipeline() -> None:
    fields = generation_fields(GenerationRequest(prompt="hi", sampling=SamplingParams(top_k=0)), 5, [2])
    assert "top_k" not in fields


@pytest.mark.parametrize(("kind", "field"), [("json_schema", "json_schema"), ("regex", "regex"), ("ebnf", "grammar")])
def test_constraint_kinds_map_to_structured_output_fields(kind: str, field: str) -> None:
    assert structured_fields(Constraint(kind, "x")) == {field: "x"}  # type: ignore[arg-type]


def test_unknown_constraint_kind_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="unknown; use one of json_schema, regex, ebnf"):
        structured_fields(Constraint("xml", "x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "output", "generated", "expected"),
    [
        ("FINISHED", "STOP", 3, FinishReason.STOP),
        ("FINISHED", "LENGTH", 3, FinishReason.LENGTH),
        ("FINISHED", "NONE", 8, FinishReason.LENGTH),
        ("CANCEL", "NONE", 1, FinishReason.CANCELLED),
        ("DROPPED_BY_PIPELINE", "NONE", 1, FinishReason.CANCELLED),
    ],
)
def test_finish_reason(status: str, output: str, generated: int, expected: FinishReason) -> None:
    assert finish_reason(status, output, generated, 8) is expected


def test_prefix_index_counts_whole_blocks_seen_before() -> None:
    index = PrefixIndex(block_tokens=4, capacity_tokens=64)
    assert index.admit(list(range(10))) == 0
    assert index.admit(list(range(10))) == 8  # two whole blocks; the last token is always computed
    assert index.admit([*range(6), 99, 98, 97]) == 4  # diverges inside the second block
    assert index.admit([5, *range(1, 12)]) == 0  # same tokens, other start: nothing


def test_prefix_index_never_counts_the_last_prompt_token() -> None:
    index = PrefixIndex(block_tokens=4, capacity_tokens=64)
    index.admit(list(range(8)))
    assert index.admit(list(range(8))) == 4


def test_prefix_index_forgets_least_recently_used_blocks() -> None:
    index = PrefixIndex(block_tokens=4, capacity_tokens=8)
    index.admit(list(range(9)))
    index.admit(list(range(100, 109)))
    assert index.admit(list(range(9))) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
        ({"max_num_seqs": 16, "max_num_batched_tokens": 8}, "must be at least max_num_seqs"),
        ({"kv_cache_gb": 0}, "kv_cache_gb must be > 0"),
        ({"inference_precision": "int8"}, "inference_precision 'int8' is unknown"),
        ({"prompt_lookup_tokens": -1}, "prompt_lookup_tokens must be >= 0"),
    ],
)
def test_config_errors_say_what_to_change(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpenVINOConfig(**overrides)


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def fake_exporter(tmp_path: Path, body: str) -> Path:
    """An optimum-cli stand-in: its last argument is the output directory; it logs each call to calls.log."""
    script = tmp_path / "optimum-cli"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.log\nfor out; do :; done\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_export_runs_once_and_is_cached(tmp_path: Path, hf_model: Path) -> None:
    files = " ".join(f'"$out/{name}"' for name in IR_FILES)
    cli = fake_exporter(tmp_path, f'mkdir -p "$out" && touch {files}')
    first = ensure_ir(hf_model, tmp_path / "cache", "int8", str(cli))
    second = ensure_ir(hf_model, tmp_path / "cache", "int8", str(cli))
    assert first == second == ir_directory(hf_model, tmp_path / "cache", "int8")
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 1
    assert f"--model {hf_model} --task text-generation-with-past --weight-format int8" in calls[0]


def test_a_changed_source_gets_its_own_export(tmp_path: Path, hf_model: Path) -> None:
    before = ir_directory(hf_model, tmp_path, "fp32")
    (hf_model / "config.json").write_text('{"changed": true}')
    assert ir_directory(hf_model, tmp_path, "fp32") != before
    assert ir_directory(hf_model, tmp_path, "int4") != before


def test_failed_export_reports_the_exporters_output(tmp_path: Path, hf_model: Path) -> None:
    cli = fake_exporter(tmp_path, 'echo "no such task" >&2; exit 3')
    with pytest.raises(EngineError, match=r"optimum-cli export failed \(exit 3\): no such task"):
        ensure_ir(hf_model, tmp_path / "cache", "fp32", str(cli))


def test_failed_export_reports_the_exception_line_not_the_listing_after_it(tmp_path: Path, hf_model: Path) -> None:
    listing = "; ".join(f'echo "  layer {i}" >&2' for i in range(50))
    cli = fake_exporter(
        tmp_path, f'echo "Traceback" >&2; echo "nncf.errors.InvalidGroupSizeError: group 128" >&2; {listing}; exit 1'
    )
    with pytest.raises(EngineError, match=r"failed \(exit 1\): nncf.errors.InvalidGroupSizeError: group 128$"):
        ensure_ir(hf_model, tmp_path / "cache", "int4", str(cli))
    assert "--weight-format int4 --group-size 64" in (tmp_path / "calls.log").read_text()


def test_export_that_leaves_files_out_is_an_error(tmp_path: Path, hf_model: Path) -> None:
    cli = fake_exporter(tmp_path, 'mkdir -p "$out" && touch "$out/openvino_model.xml"')
    with pytest.raises(EngineError, match=r"lacks some of openvino_model\.xml"):
        ensure_ir(hf_model, tmp_path / "cache", "fp32", str(cli))
    assert not ir_directory(hf_model, tmp_path / "cache", "fp32").exists()


def test_no_exporter_says_how_to_install_one(tmp_path: Path, hf_model: Path) -> None:
    with pytest.raises(EngineError, match="make install-openvino"):
        ensure_ir(hf_model, tmp_path / "cache", "fp32", str(tmp_path / "missing-cli"))


def test_unknown_weight_format_is_refused(tmp_path: Path, hf_model: Path) -> None:
    with pytest.raises(EngineError, match="weight format 'int3' is unknown"):
        ensure_ir(hf_model, tmp_path, "int3")  # type: ignore[arg-type]


def test_a_configured_exporter_that_is_missing_is_none(tmp_path: Path) -> None:
    assert find_exporter(str(tmp_path / "nope")) is None

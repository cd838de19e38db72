"""`trtllm build`: fails at once naming what is missing (TensorRT-LLM, a GPU), checks its inputs, and around the
GPU-only steps writes what a Triton deployment needs (build info, the repository with engine_dir filled)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import services.triton.trtllm as trtllm
from services.common.errors import InvalidArgumentError
from services.triton import TritonRepoOptions, default_model_path
from services.triton.cli import trtllm_app
from services.triton.trtllm import (
    EngineBuildOptions,
    TrtllmUnavailableError,
    build_engines,
    check_build_environment,
    fill_repository,
    model_architecture,
    trtllm_build_command,
)

NO_TRTLLM = "TensorRT-LLM is not installed: install it with `pip install 'meshpilot[trtllm]'`"
NO_GPU = "no NVIDIA GPU: no NVIDIA driver here (libcuda.so.1 not found)"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch):
    """Sets what the probes see: environment(trtllm=bool, gpus=int, build_command=bool)."""

    def set_to(trtllm_installed: bool, gpus: int, build_command: bool = True) -> None:
        monkeypatch.setattr(trtllm, "tensorrt_llm_installed", lambda: trtllm_installed)
        why = "" if gpus else "no NVIDIA driver here (libcuda.so.1 not found)"
        monkeypatch.setattr(trtllm, "visible_gpus", lambda: (gpus, why))
        monkeypatch.setattr(trtllm, "_trtllm_build_command", lambda: "/usr/bin/trtllm-build" if build_command else None)

    return set_to


def hf_model(directory: Path, architecture: str = "LlamaForCausalLM") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return directory


def test_this_machine_fails_at_once_naming_both(tmp_path: Path) -> None:
    if trtllm.tensorrt_llm_installed() and trtllm.visible_gpus()[0]:
        pytest.skip("this machine can build engines")
    with pytest.raises(TrtllmUnavailableError, match="cannot build TensorRT-LLM engines here") as caught:
        build_engines(default_model_path(), tmp_path / "engines", repository=tmp_path / "repo")
    assert "pip install 'meshpilot[trtllm]'" in str(caught.value) or "no NVIDIA GPU" in str(caught.value)
    assert list(tmp_path.iterdir()) == [], "nothing is written before the checks pass"


def test_missing_trtllm_and_gpu_are_both_named(environment) -> None:
    environment(trtllm_installed=False, gpus=0)
    with pytest.raises(TrtllmUnavailableError) as caught:
        check_build_environment()
    assert NO_TRTLLM in str(caught.value) and NO_GPU in str(caught.value)
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3" in str(caught.value)


def test_missing_trtllm_alone(environment, tmp_path: Path) -> None:
    environment(trtllm_installed=False, gpus=1)
    with pytest.raises(TrtllmUnavailableError) as caught:
        build_engines(hf_model(tmp_path / "hf"), tmp_path / "engines")
    assert NO_TRTLLM in str(caught.value) and "GPU" not in str(caught.value)
    assert not (tmp_path / "engines").exists()


def test_missing_gpu_alone(environment, tmp_path: Path) -> None:
    environment(trtllm_installed=True, gpus=0)
    with pytest.raises(TrtllmUnavailableError) as caught:
        build_engines(hf_model(tmp_path / "hf"), tmp_path / "engines")
    assert NO_GPU in str(caught.value) and "not installed" not in str(caught.value)
    assert not (tmp_path / "engines").exists()


def test_missing_trtllm_build_and_too_few_gpus(environment) -> None:
    environment(trtllm_installed=True, gpus=1, build_command=False)
    with pytest.raises(TrtllmUnavailableError) as caught:
        check_build_environment(tp_size=2)
    assert "trtllm-build command is not on PATH; reinstall tensorrt-llm" in str(caught.value)
    assert "tp_size 2 needs 2 GPUs but 1 are visible; lower --tp-size" in str(caught.value)


def test_cli_fails_at_once_with_exit_2(environment, tmp_path: Path) -> None:
    environment(trtllm_installed=False, gpus=0)
    done = CliRunner().invoke(trtllm_app, ["build", "--model", str(tmp_path), "--out", str(tmp_path / "e")])
    assert done.exit_code == 2
    assert NO_TRTLLM in done.stderr and NO_GPU in done.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineBuildOptions(dtype="int3"), "dtype is 'int3'; use one of float16, bfloat16, float32"),
        (EngineBuildOptions(max_input_len=4096), r"max_input_len \(4096\) must be below max_seq_len \(4096\)"),
        (EngineBuildOptions(max_batch_size=0), "max_batch_size is 0; use an integer >= 1"),
    ],
)
def test_bad_build_options_are_refused(environment, tmp_path: Path, options: EngineBuildOptions, message: str) -> None:
    environment(trtllm_installed=True, gpus=1)
    with pytest.raises(InvalidArgumentError, match=message):
        build_engines(hf_model(tmp_path / "hf"), tmp_path / "engines", options)
    assert not (tmp_path / "engines").exists()


def test_models_the_llama_converter_cannot_read_are_refused(environment, tmp_path: Path) -> None:
    environment(trtllm_installed=True, gpus=1)
    with pytest.raises(InvalidArgumentError, match=r"is a GPT2LMHeadModel; this command builds Llama-family"):
        build_engines(hf_model(tmp_path / "gpt2", "GPT2LMHeadModel"), tmp_path / "engines")
    with pytest.raises(InvalidArgumentError, match=r"neither a HF model directory \(with config.json\) nor a .gguf"):
        build_engines(tmp_path / "nothing", tmp_path / "engines")


def test_the_default_gguf_is_a_llama() -> None:
    assert model_architecture(default_model_path()) == "LlamaForCausalLM"


def test_trtllm_build_flags() -> None:
    options = EngineBuildOptions(max_batch_size=8, max_input_len=1024, max_seq_len=2048, max_num_tokens=4096)
    command = trtllm_build_command(Path("/ckpt"), Path("/engines"), options)
    assert {
        "--checkpoint_dir=/ckpt",
        "--output_dir=/engines",
        "--gemm_plugin=auto",
        "--max_batch_size=8",
        "--max_input_len=1024",
        "--max_seq_len=2048",
        "--max_num_tokens=4096",
        "--use_paged_context_fmha=enable",
    } <= set(command)
    assert "--use_paged_context_fmha=enable" not in trtllm_build_command(
        Path("/c"), Path("/e"), EngineBuildOptions(kv_cache_reuse=False)
    )


def test_build_runs_conversion_then_trtllm_build_and_fills_the_repository(
    environment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment(trtllm_installed=True, gpus=1)
    converted: list[tuple[Path, Path]] = []
    commands: list[list[str]] = []

    def convert(hf_dir: Path, checkpoint: Path, options: EngineBuildOptions) -> None:
        converted.append((hf_dir, checkpoint))

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(trtllm, "_convert_checkpoint", convert)
    monkeypatch.setattr(trtllm.subprocess, "run", run)
    monkeypatch.setattr(trtllm.importlib.metadata, "version", lambda name: "0.19.0")
    model = hf_model(tmp_path / "hf")
    result = build_engines(
        model,
        tmp_path / "engines",
        EngineBuildOptions(max_batch_size=16),
        repository=tmp_path / "repo",
        repo_options=TritonRepoOptions(kv_cache_free_gpu_mem_fraction=0.8),
        served_engine_dir="/models/engines",
    )
    assert converted == [(model, tmp_path / ".engines-work" / "checkpoint")]
    assert commands[0][0] == "/usr/bin/trtllm-build" and "--max_batch_size=16" in commands[0]
    info = json.loads((tmp_path / "engines" / "meshpilot-build.json").read_text())
    assert info["tensorrt_llm_version"] == "0.19.0" and info["options"]["max_batch_size"] == 16
    assert result.repository is not None
    engine = result.repository.configs["tensorrt_llm"]
    assert engine.backend == "tensorrtllm" and engine.max_batch_size == 16
    assert engine.parameters["gpt_model_path"].string_value == "/models/engines"
    assert engine.parameters["tokenizer_dir"].string_value == str(model)
    assert engine.parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.8"


def test_failed_trtllm_build_reports_its_output(environment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environment(trtllm_installed=True, gpus=1)
    monkeypatch.setattr(trtllm, "_convert_checkpoint", lambda *args: None)
    monkeypatch.setattr(
        trtllm.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "OOM on rank 0")
    )
    with pytest.raises(TrtllmUnavailableError, match=r"trtllm-build failed \(1\):\nOOM on rank 0"):
        build_engines(hf_model(tmp_path / "hf"), tmp_path / "engines")


def test_fill_repository_serves_the_engines_with_their_batch_size(tmp_path: Path) -> None:
    repo = fill_repository(tmp_path / "repo", "/e", "/t", EngineBuildOptions(max_batch_size=4, kv_cache_reuse=False))
    assert all(config.max_batch_size == 4 for config in repo.configs.values())
    assert repo.configs["tensorrt_llm"].parameters["enable_kv_cache_reuse"].string_value == "false"
    assert (tmp_path / "repo" / "tensorrt_llm_bls" / "1" / "model.py").is_file()


@pytest.mark.slow
def test_gguf_is_de_quantized_into_a_hf_checkpoint_with_the_same_logits(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trtllm.export_hf_checkpoint(default_model_path(), tmp_path / "hf", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert list(out.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    source = default_model_path()
    original = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    exported = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, exported(ids).logits, atol=1e-4)

"""The generated TensorRT-LLM model repository: valid ModelConfigs, the current I/O names, options and their errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

import services.triton
from services.common.errors import InvalidArgumentError
from services.triton import (
    MODEL_NAMES,
    TemplateError,
    TritonRepoOptions,
    check_repository,
    parse_model_config,
    render_configs,
    write_model_repository,
)
from services.triton.cli import triton_app
from services.triton.repo import DEPLOY_DIR

GPU = TritonRepoOptions(engine_dir="/engines/smollm2", tokenizer_dir="/models/smollm2")
CURRENT_INPUTS = {
    "text_input",
    "max_tokens",
    "min_tokens",
    "seed",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "guided_decoding_guide_type",
    "guided_decoding_guide",
    "stop_words",
    "bad_words",
    "exclude_input_in_output",
    "stream",
    "temperature",
    "top_k",
    "top_p",
    "beam_width",
    "num_return_sequences",
    "return_perf_metrics",
}
T = model_config_pb2.DataType


def _read(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for name in MODEL_NAMES:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
        configs[name] = config
    return configs


def _inputs(config: model_config_pb2.ModelConfig) -> dict[str, model_config_pb2.ModelInput]:
    return {t.name: t for t in config.input}


def test_exports_are_pinned() -> None:
    assert set(services.triton.__all__) == {
        "MODEL_NAMES",
        "EngineBuild",
        "EngineBuildOptions",
        "TrtllmUnavailableError",
        "build_engines",
        "check_build_environment",
        "export_hf_checkpoint",
        "fill_repository",
        "LocalTritonServer",
        "ModelRepository",
        "TemplateError",
        "TritonInstall",
        "TritonPorts",
        "TritonRepoOptions",
        "TritonServerError",
        "check_repository",
        "cpu_twin_server",
        "default_model_path",
        "export_gguf_tokenizer",
        "parse_model_config",
        "prepare_backends",
        "render_configs",
        "write_model_repository",
    }


def test_gpu_repository_writes_five_valid_models(tmp_path: Path) -> None:
    repo = write_model_repository(tmp_path, GPU)
    configs = _read(tmp_path)
    assert set(configs) == set(MODEL_NAMES) == set(repo.configs)
    for name, config in configs.items():
        assert config.name == name
        assert config.max_batch_size == 64
        assert (tmp_path / name / "1").is_dir()
    engine = configs["tensorrt_llm"]
    assert engine.backend == "tensorrtllm"
    assert engine.model_transaction_policy.decoupled
    assert engine.parameters["gpt_model_path"].string_value == "/engines/smollm2"
    assert engine.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    assert engine.parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.9"
    assert engine.parameters["enable_kv_cache_reuse"].string_value == "true"
    assert engine.parameters["guided_decoding_backend"].string_value == "xgrammar"
    assert engine.parameters["tokenizer_dir"].string_value == "/models/smollm2"
    assert "max_tokens_in_paged_kv_cache" not in engine.parameters
    assert not list((tmp_path / "tensorrt_llm" / "1").iterdir()), "the TensorRT-LLM backend needs no model.py"
    assert configs["ensemble"].platform == "ensemble"
    for name in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        assert configs[name].backend == "python"
        assert {p.name for p in (tmp_path / name / "1").iterdir()} == {"model.py", "text_codec.py"}
        assert configs[name].parameters["tokenizer_dir"].string_value == "/models/smollm2"


@pytest.mark.parametrize("front", ["ensemble", "tensorrt_llm_bls"])
def test_fronts_use_the_current_tensorrt_llm_names(tmp_path: Path, front: str) -> None:
    write_model_repository(tmp_path, GPU)
    inputs = _inputs(_read(tmp_path)[front])
    assert set(inputs) >= CURRENT_INPUTS
    assert not {"min_length", "random_seed"} & set(inputs)
    assert inputs["seed"].data_type == T.TYPE_UINT64
    assert inputs["text_input"].data_type == T.TYPE_STRING and list(inputs["text_input"].dims) == [1]
    assert not inputs["text_input"].optional and not inputs["max_tokens"].optional
    assert all(t.optional for n, t in inputs.items() if n not in ("text_input", "max_tokens"))
    outputs = {t.name: t for t in _read(tmp_path)[front].output}
    assert {"text_output", "num_input_tokens", "num_output_tokens", "cum_log_probs"} <= set(outputs)
    assert outputs["num_output_tokens"].data_type == T.TYPE_INT32


def test_ensemble_maps_every_input_and_chains_the_three_steps(tmp_path: Path) -> None:
    write_model_repository(tmp_path, GPU)
    ensemble = _read(tmp_path)["ensemble"]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    mapped = {value for step in steps for value in step.input_map.values()}
    assert {t.name for t in ensemble.input} <= mapped
    assert steps[1].input_map["streaming"] == "stream"
    assert steps[1].input_map["runtime_top_k"] == "top_k"
    assert steps[2].output_map["OUTPUT"] == "text_output"


def test_options_reach_the_configs(tmp_path: Path) -> None:
    options = TritonRepoOptions(
        engine_dir="/e",
        tokenizer_dir="/t",
        max_batch_size=8,
        decoupled=False,
        max_queue_delay_microseconds=250,
        max_queue_size=32,
        kv_cache_free_gpu_mem_fraction=0.5,
        enable_kv_cache_reuse=False,
        max_tokens_in_paged_kv_cache=4096,
        guided_decoding_backend="",
        preprocessing_instance_count=2,
        postprocessing_instance_count=3,
        bls_instance_count=4,
        accumulate_tokens=True,
    )
    configs = write_model_repository(tmp_path, options).configs
    engine = configs["tensorrt_llm"]
    assert not engine.model_transaction_policy.decoupled
    assert not configs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    assert engine.dynamic_batching.max_queue_delay_microseconds == 250
    assert engine.dynamic_batching.default_queue_policy.max_queue_size == 32
    assert engine.parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.5"
    assert engine.parameters["enable_kv_cache_reuse"].string_value == "false"
    assert engine.parameters["max_tokens_in_paged_kv_cache"].string_value == "4096"
    assert engine.parameters["guided_decoding_backend"].string_value == ""
    assert [g.count for g in configs["preprocessing"].instance_group] == [2]
    assert [g.count for g in configs["postprocessing"].instance_group] == [3]
    assert [g.count for g in configs["tensorrt_llm_bls"].instance_group] == [4]
    assert configs["tensorrt_llm_bls"].parameters["accumulate_tokens"].string_value == "true"
    assert all(c.max_batch_size == 8 for c in configs.values())


def test_paths_with_quotes_and_backslashes_survive(tmp_path: Path) -> None:
    odd = '/data/my "engines"\\v1/ünï'
    configs = _read(write_model_repository(tmp_path, TritonRepoOptions(engine_dir=odd, tokenizer_dir=odd)).path)
    assert configs["tensorrt_llm"].parameters["gpt_model_path"].string_value == odd
    assert configs["preprocessing"].parameters["tokenizer_dir"].string_value == odd


def test_cpu_twin_has_the_engine_io_of_the_gpu_backend(tmp_path: Path) -> None:
    gpu = render_configs(GPU.validated())
    twin_repo = write_model_repository(
        tmp_path, TritonRepoOptions(cpu_twin=True, twin_threads=2), export_tokenizer=False
    )
    twin = twin_repo.configs["tensorrt_llm"]
    gpu_engine = parse_model_config(gpu["tensorrt_llm"], "tensorrt_llm")
    assert twin.backend == "python"
    assert list(twin.input) == list(gpu_engine.input)
    assert list(twin.output) == list(gpu_engine.output)
    assert twin.parameters["model_path"].string_value.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert twin.parameters["threads"].string_value == "2"
    assert {p.name for p in (tmp_path / "tensorrt_llm" / "1").iterdir()} == {
        "model.py",
        "twin_request.py",
        "text_codec.py",
    }
    for name in ("ensemble", "tensorrt_llm_bls"):
        gpu_front = parse_model_config(gpu[name], name)
        assert list(twin_repo.configs[name].input) == list(gpu_front.input)
        assert list(twin_repo.configs[name].output) == list(gpu_front.output)


def test_rewriting_replaces_model_directories_and_keeps_other_files(tmp_path: Path) -> None:
    write_model_repository(tmp_path, GPU)
    stale = tmp_path / "preprocessing" / "1" / "stale.py"
    stale.write_text("")
    keep = tmp_path / "README.txt"
    keep.write_text("mine")
    write_model_repository(tmp_path, GPU)
    assert not stale.exists()
    assert keep.read_text() == "mine"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", max_batch_size=0),
            "max_batch_size is 0; use an integer >= 1",
        ),
        (
            TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", kv_cache_free_gpu_mem_fraction=1.5),
            "use a fraction in (0, 1]",
        ),
        (
            TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", batch_scheduler_policy="fifo"),
            "use one of 'max_utilization'",
        ),
        (
            TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", guided_decoding_backend="outlines"),
            "use one of '', 'xgrammar'",
        ),
        (TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", max_queue_size=-1), "max_queue_size is -1"),
        (TritonRepoOptions(tokenizer_dir="/t"), "engine_dir is required for the GPU repository"),
        (TritonRepoOptions(engine_dir="/e"), "tokenizer_dir is required for the GPU repository"),
        (TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t\n"), "tokenizer_dir contains a line break"),
        (TritonRepoOptions(engine_dir="/e", tokenizer_dir="/t", twin_threads=2), "apply only with cpu_twin=True"),
        (TritonRepoOptions(cpu_twin=True, max_beam_width=2), "max_beam_width must be 1 with cpu_twin"),
        (
            TritonRepoOptions(cpu_twin=True, engine_dir="/nowhere/model.gguf"),
            "engine_dir /nowhere/model.gguf does not exist",
        ),
    ],
)
def test_invalid_options_say_what_to_change_and_write_nothing(
    tmp_path: Path, options: TritonRepoOptions, expected: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        write_model_repository(tmp_path / "repo", options)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in str(info.value)
    assert not (tmp_path / "repo").exists()


def test_a_broken_template_is_reported_with_its_model(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY_DIR, deploy)
    postprocessing = deploy / "templates" / "postprocessing.pbtxt"
    postprocessing.write_text(postprocessing.read_text().replace("dims: [ -1, -1 ]", "dims: [ -1, -1"))
    with pytest.raises(TemplateError, match=r"config\.pbtxt of postprocessing is not a valid Triton ModelConfig"):
        write_model_repository(tmp_path / "repo", GPU, deploy_dir=deploy)
    (deploy / "templates" / "ensemble.pbtxt").write_text("name: ${no_such_option}")
    with pytest.raises(TemplateError, match="placeholder no option fills"):
        render_configs(GPU.validated(), deploy)


def test_cross_check_finds_an_ensemble_map_that_does_not_line_up() -> None:
    texts = render_configs(GPU.validated())
    configs = {name: parse_model_config(text, name) for name, text in texts.items()}
    check_repository(configs)
    del configs["preprocessing"].output[:]
    with pytest.raises(TemplateError, match=r"ensemble reads preprocessing\.\w+, which is not an output"):
        check_repository(configs)
    configs = {name: parse_model_config(text, name) for name, text in texts.items()}
    configs["tensorrt_llm_bls"].input.pop()
    with pytest.raises(TemplateError, match="tensorrt_llm_bls and ensemble must have the same inputs"):
        check_repository(configs)


def test_config_named_after_another_model_is_refused() -> None:
    with pytest.raises(TemplateError, match="names the model 'ensemble'; it must match its directory"):
        parse_model_config('name: "ensemble"', "preprocessing")


def test_cli_writes_a_repository_and_reports_bad_options(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    runner = CliRunner()
    args = ["repo", "--out", str(out), "--engine-dir", "/e", "--tokenizer-dir", "/t", "--max-batch-size", "4"]
    done = runner.invoke(triton_app, [*args, "--no-enable-kv-cache-reuse"])
    assert done.exit_code == 0, done.output
    assert f"to {out}" in done.output
    configs = _read(out)
    assert configs["ensemble"].max_batch_size == 4
    assert configs["tensorrt_llm"].parameters["enable_kv_cache_reuse"].string_value == "false"
    bad = runner.invoke(triton_app, ["repo", "--out", str(tmp_path / "bad"), "--engine-dir", "/e"])
    assert bad.exit_code == 2
    assert "tokenizer_dir is required for the GPU repository" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_serve_cpu_without_the_triton_venv_says_how_to_create_it(tmp_path: Path) -> None:
    done = CliRunner().invoke(
        triton_app, ["serve-cpu", "--venv", str(tmp_path / "no-venv"), "--workdir", str(tmp_path / "work")]
    )
    assert done.exit_code == 2
    assert f"no tritonserver in {tmp_path / 'no-venv'}; run `make triton-cpu`" in done.stderr


def _fake_install_script(tmp_path: Path, *, fails: bool = False) -> Path:
    """A stand-in for scripts/triton_cpu.sh: counts its runs, takes a while, and lays out what TritonInstall.find
    looks for in $TRITON_VENV (or fails saying so)."""
    script = tmp_path / "install.sh"
    server = '"$TRITON_VENV/lib/python3.11/site-packages/pytriton/tritonserver"'
    script.write_text(
        f'echo run >> "{tmp_path}/runs"\nsleep 0.5\n'
        + ('echo "pip: no matching distribution" >&2\nexit 3\n' if fails else "")
        + f"mkdir -p {server}/bin {server}/backends/python {server}/python_backend_stubs/3.11 "
        '"$TRITON_VENV/lib/python3.11/site-packages/nvidia_pytriton.libs"\n'
        f"touch {server}/bin/tritonserver {server}/python_backend_stubs/3.11/triton_python_backend_stub\n"
    )
    return script


def test_two_workers_asking_for_the_missing_triton_venv_at_once_install_it_once(tmp_path: Path, monkeypatch) -> None:
    import threading

    from services.triton import server as triton_server

    monkeypatch.setattr(triton_server, "INSTALL_SCRIPT", _fake_install_script(tmp_path))
    venv = tmp_path / "venv-triton"
    errors: list[BaseException] = []

    def make() -> None:
        try:
            triton_server.cpu_twin_server(tmp_path / f"work-{threading.get_ident()}", venv=venv)
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=make) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert (tmp_path / "runs").read_text().splitlines() == ["run"]
    assert triton_server.TritonInstall.find(venv).binary.name == "tritonserver"


def test_a_failed_triton_venv_install_says_what_the_script_said(tmp_path: Path, monkeypatch) -> None:
    from services.triton import server as triton_server

    monkeypatch.setattr(triton_server, "INSTALL_SCRIPT", _fake_install_script(tmp_path, fails=True))
    with pytest.raises(triton_server.TritonServerError, match=r"--install-only failed:\npip: no matching distribution"):
        triton_server.cpu_twin_server(tmp_path / "work", venv=tmp_path / "venv-triton")

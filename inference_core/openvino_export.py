"""Exporting a model to OpenVINO IR once (optimum-intel's exporter, run in its own virtual environment) and caching it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from inference_core.errors import EngineError
from inference_core.model_loading import cached_checkpoint, gguf_cache_dir, load_model, resolve_model_path

log = logging.getLogger(__name__)

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("fp32", "fp16", "int8", "int4")
EXPORT_VENV = ".venv-ov-export"
"""Where `make install-openvino` puts optimum-intel: its pins (transformers, torch) clash with the main environment."""
EXPORT_TIMEOUT_SECONDS = 1800
IR_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")


def find_exporter(configured: str | None = None) -> Path | None:
    """The optimum-cli to export with: ``configured`` if given, else the one `make install-openvino` installs beside
    this checkout, else one on PATH; None when there is none."""
    if configured:
        path = Path(configured)
        return path if path.is_file() else None
    beside = Path(__file__).resolve().parent.parent / EXPORT_VENV / "bin" / "optimum-cli"
    if beside.is_file():
        return beside
    found = shutil.which("optimum-cli")
    return Path(found) if found else None


def ir_directory(model_path: str | os.PathLike[str] | None, cache_dir: Path, weight_format: WeightFormat) -> Path:
    """Where the IR of this model and weight format is cached: named by the source's path, size and mtime, so a
    changed source is exported again."""
    directory, gguf = resolve_model_path(model_path)
    source = directory / gguf if gguf else directory / "config.json"
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = Path(gguf).stem if gguf else directory.name
    return cache_dir / f"{stem}-{weight_format}-{key}"


def is_exported(ir_dir: Path) -> bool:
    return all((ir_dir / name).is_file() for name in IR_FILES)


def ensure_ir(
    model_path: str | os.PathLike[str] | None,
    cache_dir: Path,
    weight_format: WeightFormat = "fp32",
    exporter: str | None = None,
) -> Path:
    """The IR directory of the model, exported first if it is not cached (blocking: ~20 s for SmolLM2-135M, minutes
    for int4 of larger models). Concurrent starts wait for one export. Raises EngineError saying what to do."""
    if weight_format not in WEIGHT_FORMATS:
        raise EngineError(
            f"openvino weight format {weight_format!r} is unknown; use one of {', '.join(WEIGHT_FORMATS)}"
        )
    ir_dir = ir_directory(model_path, cache_dir, weight_format)
    if is_exported(ir_dir):
        return ir_dir
    cli = find_exporter(exporter)
    if cli is None:
        raise EngineError(
            f"the model is not exported to OpenVINO IR yet ({ir_dir}) and optimum-cli was not found; run "
            "`make install-openvino` (optimum-intel in its own venv) or set inference.openvino_exporter"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _export_lock(cache_dir):
        if is_exported(ir_dir):
            return ir_dir
        started = time.monotonic()
        hf_dir = _hf_directory(model_path, cache_dir)
        log.info("exporting %s to OpenVINO IR (%s weights) with %s into %s", hf_dir, weight_format, cli, ir_dir)
        partial = ir_dir.with_name(ir_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        command = [str(cli), "export", "openvino", "--model", str(hf_dir), "--task", "text-generation-with-past"]
        command += ["--weight-format", weight_format]
        if weight_format == "int4":
            # nncf's default group of 128 does not divide SmolLM2's 576 channels ("Failed to apply group-wise
            # quantization"); 64 divides the hidden sizes of the common small and large models alike.
            command += ["--group-size", "64"]
        command.append(str(partial))
        _run_exporter(command)
        if not is_exported(partial):
            raise EngineError(f"optimum-cli finished but {partial} lacks some of {', '.join(IR_FILES)}")
        partial.rename(ir_dir)
        log.info("exported to OpenVINO IR in %.0f s (cached in %s)", time.monotonic() - started, ir_dir)
    return ir_dir


def _run_exporter(command: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_SECONDS, env=env, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise EngineError(f"optimum-cli export did not finish in {EXPORT_TIMEOUT_SECONDS} s") from e
    except OSError as e:
        raise EngineError(f"could not run {command[0]}: {e}") from e
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        # The exporter ends with the exception, often after a long listing; its first line is what says why.
        errors = [line for line in output.splitlines() if re.match(r"^[\w.]*(Error|Exception)\b", line)]
        reason = errors[-1] if errors else output[-1500:]
        raise EngineError(f"optimum-cli export failed (exit {result.returncode}): {reason[:1500]}")


def _hf_directory(model_path: str | os.PathLike[str] | None, cache_dir: Path) -> Path:
    """A HF directory the exporter can read: the configured one, or the GGUF de-quantized into a plain
    LlamaForCausalLM checkpoint (optimum-intel does not read GGUF): load_model's copy, or one under ``cache_dir``
    when load_model keeps none."""
    directory, gguf = resolve_model_path(model_path)
    if gguf is None:
        return directory
    kept_in = gguf_cache_dir()
    if kept_in is not None:  # load_model's own de-quantized copy, made by loading the GGUF once if it is missing
        kept = cached_checkpoint(directory / gguf, kept_in, "float32")
        if not (kept / "config.json").is_file():
            load_model(directory / gguf, dtype="float32")
        if (kept / "config.json").is_file():
            return kept
    fp32_ir = ir_directory(model_path, cache_dir, "fp32")
    hf_dir = fp32_ir.with_name(fp32_ir.name.replace("-fp32-", "-hf-"))
    if (hf_dir / "config.json").is_file():
        return hf_dir
    log.info("de-quantizing %s into a HF checkpoint for the exporter (%s)", directory / gguf, hf_dir)
    save_gguf_as_hf(directory / gguf, hf_dir)
    return hf_dir


def save_gguf_as_hf(gguf_path: Path, out_dir: Path) -> None:
    """Loads a GGUF with transformers and saves it as a plain fp32 HF checkpoint with its tokenizer (also what vLLM
    reads; ``model_loading.save_plain_checkpoint``)."""
    from inference_core.model_loading import save_plain_checkpoint

    save_plain_checkpoint(load_model(gguf_path, dtype="float32"), out_dir)


@contextlib.contextmanager
def _export_lock(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".export.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    formats = [f for f in sys.argv[2:] if f in WEIGHT_FORMATS] or ["fp32"]
    for fmt in formats:
        print(ensure_ir(None, Path(sys.argv[1]), fmt))

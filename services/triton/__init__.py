"""Triton Inference Server tooling: TensorRT-LLM model repositories (GPU and CPU twin) and a local tritonserver."""

from services.triton.options import TritonRepoOptions, default_model_path
from services.triton.repo import (
    MODEL_NAMES,
    ModelRepository,
    TemplateError,
    check_repository,
    parse_model_config,
    render_configs,
    write_model_repository,
)

__all__ = [
    "MODEL_NAMES",
    "ModelRepository",
    "TemplateError",
    "TritonRepoOptions",
    "check_repository",
    "default_model_path",
    "parse_model_config",
    "render_configs",
    "write_model_repository",
]

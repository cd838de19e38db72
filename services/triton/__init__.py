"""Triton Inference Server tooling: TensorRT-LLM model repositories (GPU and CPU twin) and a local CPU tritonserver.

Not a gRPC service of the mesh: the CLI and tests use it to generate repositories and run tritonserver.
"""

from services.triton.options import TritonRepoOptions, default_model_path
from services.triton.repo import (
    MODEL_NAMES,
    ModelRepository,
    TemplateError,
    check_repository,
    export_gguf_tokenizer,
    parse_model_config,
    render_configs,
    write_model_repository,
)
from services.triton.server import (
    LocalTritonServer,
    TritonInstall,
    TritonPorts,
    TritonServerError,
    cpu_twin_server,
    prepare_backends,
)

__all__ = [
    "MODEL_NAMES",
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
]

"""Triton Inference Server tooling: TensorRT-LLM model repositories (GPU and CPU twin), engine builds for GPU nodes
and a local CPU tritonserver.

Not a gRPC service of the mesh: the CLI (``services.triton.cli``: ``triton_app``, ``trtllm_app``), tests and benchmarks
use it to generate repositories, build engines and run tritonserver.
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
from services.triton.trtllm import (
    EngineBuild,
    EngineBuildOptions,
    TrtllmUnavailableError,
    build_engines,
    check_build_environment,
    export_hf_checkpoint,
    fill_repository,
)

__all__ = [
    "MODEL_NAMES",
    "EngineBuild",
    "EngineBuildOptions",
    "LocalTritonServer",
    "ModelRepository",
    "TemplateError",
    "TritonInstall",
    "TritonPorts",
    "TritonRepoOptions",
    "TritonServerError",
    "TrtllmUnavailableError",
    "build_engines",
    "check_build_environment",
    "check_repository",
    "cpu_twin_server",
    "default_model_path",
    "export_gguf_tokenizer",
    "export_hf_checkpoint",
    "fill_repository",
    "parse_model_config",
    "prepare_backends",
    "render_configs",
    "write_model_repository",
]

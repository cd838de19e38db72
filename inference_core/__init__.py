"""The inference engine library: one Engine interface, a torch backend, and a scripted fake for tests.

TorchEngine and default_model_path are imported on first use, so code that only needs the types or
inference_core.testing.FakeEngine does not pay for importing torch.
"""

import os
from typing import Any

# Must precede the first import of torch (libgomp reads it once). With the default spin-waiting, torch's OpenMP threads
# burn their time slices when the cores are shared with other processes: measured here on 2 busy cores, decode fell
# to 0.4-3 tokens/s spinning versus 18-19 tokens/s passive. setdefault leaves an operator's explicit choice alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from inference_core.engine import Engine
from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from inference_core.types import (
    Constraint,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    Timings,
    Usage,
)

__all__ = [
    "BatchingConfig",
    "Constraint",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidRequestError",
    "ModelInfo",
    "QueueFullError",
    "SamplingParams",
    "Timings",
    "TorchEngine",
    "Usage",
    "default_model_path",
]


def __getattr__(name: str) -> Any:
    if name == "BatchingConfig":
        from inference_core.continuous import BatchingConfig

        return BatchingConfig
    if name == "TorchEngine":
        from inference_core.torch_engine import TorchEngine

        return TorchEngine
    if name == "default_model_path":
        from inference_core.model_loading import default_model_path

        return default_model_path
    raise AttributeError(f"module 'inference_core' has no attribute {name!r}")

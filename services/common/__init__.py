"""What every MeshPilot service shares: typed config, error mapping, server bootstrap and client channels."""

from services.common.clients import create_channel, rpc_error_to_mesh_error
from services.common.config import (
    ConfigError,
    InferenceConfig,
    KnowledgeConfig,
    MeshConfig,
    PlannerConfig,
    ServerConfig,
    ToolsConfig,
    load_config,
)
from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.server import MeshServer, serve

__all__ = [
    "ConfigError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceConfig",
    "InvalidArgumentError",
    "KnowledgeConfig",
    "MeshConfig",
    "MeshError",
    "MeshServer",
    "NotFoundError",
    "PlannerConfig",
    "ResourceExhaustedError",
    "ServerConfig",
    "ToolsConfig",
    "UnavailableError",
    "create_channel",
    "load_config",
    "rpc_error_to_mesh_error",
    "serve",
]

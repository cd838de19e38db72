"""What every MeshPilot service shares: typed config, error mapping, server bootstrap and client channels."""

from services.common.clients import create_channel, rpc_error_to_mesh_error
from services.common.config import (
    ApprovalConfig,
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
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.server import MeshServer, serve

__all__ = [
    "AlreadyExistsError",
    "ApprovalConfig",
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
    "OutOfRangeError",
    "PermissionDeniedError",
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

"""The tools service: a registry of JSON-Schema-described tools (calculator, time, knowledge graph, notes) behind gRPC,
with approval checks and idempotency keys."""

from services.tools.builtin import KnowledgeClient, builtin_tools
from services.tools.executor import Execution, ToolCall, ToolExecutor
from services.tools.idempotency import OutcomeStore
from services.tools.registry import (
    Tool,
    ToolCallError,
    ToolDefinitionError,
    ToolErrorKind,
    ToolFailure,
    ToolOutcome,
    ToolRegistry,
)
from services.tools.server import (
    SERVICE_NAME,
    ToolsService,
    create_executor,
    create_server,
    default_registry,
    main,
)
from services.tools.servicer import ToolsServicer

__all__ = [
    "SERVICE_NAME",
    "Execution",
    "KnowledgeClient",
    "OutcomeStore",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolDefinitionError",
    "ToolErrorKind",
    "ToolExecutor",
    "ToolFailure",
    "ToolOutcome",
    "ToolRegistry",
    "ToolsService",
    "ToolsServicer",
    "builtin_tools",
    "create_executor",
    "create_server",
    "default_registry",
    "main",
]

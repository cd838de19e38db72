"""The tools service: a registry of JSON-Schema-described tools (calculator, time, knowledge graph) behind gRPC."""

from services.tools.builtin import KnowledgeClient, builtin_tools
from services.tools.registry import (
    Tool,
    ToolCallError,
    ToolDefinitionError,
    ToolErrorKind,
    ToolFailure,
    ToolOutcome,
    ToolRegistry,
)
from services.tools.server import SERVICE_NAME, create_server, default_registry, main
from services.tools.servicer import ToolsServicer

__all__ = [
    "SERVICE_NAME",
    "KnowledgeClient",
    "Tool",
    "ToolCallError",
    "ToolDefinitionError",
    "ToolErrorKind",
    "ToolFailure",
    "ToolOutcome",
    "ToolRegistry",
    "ToolsServicer",
    "builtin_tools",
    "create_server",
    "default_registry",
    "main",
]

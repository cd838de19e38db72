"""The planner service: sessions, runs and the agent loop that answers a task with the model and the tools."""

from services.planner.agent import AgentLoop, LLMClient, ToolClient
from services.planner.clients import InferenceLLMClient, ToolsServiceClient
from services.planner.server import PlannerServicer, create_server, main
from services.planner.store import RunState, RunStore
from services.planner.types import Budget, Generation, Timings, ToolOutcome, ToolSpec, Turn, Usage

__all__ = [
    "AgentLoop",
    "Budget",
    "Generation",
    "InferenceLLMClient",
    "LLMClient",
    "PlannerServicer",
    "RunState",
    "RunStore",
    "Timings",
    "ToolClient",
    "ToolOutcome",
    "ToolSpec",
    "ToolsServiceClient",
    "Turn",
    "Usage",
    "create_server",
    "main",
]

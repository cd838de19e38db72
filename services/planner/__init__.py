"""The planner service: agents as data, durable runs driven by swappable policies, approvals and resumable streams."""

from services.planner.agents import Agent, AgentCatalog, AgentDefinition
from services.planner.clients import InferenceLLMClient, ToolsServiceClient
from services.planner.executor import ExecutorDeps, LLMClient, RunExecutor, ToolClient
from services.planner.policies import POLICIES, Policy
from services.planner.runs import RunManager
from services.planner.server import AgentServicer, PlannerServicer, create_server, main
from services.planner.state import RunSnapshot
from services.planner.store import RunState, RunStore
from services.planner.types import Budget, Generation, Sampling, Timings, ToolOutcome, ToolSpec, Turn, Usage

__all__ = [
    "POLICIES",
    "Agent",
    "AgentCatalog",
    "AgentDefinition",
    "AgentServicer",
    "Budget",
    "ExecutorDeps",
    "Generation",
    "InferenceLLMClient",
    "LLMClient",
    "PlannerServicer",
    "Policy",
    "RunExecutor",
    "RunManager",
    "RunSnapshot",
    "RunState",
    "RunStore",
    "Sampling",
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

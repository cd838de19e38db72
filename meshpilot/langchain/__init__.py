"""LangChain components over the mesh: a chat model, the tools service's tools, and agents as runnables."""

from meshpilot.langchain._agent import AgentRunError, MeshPilotAgent
from meshpilot.langchain._chat_model import ChatMeshPilot
from meshpilot.langchain._connection import AuthenticationError
from meshpilot.langchain._tools import ToolApprovalRequiredError, ameshpilot_tools, meshpilot_tools

__all__ = [
    "AgentRunError",
    "AuthenticationError",
    "ChatMeshPilot",
    "MeshPilotAgent",
    "ToolApprovalRequiredError",
    "ameshpilot_tools",
    "meshpilot_tools",
]

"""The A2A v1.0 gRPC binding of the planner: tasks are runs, contexts are sessions, skills are agents."""

from services.planner.a2a.card import agent_card
from services.planner.a2a.convert import Decision, decision_of, message_text, run_to_task, stream_responses
from services.planner.a2a.errors import a2a_errors, protocol_error, rich_status
from services.planner.a2a.servicer import SERVICE_NAME, A2AServicer

__all__ = [
    "SERVICE_NAME",
    "A2AServicer",
    "Decision",
    "a2a_errors",
    "agent_card",
    "decision_of",
    "message_text",
    "protocol_error",
    "rich_status",
    "run_to_task",
    "stream_responses",
]

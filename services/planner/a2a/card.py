"""The A2A agent card of a planner: its agents as skills, its gRPC interface, its security scheme."""

from __future__ import annotations

from importlib import metadata

from a2a.types import a2a_pb2

from services.planner.a2a.convert import INPUT_MODES, OUTPUT_MODES
from services.planner.agents import Agent

PROTOCOL_VERSION = "1.0"
BEARER_SCHEME = "bearer"
# A skill's description is the first line of its agent's instructions, cut here: a card lists, it does not document.
MAX_SKILL_DESCRIPTION_CHARS = 300


def _version() -> str:
    try:
        return metadata.version("meshpilot")
    except metadata.PackageNotFoundError:
        return "0"


def agent_skill(agent: Agent) -> a2a_pb2.AgentSkill:
    """An agent as a skill: its name is the skill id a message names in metadata.agent."""
    definition = agent.definition
    first_line = definition.instructions.strip().splitlines()[0] if definition.instructions.strip() else ""
    return a2a_pb2.AgentSkill(
        id=agent.name,
        name=agent.name,
        description=first_line[:MAX_SKILL_DESCRIPTION_CHARS] or f"the {agent.name} agent",
        tags=[f"policy:{definition.policy}", f"version:{agent.version}", *(f"tool:{t}" for t in definition.tools)],
        examples=[example.task for example in definition.examples],
        input_modes=list(INPUT_MODES),
        output_modes=list(OUTPUT_MODES),
    )


def agent_card(agents: list[Agent], *, url: str, authenticated: bool) -> a2a_pb2.AgentCard:
    """The card of a planner reached at ``url`` (a gRPC target) whose tenant has ``agents``; with ``authenticated``,
    callers send 'authorization: Bearer <API key or JWT>' (an HTTP bearer scheme named "bearer")."""
    card = a2a_pb2.AgentCard(
        name="MeshPilot",
        description=(
            "MeshPilot agents over A2A: a message starts a task (a run of the agent named in the message's "
            "metadata.agent, the built-in 'default' agent when none is named); a tool call that needs a human makes "
            "the task input-required until a message on it says approve or reject."
        ),
        supported_interfaces=[
            a2a_pb2.AgentInterface(url=url, protocol_binding="GRPC", protocol_version=PROTOCOL_VERSION)
        ],
        version=_version(),
        capabilities=a2a_pb2.AgentCapabilities(streaming=True, push_notifications=False, extended_agent_card=True),
        default_input_modes=list(INPUT_MODES),
        default_output_modes=list(OUTPUT_MODES),
        skills=[agent_skill(agent) for agent in agents],
    )
    if authenticated:
        card.security_schemes[BEARER_SCHEME].CopyFrom(
            a2a_pb2.SecurityScheme(
                http_auth_security_scheme=a2a_pb2.HTTPAuthSecurityScheme(
                    scheme="Bearer", description="A MeshPilot API key (mpk_...) or a JWT the mesh accepts"
                )
            )
        )
        card.security_requirements.append(a2a_pb2.SecurityRequirement(schemes={BEARER_SCHEME: a2a_pb2.StringList()}))
    return card

"""Agent policies by name: a new strategy is a new Policy subclass registered here, never a branch in the executor."""

from services.planner.policies.base import (
    Answer,
    CallTools,
    Context,
    Decision,
    ModelRequest,
    NewPlan,
    Note,
    Policy,
    PolicyOptions,
)
from services.planner.policies.guided import GuidedPolicy
from services.planner.policies.plan_execute import PlanExecutePolicy
from services.planner.policies.react import ReActPolicy

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (GuidedPolicy, ReActPolicy, PlanExecutePolicy)}

__all__ = [
    "POLICIES",
    "Answer",
    "CallTools",
    "Context",
    "Decision",
    "GuidedPolicy",
    "ModelRequest",
    "NewPlan",
    "Note",
    "PlanExecutePolicy",
    "Policy",
    "PolicyOptions",
    "ReActPolicy",
]

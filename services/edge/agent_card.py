"""The A2A agent card over HTTP (``/.well-known/agent-card.json``): the planner's agents as the skills of one agent."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()

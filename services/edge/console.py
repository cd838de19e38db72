"""The web console: agents, runs, a run's live timeline with approvals, and the mesh's health."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()

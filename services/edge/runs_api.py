"""Agent runs over HTTP: start a run and follow its events as server-sent events, list and read runs, approve or
reject a waiting tool call. Every call goes to the planner with the caller's credentials."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()

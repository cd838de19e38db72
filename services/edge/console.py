"""The web console: agents, runs, a run's live timeline with approvals, and the mesh's health, as static files that
call the edge's /v1 endpoints from the browser (no build step, nothing loaded from elsewhere)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from services.edge.errors import OpenAIError

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).parent / "console"
# Only these files are served: a name from the URL never becomes a path of its own.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page runs only its own script and style and talks only to this edge: text from a run (a tool's result, the
# model's output) cannot load or run anything even if it were ever rendered as markup.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console")
async def console_without_slash() -> Response:
    # The page's files are named relative to it, so it must be read as the directory /console/.
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/")
async def index() -> Response:
    return _file("index.html")


@router.get("/console/{name}")
async def static_file(name: str) -> Response:
    return _file(name)


def _file(name: str) -> Response:
    if name not in FILES:
        raise OpenAIError(404, f"the console has no file {name[:64]!r}; open /console/", code="not_found")
    return FileResponse(STATIC_DIR / name, media_type=FILES[name], headers=HEADERS)

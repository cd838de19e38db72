"""The HTTP edge: an OpenAI-compatible API over the inference service, agent runs as server-sent events, and the web
console, in one process behind the mesh's authentication."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.config import MeshConfig


async def main(config: MeshConfig) -> None:
    """Serves the edge until SIGTERM (what `meshpilot serve edge` runs); see services.edge.server."""
    # Imported here, not at the top: the routers' modules import services.edge.deps and .errors, and the package must
    # not pull the app (which imports those routers) in while one of them is being imported.
    from services.edge.server import main as serve_edge

    await serve_edge(config)

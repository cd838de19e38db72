"""The `meshpilot` command line: a face over the mesh, imported by nothing."""

from meshpilot.cli.main import app

__all__ = ["app"]

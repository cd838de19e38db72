"""`python -m meshpilot` runs the command line."""

from meshpilot.cli import app

app()

"""Commands: `up` (the whole mesh), `serve` (one service), `ask` (run a task through the planner)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from meshpilot.cli.ask import AskError, run_ask
from meshpilot.cli.mesh import SERVICES, run_mesh
from services.triton.cli import triton_app, trtllm_app

app = typer.Typer(
    help="MeshPilot: a gRPC mesh of planner, tools, knowledge and inference services.", no_args_is_help=True
)

app.add_typer(triton_app, name="triton", help="Triton model repositories: write one, or serve the CPU twin.")
app.add_typer(trtllm_app, name="trtllm", help="Build TensorRT-LLM engines (needs the trtllm extra and a GPU).")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $MESHPILOT_CONFIG or built-in defaults)."),
]


def _load(config_path: Path | None):  # -> MeshConfig; imported lazily so `ask` stays light
    from services.common import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    config: ConfigOption = None,
) -> None:
    """Run one service in the foreground until SIGTERM/Ctrl-C (what a container runs)."""
    if service not in SERVICES:
        typer.echo(f"error: unknown service '{service}'; choose one of: {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module = importlib.import_module(f"services.{service}")
    asyncio.run(module.main(cfg))


@app.command()
def up(
    config: ConfigOption = None,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every service to report SERVING.")
    ] = 600.0,
) -> None:
    """Start the four services as local processes, wait until they are healthy, and stop them on Ctrl-C/SIGTERM."""
    cfg = _load(config)
    code = asyncio.run(run_mesh(cfg, config, startup_timeout=startup_timeout))
    raise typer.Exit(code)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The task, e.g. 'What is the capital of France?'.")],
    planner: Annotated[str | None, typer.Option(help="Planner address HOST:PORT (default from config).")] = None,
    session: Annotated[
        str | None, typer.Option(help="Continue this session (its id is printed after each run).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    max_steps: Annotated[int, typer.Option(help="Step budget; 0 uses the planner's default.")] = 0,
    timeout: Annotated[
        float, typer.Option(help="Seconds before the run is abandoned; 0 uses the planner's default.")
    ] = 0,
    config: ConfigOption = None,
) -> None:
    """Run QUESTION through the planner and stream its steps; the answer is printed last."""
    target = planner or _load(config).planner.server.target()
    try:
        asyncio.run(
            run_ask(
                question, target=target, session_id=session, as_json=json_output, max_steps=max_steps, timeout=timeout
            )
        )
    except AskError as e:
        raise typer.Exit(1) from e

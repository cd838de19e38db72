"""Commands: `up` (the whole mesh), `serve` (one service), `ask` (run a task), `agents`, `runs`, `approve`, `reject`,
`tools`, `keys`, `certs`, `eval`, `train`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from typing import Annotated

import typer

from meshpilot.cli.agents import agents_app
from meshpilot.cli.ask import AskError, run_ask
from meshpilot.cli.certs import certs_app
from meshpilot.cli.eval import eval_suite
from meshpilot.cli.keys import keys_app
from meshpilot.cli.mesh import SERVICES, run_mesh
from meshpilot.cli.options import CREDENTIALS, ConfigOption, PlannerOption, load_config, planner_target
from meshpilot.cli.runs import approve, reject, runs_app
from meshpilot.cli.tools import tools_app
from meshpilot.cli.train import train
from services.common import tracing
from services.common.config import ConfigError
from services.triton.cli import triton_app, trtllm_app

app = typer.Typer(
    help="MeshPilot: a gRPC mesh of planner, tools, knowledge and inference services.", no_args_is_help=True
)


@app.callback()
def _options(
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MESHPILOT_API_KEY",
            help="The planner's API key (`meshpilot keys create`), when its authentication is on.",
            show_envvar=True,
        ),
    ] = None,
) -> None:
    CREDENTIALS.api_key = api_key


app.add_typer(triton_app, name="triton", help="Triton model repositories: write one, or serve the CPU twin.")
app.add_typer(trtllm_app, name="trtllm", help="Build TensorRT-LLM engines (needs the trtllm extra and a GPU).")
app.add_typer(agents_app, name="agents")
app.add_typer(runs_app, name="runs")
app.add_typer(tools_app, name="tools")
app.add_typer(keys_app, name="keys")
app.add_typer(certs_app, name="certs")


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    config: ConfigOption = None,
) -> None:
    """Run one service in the foreground until SIGTERM/Ctrl-C (what a container runs)."""
    if service not in SERVICES:
        typer.echo(f"error: unknown service '{service}'; choose one of: {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    cfg = load_config(config)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module = importlib.import_module(f"services.{service}")
    try:
        tracing.configure(service)  # before the service builds its server and channels; off unless OTEL_* ask
        asyncio.run(module.main(cfg))
    except ConfigError as e:  # found at start (a store that does not connect, a file that cannot be read)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def up(
    config: ConfigOption = None,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every service to report SERVING.")
    ] = 600.0,
) -> None:
    """Start the four services as local processes, wait until they are healthy, and stop them on Ctrl-C/SIGTERM."""
    cfg = load_config(config)
    code = asyncio.run(run_mesh(cfg, config, startup_timeout=startup_timeout))
    raise typer.Exit(code)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The task, e.g. 'What is the capital of France?'.")],
    planner: PlannerOption = None,
    agent: Annotated[
        str | None, typer.Option(help="Run this agent (`meshpilot agents list`); default: the built-in one.")
    ] = None,
    agent_version: Annotated[int, typer.Option(min=0, help="The agent's version; 0 runs its latest.")] = 0,
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
    target = planner_target(planner, config)
    try:
        asyncio.run(
            run_ask(
                question,
                target=target,
                session_id=session,
                as_json=json_output,
                max_steps=max_steps,
                timeout=timeout,
                agent=agent or "",
                agent_version=agent_version,
                planner_flag=planner,
            )
        )
    except AskError as e:
        raise typer.Exit(1) from e


app.command()(approve)
app.command()(reject)
app.command("eval")(eval_suite)
app.command("train")(train)

"""`meshpilot eval SUITE`: run a suite's tasks through the planner with one or more agents, side by side, and write
the report (JSON, markdown, PNG) under the data directory; a re-run resumes where the last one stopped."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from meshpilot.cli.options import (
    CREDENTIALS,
    ConfigOption,
    JsonOption,
    PlannerOption,
    call_service,
    connect_ray,
    fail,
    load_config,
    planner_target,
)
from meshpilot.planner.v1 import planner_pb2_grpc
from services.eval.bfcl import prepare_bfcl
from services.eval.report import Report, render_markdown, summarize, write_reports
from services.eval.runner import (
    DEFAULT_TASK_TIMEOUT_S,
    AgentRunner,
    EvalProgress,
    PlannerAccess,
    PlannerRunner,
    evaluate,
)
from services.eval.suite import SPLITS, Suite, SuiteError, load_suite, shipped_suites
from services.eval.variants import agent_on_model, suite_on_model, variant_name

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


def _label(agent: str) -> str:
    """The agent's name as a file name ("" is the built-in default agent)."""
    return _LABEL.sub("_", agent or "default")[:100]


def eval_suite(
    suite: Annotated[
        str, typer.Argument(help=f"A JSONL suite file, or a shipped suite: {', '.join(shipped_suites()) or 'none'}.")
    ],
    agent: Annotated[
        list[str] | None,
        typer.Option("--agent", help="An agent to evaluate (repeat to compare side by side); default: the built-in."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Run each agent on this model instead (repeat to compare models; an agent <agent>-on-<model> is kept).",
        ),
    ] = None,
    builtin_examples: Annotated[
        bool | None,
        typer.Option(
            "--builtin-examples/--no-builtin-examples",
            help="With --model: the planner's built-in worked examples in the prompt, or not (a model trained with "
            "--lean-prompt reads none); default: as each agent says.",
        ),
    ] = None,
    category: Annotated[list[str] | None, typer.Option("--category", help="Only this category (repeatable).")] = None,
    split: Annotated[
        str, typer.Option(help="Only the tasks of this split: train or test (the held-out tasks); default: all.")
    ] = "",
    limit: Annotated[
        int, typer.Option(min=0, help="At most this many tasks per category (a fixed sample); 0: all.")
    ] = 0,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Runs in flight at once, per agent.")] = 2,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds a run may take before it counts as failed.")
    ] = DEFAULT_TASK_TIMEOUT_S,
    out: Annotated[
        Path | None, typer.Option(help="Where results and reports go; default <data_dir>/eval/<suite>.")
    ] = None,
    restart: Annotated[bool, typer.Option(help="Forget earlier results of these agents and run every task.")] = False,
    ray: Annotated[
        str, typer.Option(help="A Ray cluster (the head's HOST:PORT): the runs are made by Ray tasks on its nodes.")
    ] = "",
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Evaluate agents on SUITE: task completion, valid tool calls, steps, tokens and latency, per category."""
    if split and split not in SPLITS:
        fail(f"--split {split[:40]!r}: use one of {', '.join(SPLITS)}", 2)
    try:
        chosen = load_suite(suite).select(split=split, categories=category or (), limit=limit)
    except SuiteError as e:
        fail(str(e), 2)
    if not chosen.tasks:
        where = [f"the categories {', '.join(category)}"] if category else []
        where += [f"the {split} split"] if split else []
        fail(f"suite {chosen.name!r} has no tasks" + (f" in {' and '.join(where)}" if where else ""), 2)
    bases = list(dict.fromkeys(agent or [""]))
    models = list(dict.fromkeys(model or []))
    if builtin_examples is not None and not models:
        fail(
            "--builtin-examples/--no-builtin-examples goes with --model (it sets the prompt of the agents it makes)", 2
        )
    agents = [variant_name(a, m) for a in bases for m in models] if models else bases
    models_of = {variant_name(a, m): m for a in bases for m in models}
    folder = out or load_config(config).data_dir / "eval" / chosen.name
    target = planner_target(planner, config)
    results_paths = {name: folder / f"{_label(name)}.results.jsonl" for name in agents}
    if restart:
        for path in results_paths.values():
            path.unlink(missing_ok=True)
    notices = Console(stderr=True)
    if ray:
        connect_ray(ray)

    async def run(channel: grpc.aio.Channel) -> list[Report]:
        for base in bases:
            for name in models:
                await agent_on_model(channel, base, name, builtin_examples=builtin_examples)

        async def on_model(suite: Suite, agent: str) -> Suite:
            if agent not in models_of:
                return suite
            return await suite_on_model(channel, suite, models_of[agent], builtin_examples=builtin_examples)

        runner: AgentRunner = PlannerRunner(planner_pb2_grpc.PlannerServiceStub(channel))
        if ray:
            from services.eval.ray_runner import RayRunner

            runner = RayRunner(PlannerAccess(target, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls))
        return await _evaluate_all(
            channel,
            runner,
            chosen,
            agents,
            results_paths,
            notices,
            concurrency=concurrency,
            timeout_s=timeout,
            on_model=on_model,
        )

    reports = call_service(target, run)
    paths = write_reports(reports, folder)
    if json_output:
        typer.echo(json.dumps([r.to_json() for r in reports], ensure_ascii=False))
    else:
        Console(soft_wrap=True).print(render_markdown(reports), highlight=False, markup=False)
        notices.print(f"reports: {paths['json']}, {paths['markdown']}, {paths['chart']}", highlight=False)
    missing = [r.agent or "default" for r in reports if r.overall.tasks < len(chosen.tasks)]
    if missing:
        fail(f"some tasks could not be run for {', '.join(missing)} (planner unavailable); run again to resume", 1)


async def _evaluate_all(
    channel: grpc.aio.Channel,
    runner: AgentRunner,
    suite: Suite,
    agents: list[str],
    results_paths: dict[str, Path],
    console: Console,
    *,
    concurrency: int,
    timeout_s: float,
    on_model: Callable[[Suite, str], Awaitable[Suite]],
) -> list[Report]:
    """Each agent over ``suite``; ``on_model(suite, agent)`` is the suite as that agent runs it (the tasks that run as
    their own agent run as its variant on the agent's model)."""
    if suite.path is not None and any("tool" in task.meta for task in suite.tasks):
        console.print("registering the suite's functions (tool source bfcl) and their agents…", highlight=False)
        await prepare_bfcl(channel, suite, suite.path)
    reports = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[passed]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as progress:
        for agent in agents:
            bar = progress.add_task(agent or "default", total=len(suite.tasks), passed="")

            def show(state: EvalProgress, bar: TaskID = bar) -> None:
                note = f"{state.passed} passed" + (f", {state.unavailable} unavailable" if state.unavailable else "")
                progress.update(bar, completed=state.done, passed=note)

            results = await evaluate(
                await on_model(suite, agent), runner, results_paths[agent], agent=agent, concurrency=concurrency, timeout_s=timeout_s,
                on_progress=show,
            )  # fmt: skip
            reports.append(summarize(suite.name, agent or "default", results.values()))
    return reports

"""`meshpilot train`: the learning loop (rollouts through the mesh, reward filtering, fine-tuning, registration,
evaluation), round by round, under the data directory; a re-run resumes where the last one stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshpilot.cli.options import (
    CREDENTIALS,
    ConfigOption,
    JsonOption,
    PlannerOption,
    connect_ray,
    fail,
    load_config,
    rpc_error_message,
    service_target,
)
from services.train.settings import (
    GGUFType,
    Method,
    Precision,
    TrainSettings,
    TrainSettingsError,
    parse_category_counts,
)

D = TrainSettings()  # the defaults, written once in TrainSettings


class RichProgress:
    """A rich progress bar per phase, on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.bars = progress

    def start(self, description: str, total: int) -> Callable[[int, str], None]:
        bar = self.bars.add_task(description, total=total or None, note="")

        def update(done: int, note: str) -> None:
            self.bars.update(bar, completed=done, note=note)

        return update


def train(
    name: Annotated[str, typer.Option(help="The job: <data_dir>/train/NAME, models NAME-r1, NAME-r2 ...")] = D.name,
    suite: Annotated[
        list[str] | None,
        typer.Option(
            "--suite",
            help=f"Training tasks: this suite's train split (repeatable: one model for all; default {D.suite[0]}).",
        ),
    ] = None,
    eval_suite: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-suite",
            help=f"Each round is scored on this suite's test split (repeatable: a report each; default "
            f"{D.eval_suite[0]}).",
        ),
    ] = None,
    category: Annotated[list[str] | None, typer.Option("--category", help="Only this category (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="Training tasks per category (0: all).")] = D.limit,
    eval_limit: Annotated[int, typer.Option(help="Test tasks per category (0: all).")] = D.eval_limit,
    eval_limit_for: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-limit-for",
            metavar="CATEGORY=N",
            help="N test tasks of this category instead of --eval-limit's (repeatable; 0: all).",
        ),
    ] = None,
    agent: Annotated[str, typer.Option(help="The agent rolled out and trained; default: the built-in.")] = D.agent,
    student: Annotated[
        str, typer.Option(help="A react agent the (guided) rollouts teach, in its own format; it is what is scored.")
    ] = D.student,
    rounds: Annotated[int, typer.Option(help="Rollouts -> training -> evaluation, this many times.")] = D.rounds,
    attempts: Annotated[int, typer.Option(help="Sampled attempts per task (K).")] = D.attempts,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the rollouts.")] = D.temperature,
    seed: Annotated[int, typer.Option(help="Seed of the rollouts (per attempt and round) and of training.")] = D.seed,
    min_reward: Annotated[
        float, typer.Option(help="Train on rollouts with at least this reward (0-1).")
    ] = D.min_reward,
    keep_per_task: Annotated[int, typer.Option(help="Train on a task's best N rollouts.")] = D.keep_per_task,
    demonstrations: Annotated[
        int,
        typer.Option(
            help="Round 1 also learns from the reference solutions of N train tasks per category, each played "
            "against the real tools and kept when the judge passes it (0: none)."
        ),
    ] = D.demonstrations,
    demonstrations_for: Annotated[
        list[str] | None,
        typer.Option(
            "--demonstrations-for",
            metavar="CATEGORY=N",
            help="N demonstrations for this category instead of --demonstrations' (repeatable): more for the shapes "
            "the agent confuses.",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Runs in flight at once.")] = D.concurrency,
    method: Annotated[str, typer.Option(help="bc (behaviour cloning on verified runs) or grpo (TRL).")] = D.method,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters (merged on export), or full.")] = D.lora,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = D.lora_rank,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 mixed precision, or auto: bf16 where the hardware has it natively.")
    ] = D.precision,
    learning_rate: Annotated[float, typer.Option(help="Learning rate.")] = D.learning_rate,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = D.batch_size,
    grad_accumulation: Annotated[int, typer.Option(help="Forward passes per optimizer step.")] = D.grad_accumulation,
    epochs: Annotated[float, typer.Option(help="Passes over a round's examples.")] = D.epochs,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps per round (0: --epochs decides).")] = D.max_steps,
    save_steps: Annotated[int, typer.Option(help="A checkpoint every N optimizer steps.")] = D.save_steps,
    max_length: Annotated[int, typer.Option(help="Leave out examples over this many tokens.")] = D.max_length,
    teacher: Annotated[Path | None, typer.Option(help="Distill from this HF model directory.")] = None,
    kd_alpha: Annotated[float, typer.Option(help="Weight of the soft (teacher) term of the loss.")] = D.kd_alpha,
    kd_temperature: Annotated[float, typer.Option(help="Temperature tau of the soft targets.")] = D.kd_temperature,
    gguf: Annotated[
        str, typer.Option(help="Also write each model as a GGUF for llama.cpp / Ollama: q8_0, f16, f32 or none.")
    ] = D.gguf,
    timeout: Annotated[float, typer.Option(help="Seconds a run may take before it fails.")] = D.timeout_s,
    lean_prompt: Annotated[
        bool,
        typer.Option(
            help="Train the model for prompts without the planner's built-in worked examples (shorter: faster to "
            "train and to serve); its evaluations run without them."
        ),
    ] = D.lean_prompt,
    ray: Annotated[
        str,
        typer.Option(
            help="A Ray cluster (the head's HOST:PORT): runs are made by Ray tasks, training runs under TorchTrainer."
        ),
    ] = D.ray,
    ray_workers: Annotated[int, typer.Option(help="TorchTrainer's CPU workers with --ray.")] = D.ray_workers,
    baseline: Annotated[bool, typer.Option(help="Also score the untrained agent on the test split.")] = True,
    json_output: JsonOption = False,
    planner: PlannerOption = None,
    config: ConfigOption = None,
) -> None:
    """Learn from verified runs: roll the agent out on the train split, fine-tune on its best runs, register the model
    with the inference service and score it on the test split, ROUNDS times."""
    from services.common import ConfigError

    try:
        counts = parse_category_counts("--demonstrations-for", demonstrations_for or [])
        eval_counts = parse_category_counts("--eval-limit-for", eval_limit_for or [])
    except TrainSettingsError as e:
        fail(str(e), 2)
    settings = TrainSettings(
        name=name,
        suite=tuple(suite or D.suite),
        eval_suite=tuple(eval_suite or D.eval_suite),
        categories=tuple(category or ()),
        limit=limit,
        eval_limit=eval_limit,
        eval_limit_for=eval_counts,
        agent=agent,
        student=student,
        rounds=rounds,
        attempts=attempts,
        temperature=temperature,
        seed=seed,
        min_reward=min_reward,
        keep_per_task=keep_per_task,
        demonstrations=demonstrations,
        demonstrations_for=counts,
        concurrency=concurrency,
        method=cast(Method, method),
        lora=lora,
        lora_rank=lora_rank,
        precision=cast(Precision, precision),
        learning_rate=learning_rate,
        batch_size=batch_size,
        grad_accumulation=grad_accumulation,
        epochs=epochs,
        max_steps=max_steps,
        save_steps=save_steps,
        max_length=max_length,
        teacher=teacher,
        kd_alpha=kd_alpha,
        kd_temperature=kd_temperature,
        gguf=cast(GGUFType, gguf),
        timeout_s=timeout,
        lean_prompt=lean_prompt,
        ray=ray,
        ray_workers=ray_workers,
    )  # fmt: skip  (validate() refuses a method, precision or GGUF type outside the Literal, naming the option)
    try:
        settings.validate()
        from services.train.suites import demonstration_tasks, load_suites

        load_suites(settings)
        demonstration_tasks(settings)
    except TrainSettingsError as e:
        fail(str(e), 2)
    cfg = load_config(config)
    planner_at = service_target("planner", planner, config)
    # The demonstrations' tool calls go to the tools service itself (the planner runs no calls but its runs').
    tools_at = service_target("tools", None, config) if settings.demonstrates else ""
    if settings.ray:
        connect_ray(settings.ray)
    notices = Console(stderr=True)
    _say_precision(settings, notices)
    try:
        results = asyncio.run(_run(settings, cfg, planner_at, tools_at, notices, baseline=baseline))
    except KeyboardInterrupt:
        # asyncio.run cancelled the job; a training step under way was finished and checkpointed first
        fail(f"stopped; what job {settings.name!r} finished is kept: run the same command to resume", 130)
    except TrainSettingsError as e:
        fail(str(e), 2)
    except (ConfigError, RuntimeError, ValueError) as e:
        fail(str(e), 1)
    except grpc.aio.AioRpcError as e:
        fail(rpc_error_message(e), 1)
    folder = cfg.data_dir / "train" / settings.name
    if json_output:
        typer.echo(json.dumps([r.to_json() for r in results], ensure_ascii=False))
    else:
        Console(soft_wrap=True).print((folder / "report.md").read_text(encoding="utf-8"), highlight=False, markup=False)
        for result in results:
            demonstrated = result.demonstrations.values()
            shown = (
                f" and {sum(d['kept'] for d in demonstrated)} of {sum(d['tried'] for d in demonstrated)} "
                "demonstrations (verified)"
                if demonstrated
                else ""
            )
            notices.print(
                f"round {result.round}: {result.model} from {result.selected} of {result.rollouts} rollouts "
                f"({result.rollouts_passed} passed){shown}, {result.examples} examples, {result.steps} steps, "
                f"loss {result.loss:.3f}",
                highlight=False,
            )
        notices.print(f"reports: {folder}/report.md, report.json, report.png", highlight=False)


async def _run(settings: Any, cfg: Any, planner_at: str, tools_at: str, console: Console, *, baseline: bool) -> Any:
    from contextlib import AsyncExitStack

    from services.common import create_channel
    from services.planner.clients import ToolsServiceClient
    from services.train.journal import open_journal
    from services.train.loop import TrainJob
    from services.train.rollouts import PlannerToolLister

    journal = open_journal(cfg)
    await journal.open()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"))
    try:
        async with AsyncExitStack() as stack:
            channel = await stack.enter_async_context(
                create_channel(planner_at, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls)
            )
            tool_runner = None
            if tools_at:
                tools_channel = create_channel(
                    tools_at, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls, server="tools"
                )
                tool_runner = ToolsServiceClient(await stack.enter_async_context(tools_channel))
            with Progress(*columns, TimeElapsedColumn(), console=console) as bars:
                job = TrainJob(
                    settings, data_dir=cfg.data_dir, default_model_path=cfg.inference.model_path,
                    default_model_id=cfg.inference.model_id, channel=channel,
                    tools=PlannerToolLister(channel), journal=journal, progress=RichProgress(bars),
                    **_on_cluster(settings, planner_at),
                    tool_runner=tool_runner,
                )  # fmt: skip
                return await job.run(baseline=baseline)
    finally:
        await journal.close()


def _on_cluster(settings: Any, planner_at: str) -> dict[str, Any]:
    """TrainJob's runner and training placement on the Ray cluster of ``settings.ray``; nothing without one (the
    job's defaults: runs on the CLI's channel, training in this process)."""
    if not settings.ray:
        return {}
    import functools

    from services.eval.ray_runner import RayRunner
    from services.eval.runner import PlannerAccess
    from services.train.ray_backend import on_ray_train

    access = PlannerAccess(planner_at, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls)
    return {"runner": RayRunner(access), "training": functools.partial(on_ray_train, workers=settings.ray_workers)}


def _say_precision(settings: Any, notices: Console) -> None:
    """What --precision auto chose here, or a warning for bf16 on hardware that emulates it (many times slower)."""
    if settings.precision == "fp32" or settings.ray:  # under --ray the trainer runs on the cluster's nodes
        return
    from services.train.finetune import native_bf16

    native = native_bf16()
    if settings.precision == "auto":
        chosen = "bf16 mixed precision" if native else "fp32 (no native bf16 here: no AMX or AVX512-BF16)"
        notices.print(f"--precision auto: training in {chosen}", highlight=False)
    elif not native:
        notices.print(
            "warning: --precision bf16 on hardware without native bf16 (no AMX or AVX512-BF16): torch emulates it, "
            "many times slower than fp32; use --precision auto or fp32",
            highlight=False,
        )

"""The learning loop, round by round: rollouts of the train split through the mesh -> reward filtering -> training
examples -> fine-tuning -> export and registration with the inference service -> evaluation on the test split.

Every phase leaves its result under ``<data_dir>/train/<name>/round-<r>/`` (rollouts and evaluation results appended
as they end, checkpoints every N steps, the model renamed into ``<data_dir>/models/<name>-r<r>`` once complete), and
a phase whose result is there is not run again: an interrupted job resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from inference_core.model_loading import resolve_model_path
from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2_grpc
from services.eval.bfcl import has_functions, prepare_bfcl
from services.eval.report import Report, summarize, write_reports
from services.eval.runner import AgentRunner, EvalProgress, PlannerRunner, evaluate
from services.eval.suite import EvalTask, Suite, load_suite
from services.eval.variants import agent_on_model, suite_on_model
from services.inference.models_dir import models_directory
from services.planner.agents import AgentDefinition
from services.planner.convert import definition_from_proto
from services.planner.executor import ToolClient
from services.planner.store import JournalStore
from services.planner.types import ToolSpec
from services.train.demonstrations import (
    Demonstration,
    DemonstrationError,
    Demonstrator,
    ListedTools,
    collect_demonstrations,
    demonstration_counts,
    kept_rollouts,
)
from services.train.examples import (
    Rollout,
    select_rollouts,
    step_examples,
    student_examples,
    tools_from_json,
    tools_to_json,
)
from services.train.finetune import FineTuneResult, TrainingStopped, base_model_dir, export_model, fine_tune
from services.train.gguf_export import export_gguf, gguf_file_name
from services.train.grpo import grpo_tune, reward_function, verified_calls
from services.train.rollouts import (
    RolloutProgress,
    collect_rollouts,
    prepare_rollout_agents,
    prepare_task_rollout_agents,
)
from services.train.settings import TrainSettings, TrainSettingsError
from services.train.suites import demonstration_tasks, load_suites

# Trains from a base model directory into a result: fine_tune or grpo_tune with their examples bound.
Tune = Callable[..., FineTuneResult]
# Where training runs: given a round's Tune and the round's folder, a Tune (same signature) that runs it there.
TrainingPlacement = Callable[[Tune, Path], Tune]


def _kept(demonstrations: dict[str, Demonstration]) -> int:
    return sum(d.kept for d in demonstrations.values())


def in_this_process(tune: Tune, folder: Path) -> Tune:
    """Training here, without a cluster: the Tune itself."""
    return tune


class ToolLister(Protocol):
    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]: ...


class ProgressSink(Protocol):
    """Where a job shows its progress: ``start(description, total)`` returns ``update(done, note)``."""

    def start(self, description: str, total: int) -> Callable[[int, str], None]: ...


class NoProgress:
    def start(self, description: str, total: int) -> Callable[[int, str], None]:
        return lambda done, note: None


@dataclass(frozen=True)
class RoundResult:
    """One round's figures: its rollouts, those trained on, the examples and optimizer steps, and its evaluation
    (``reports``: one per --eval-suite, in their order); ``demonstrations``: per category, the verified
    demonstrations kept of those tried (round 1, --demonstrations)."""

    round: int
    model: str
    rollouts: int
    rollouts_passed: int
    selected: int
    examples: int
    steps: int
    loss: float
    reports: tuple[Report, ...]
    demonstrations: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def report(self) -> Report:
        """The evaluation on the first --eval-suite."""
        return self.reports[0]

    def to_json(self) -> dict[str, object]:
        """The figures; ``eval``: the first --eval-suite's report, ``evals``: every suite's, by name."""
        figures = {k: v for k, v in self.__dict__.items() if k != "reports"}
        evals = {report.suite: report.to_json() for report in self.reports}
        return {**figures, "eval": self.report.to_json(), "evals": evals}


class TrainJob:
    """Runs ``settings`` against a mesh: ``channel`` to the planner (runs, agents), ``tools`` (the listing that
    prompts were built from), ``journal`` (the planner's, for the runs' snapshots and model outputs), ``tool_runner``
    (the tools service, which runs the demonstrations' calls; needed with --demonstrations only)."""

    def __init__(
        self,
        settings: TrainSettings,
        *,
        data_dir: Path,
        default_model_path: str,
        default_model_id: str,
        channel: grpc.aio.Channel,
        tools: ToolLister,
        journal: JournalStore,
        progress: ProgressSink | None = None,
        runner: AgentRunner | None = None,  # makes the rollouts' and evaluations' runs; default: Run on ``channel``
        training: TrainingPlacement = in_this_process,
        tool_runner: ToolClient | None = None,
    ) -> None:
        self.settings = settings.validate()
        self.train_suites, self.test_suites = load_suites(settings)
        self.train_tasks = [task for suite in self.train_suites for task in suite.tasks]
        if settings.demonstrates and tool_runner is None:
            raise ValueError("--demonstrations needs a tool_runner: the tools service runs the solutions' calls")
        self.tool_runner = tool_runner
        self.demonstration_tasks = demonstration_tasks(settings)
        self.folder = data_dir / "train" / settings.name
        self.models = models_directory(data_dir)
        self.base_cache = data_dir / "train" / "base"
        self.default_model_path, self.default_model_id = default_model_path, default_model_id
        self.channel, self.tools, self.journal = channel, tools, journal
        self.runner = runner or PlannerRunner(planner_pb2_grpc.PlannerServiceStub(channel))
        self.training = training
        self.progress = progress or NoProgress()
        self.student: AgentDefinition | None = None
        self._task_agents: dict[str, agents_pb2.Agent] = {}  # the tasks' own agents, by name (run() looks them up)
        self.evaluated = settings.student or settings.agent

    async def run(self, *, baseline: bool = True) -> list[RoundResult]:
        """Every round (those done already are read back); the report across rounds is written to the job's folder
        (``report.json``, ``report.md``, ``report.png``): the baseline agent first when ``baseline``."""
        self._registered_model_dir(await self._agent_model())  # before any work: a model this job cannot train
        if self.settings.student:
            self.student = await self._student()  # react: its prompt never had the built-in examples
        await self._prepare_task_agents()
        reports = list(await self.evaluate(0, self.evaluated)) if baseline else []
        results = []
        for number in range(1, self.settings.rounds + 1):
            result = await self.round(number)
            results.append(result)
            reports.extend(result.reports)
        write_reports(reports, self.folder)
        (self.folder / "rounds.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
        return results

    async def round(self, number: int) -> RoundResult:
        settings = self.settings
        folder = self.folder / f"round-{number}"
        model_in = settings.model_id(number - 1) if number > 1 else await self._agent_model()
        # With --lean-prompt, a model this job trained reads prompts without the built-in examples.
        lean = self._lean if number > 1 else None
        agents = await prepare_rollout_agents(
            self.channel, base=settings.agent, model=model_in, job=settings.name, attempts=settings.attempts,
            temperature=settings.temperature, seed=settings.seed + 1000 * number, builtin_examples=lean,
        )  # fmt: skip
        task_agents = await prepare_task_rollout_agents(
            self.channel, self.train_tasks, model=model_in, job=settings.name, attempts=settings.attempts,
            temperature=settings.temperature, seed=settings.seed + 1000 * number, builtin_examples=lean,
        )  # fmt: skip
        tools = await self._tools(folder / "tools.json")
        update = self.progress.start(f"round {number}: rollouts", len(self.train_tasks) * settings.attempts)

        def show(state: RolloutProgress) -> None:
            update(
                state.done,
                f"{state.passed} passed" + (f", {state.unavailable} unavailable" if state.unavailable else ""),
            )

        rollouts = await collect_rollouts(
            self.train_tasks, agents, self.runner, self.journal, folder / "rollouts.jsonl",
            concurrency=settings.concurrency, timeout_s=settings.timeout_s, on_progress=show, task_agents=task_agents,
        )  # fmt: skip
        if len(rollouts) < len(self.train_tasks) * settings.attempts:
            raise RuntimeError("some rollouts could not be run (planner unavailable); run the command again to resume")
        selected = select_rollouts(rollouts, min_reward=settings.min_reward, keep_per_task=settings.keep_per_task)
        demonstrations = await self._demonstrations(number, folder, tools)
        # Kept demonstrations are verified runs like the selected rollouts: learned from alike.
        demonstrated = kept_rollouts(demonstrations)
        learned: list[Rollout] = [*selected, *demonstrated]
        if settings.method == "grpo":  # every rollout's prompts: GRPO learns from its own samples, good and bad
            everything = [*rollouts, *demonstrated]
            examples = [
                example
                for rollout in everything
                if rollout.snapshot
                for example in step_examples(rollout, tools, builtin_examples=self._lean)
            ]
            tasks = {task.id: task for task in (*self.train_tasks, *self.demonstration_tasks)}
            reward = reward_function(tasks, verified_calls(everything, settings.min_reward), tools)
            tune = functools.partial(grpo_tune, examples, reward)
        else:
            examples = [
                example
                for rollout in learned
                for example in (
                    student_examples(rollout, tools, self.student)
                    if self.student
                    else step_examples(rollout, tools, builtin_examples=self._lean)
                )
            ]
            tune = functools.partial(fine_tune, examples)
        (folder / "examples.jsonl").write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")
        model_id = settings.model_id(number)
        steps, loss = await self._train(number, model_in, self.training(tune, folder), folder)
        reports = await self.evaluate(number, self.evaluated, model_id)
        result = RoundResult(
            number, model_id, len(rollouts), sum(r.passed for r in rollouts), len(selected), len(examples), steps,
            loss, reports, demonstration_counts(demonstrations),
        )  # fmt: skip
        (folder / "round.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
        return result

    async def _demonstrations(self, number: int, folder: Path, tools: list[ToolSpec]) -> list[Demonstration]:
        """Round 1's verified demonstrations (--demonstrations): each chosen task's reference solution played as the
        agent its rollouts run as (the task's own agent, else the rolled-out one), with the round's tools listing,
        against the tools service; kept in demonstrations.jsonl (a resumed round plays only those not there)."""
        if number != 1 or not self.demonstration_tasks:
            return []
        assert self.tool_runner is not None  # checked when the job was made
        by_agent: dict[str, list[EvalTask]] = {}
        for task in self.demonstration_tasks:
            by_agent.setdefault(task.agent, []).append(task)
        update = self.progress.start(f"round {number}: demonstrations", len(self.demonstration_tasks))
        played: dict[str, Demonstration] = {}
        for agent, tasks in by_agent.items():
            runs_as = (
                self._task_agents[agent] if agent else await self._agent("--agent", self.settings.agent or "default")
            )
            definition = definition_from_proto(runs_as.spec)
            label = f"train-{self.settings.name}-demo" + (f"-{agent}" if agent else "")
            try:
                demonstrator = Demonstrator(
                    definition, ListedTools(tools, self.tool_runner), agent=label[:63],
                    timeout_s=self.settings.timeout_s,
                )  # fmt: skip
            except DemonstrationError as e:
                raise TrainSettingsError(f"--demonstrations: {e}") from None

            def show(done: int, kept: int, before: int = len(played), verified: int = _kept(played)) -> None:
                update(before + done, f"{verified + kept} verified")

            async with demonstrator:
                for demonstration in await collect_demonstrations(
                    tasks, demonstrator, folder / "demonstrations.jsonl", on_progress=show
                ):
                    played[demonstration.task_id] = demonstration
        return [played[task.id] for task in self.demonstration_tasks]

    async def _prepare_task_agents(self) -> None:
        """The suites' own task agents, for the tasks this job runs or demonstrates: a BFCL suite's functions
        registered as the tool source ``bfcl`` and its tasks' agents made (``prepare_bfcl``); then every task agent
        looked up (kept for the demonstrations). TrainSettingsError naming the option and the suite when a task's
        agent does not exist."""
        for option, names, split, tasks in (
            ("--suite", self.settings.suite, "train", [*self.train_tasks, *self.demonstration_tasks]),
            ("--eval-suite", self.settings.eval_suite, "test", [task for s in self.test_suites for task in s.tasks]),
        ):
            wanted = {task.id for task in tasks if task.agent}
            for name in names:
                suite = load_suite(name)
                own = Suite(
                    suite.name, tuple(t for t in suite.tasks if t.split == split and t.id in wanted), suite.path
                )
                if suite.path is not None and has_functions(own):
                    await prepare_bfcl(self.channel, own, suite.path)
                for task in own.tasks:
                    if task.agent not in self._task_agents:
                        self._task_agents[task.agent] = await self._agent(
                            f"{option} {name!r}: task {task.id} runs as", task.agent
                        )

    @property
    def _lean(self) -> bool | None:
        """What the trained models' agents say of the built-in examples: off with --lean-prompt, else as the agent."""
        return False if self.settings.lean_prompt else None

    async def _agent_model(self) -> str:
        return (await self._agent("--agent", self.settings.agent or "default")).spec.model

    async def _student(self) -> AgentDefinition:
        agent = await self._agent("--student", self.settings.student)
        definition = definition_from_proto(agent.spec)
        if definition.policy != "react":
            raise TrainSettingsError(
                f"--student {self.settings.student!r} runs the {definition.policy} policy; give a react agent"
            )
        return definition

    async def _agent(self, option: str, name: str) -> agents_pb2.Agent:
        """The caller's agent ``name``; TrainSettingsError naming ``option`` when there is none."""
        stub = agents_pb2_grpc.AgentServiceStub(self.channel)
        try:
            return await stub.GetAgent(agents_pb2.GetAgentRequest(name=name), timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise TrainSettingsError(f"{option} {name!r}: no such agent (see meshpilot agents list)") from None

    def _registered_model_dir(self, model: str) -> Path | None:
        """The directory of ``model`` when it is a registered model, None for the inference service's default model;
        TrainSettingsError for any other (its weights are not here)."""
        if not model or model == self.default_model_id:
            return None
        path = self.models / model
        if not (path / "config.json").is_file():
            raise TrainSettingsError(
                f"--agent {self.settings.agent or 'default'!r} runs model {model!r}, which is not in {self.models}; "
                "train an agent on the default model or on a model trained here"
            )
        return path

    def _model_dir(self, model: str) -> Path:
        """The HF directory of the model a round starts from: a registered model, else the inference service's
        default model (converted once from its GGUF file)."""
        return self._registered_model_dir(model) or base_model_dir(self.default_model_path, self.base_cache)

    async def _tools(self, path: Path) -> list[ToolSpec]:
        """The tools listing of the round's runs, kept with the round so its examples can be rebuilt the same."""
        if path.is_file():
            return tools_from_json(json.loads(path.read_text(encoding="utf-8")))
        tools = await self.tools.list_tools()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tools_to_json(tools), ensure_ascii=False) + "\n", encoding="utf-8")
        return tools

    async def _train(self, number: int, model_in: str, tune: Tune, folder: Path) -> tuple[int, float]:
        """Fine-tunes and exports round ``number``'s model unless it is exported already; (steps, loss)."""
        destination = self.models / self.settings.model_id(number)
        summary = folder / "training.json"
        if (destination / "config.json").is_file() and summary.is_file():
            figures = json.loads(summary.read_text())
            return int(figures["steps"]), float(figures["loss"])
        base = await asyncio.to_thread(self._model_dir, model_in)
        bars: list[Callable[[int, str], None]] = []
        stop = threading.Event()

        def step(done: int, total: int) -> bool:
            if not bars:  # the total is known once the trainer has planned its steps
                bars.append(self.progress.start(f"round {number}: training", total))
            bars[0](done, "optimizer steps")
            return stop.is_set()

        checkpoints = folder / "checkpoints"
        training = asyncio.ensure_future(
            asyncio.to_thread(tune, base=base, checkpoints=checkpoints, settings=self.settings, on_step=step)
        )
        try:
            result = await asyncio.shield(training)
        except asyncio.CancelledError:
            # Ctrl-C: the trainer thread cannot be cancelled, and the process would wait for it to finish all its
            # steps. Asked to stop, it checkpoints its current step and returns; the next run resumes there.
            stop.set()
            with contextlib.suppress(TrainingStopped):
                await training
            raise
        await asyncio.to_thread(export_model, result, destination)
        gguf = await asyncio.to_thread(self._export_gguf, destination)
        figures = {"steps": result.steps, "loss": result.loss, "examples": result.examples}
        figures["gguf"] = gguf.name if gguf else None
        figures["skipped_too_long"] = result.skipped_too_long
        summary.write_text(json.dumps(figures) + "\n")
        shutil.rmtree(checkpoints, ignore_errors=True)  # the model is exported: nothing left to resume
        return result.steps, result.loss

    def _export_gguf(self, model_dir: Path) -> Path | None:
        """The exported model also as ``<model_dir>/model-<type>.gguf`` for llama.cpp and Ollama, its metadata and
        tokenizer from the default model's GGUF (every round descends from it); None with --gguf none, or when the
        default model is a HF directory (no GGUF to take them from). The inference service serves the folder from
        its config.json as before."""
        directory, source = resolve_model_path(self.default_model_path or None)
        if self.settings.gguf == "none" or source is None:
            return None
        dtype = self.settings.gguf
        return export_gguf(model_dir, directory / source, model_dir / gguf_file_name(dtype), dtype)

    async def evaluate(self, number: int, agent: str, model: str = "") -> tuple[Report, ...]:
        """The test split of each --eval-suite with ``agent`` (on ``model`` when given: an agent ``<agent>-on-<model>``
        made through the planner, which checks the model against the inference service's ListModels). A task with its
        own agent runs as that agent, on ``model`` as ``<task agent>-on-<model>``. One report per suite."""
        name = await agent_on_model(self.channel, agent, model, builtin_examples=self._lean) if model else agent
        label = model or "baseline"
        reports = []
        for suite in self.test_suites:
            update = self.progress.start(f"round {number}: eval {suite.name} ({label})", len(suite.tasks))

            def show(state: EvalProgress, update: Callable[[int, str], None] = update) -> None:
                update(state.done, f"{state.passed} passed")

            results = await evaluate(
                await suite_on_model(self.channel, suite, model, builtin_examples=self._lean) if model else suite, self.runner,
                self.folder / f"round-{number}" / "eval.results.jsonl", agent=name,
                concurrency=self.settings.concurrency, timeout_s=self.settings.timeout_s, on_progress=show,
            )  # fmt: skip
            if len(results) < len(suite.tasks):
                raise RuntimeError("some test tasks could not be run (planner unavailable); run the command again")
            reports.append(summarize(suite.name, label, results.values()))
        write_reports(reports, self.folder / f"round-{number}", "eval")
        return tuple(reports)

"""Evaluation suites: JSONL files of tasks with checks, the shipped ones, and the outcome of a task's run."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from services.eval.checks import Check, CheckResult, Trajectory, parse_check

# A task is a question, not a document; a line over this is a mistake (and is never echoed back).
MAX_LINE_CHARS = 100_000
MAX_TASK_CHARS = 4000
SPLITS = ("train", "test")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class SuiteError(ValueError):
    """A suite that cannot be read; the message names the file and line and says what to change."""


@dataclass(frozen=True)
class EvalTask:
    """One task: the question sent to the agent, the checks its run must pass, its category and split.

    ``agent`` runs this task with that agent instead of the one evaluated (a BFCL task's agent has its function as
    a tool); ``meta`` is kept for people reading results (source ids, the fact asked about).
    """

    id: str
    task: str
    checks: tuple[Check, ...]
    category: str = "general"
    split: str = "test"
    agent: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {"id": self.id, "category": self.category, "split": self.split, "task": self.task}
        line["checks"] = [check.to_json() for check in self.checks]
        if self.agent:
            line["agent"] = self.agent
        if self.meta:
            line["meta"] = dict(self.meta)
        return line


@dataclass(frozen=True)
class TaskOutcome:
    """A task's run judged by its checks. ``reward`` is the share of checks passed (1.0 when the task passed): what
    the training loop scores a rollout by."""

    task: EvalTask
    trajectory: Trajectory
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return not self.trajectory.error and all(check.passed for check in self.checks)

    @property
    def reward(self) -> float:
        if self.trajectory.error or not self.checks:
            return 0.0
        return sum(check.passed for check in self.checks) / len(self.checks)


def judge(task: EvalTask, trajectory: Trajectory) -> TaskOutcome:
    """Runs every check of ``task`` on ``trajectory``."""
    return TaskOutcome(task, trajectory, tuple(check.evaluate(trajectory) for check in task.checks))


@dataclass(frozen=True)
class Suite:
    """A suite's tasks in file order; ``path`` is the file it was read from (None when built in memory)."""

    name: str
    tasks: tuple[EvalTask, ...]
    path: Path | None = None

    def select(
        self,
        *,
        split: str = "",
        categories: Iterable[str] = (),
        limit: int = 0,
        limits: Mapping[str, int] | None = None,
    ) -> Suite:
        """The tasks of ``split`` and ``categories`` (all when empty), at most ``limit`` per category (0: all;
        ``limits[category]`` instead where given), in file order; a fixed sample, so that a re-run of a bounded
        evaluation resumes the same tasks."""
        wanted = set(categories)
        limits = limits or {}
        taken: dict[str, int] = {}
        chosen = []
        for task in self.tasks:
            if (split and task.split != split) or (wanted and task.category not in wanted):
                continue
            cap = limits.get(task.category, limit)
            if cap and taken.get(task.category, 0) >= cap:
                continue
            taken[task.category] = taken.get(task.category, 0) + 1
            chosen.append(task)
        return Suite(self.name, tuple(chosen), self.path)


def parse_task(line: str) -> EvalTask:
    """One suite line as a task; ValueError saying what is wrong."""
    if len(line) > MAX_LINE_CHARS:
        raise ValueError(f"the line has {len(line)} characters; a task line has at most {MAX_LINE_CHARS}")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError('a line is a JSON object: {"id": ..., "task": ..., "checks": [...]}')
    task_id, text, checks = value.get("id"), value.get("task"), value.get("checks")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 200 or not set(task_id) <= _ID_CHARS:
        raise ValueError('"id" must be 1-200 characters of letters, digits and - _ . :')
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TASK_CHARS:
        raise ValueError(f'"task" must be a non-empty string of at most {MAX_TASK_CHARS} characters')
    if not isinstance(checks, list) or not checks:
        raise ValueError('"checks" must be a non-empty list of checks')
    split = value.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f'"split" must be one of {", ".join(SPLITS)}')
    category, agent, meta = value.get("category", "general"), value.get("agent", ""), value.get("meta", {})
    if not isinstance(category, str) or not category or not isinstance(agent, str) or not isinstance(meta, dict):
        raise ValueError('"category" and "agent" must be strings and "meta" an object')
    parsed = []
    for number, check in enumerate(checks, start=1):
        try:
            parsed.append(parse_check(check))
        except ValueError as e:
            raise ValueError(f"check {number}: {e}") from None
    return EvalTask(task_id, text, tuple(parsed), category, split, agent, meta)


def parse_suite(name: str, lines: Iterable[str], *, source: str = "") -> Suite:
    """A suite from JSONL lines (blank lines and lines starting with # are skipped); SuiteError naming the line."""
    tasks: list[EvalTask] = []
    seen: dict[str, int] = {}
    where = source or name
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            task = parse_task(line)
        except ValueError as e:
            raise SuiteError(f"{where}, line {number}: {e}") from None
        if task.id in seen:
            raise SuiteError(f"{where}, line {number}: id {task.id!r} is already used on line {seen[task.id]}")
        seen[task.id] = number
        tasks.append(task)
    if not tasks:
        raise SuiteError(f"{where} has no tasks; write one JSON object per line")
    return Suite(name, tuple(tasks))


def shipped_suites() -> dict[str, Path]:
    """The suites in the package (services/eval/suites), by name: kg-train, kg-test, bfcl-simple."""
    folder = Path(str(resources.files("services.eval") / "suites"))
    return {path.name.removesuffix(".jsonl"): path for path in sorted(folder.glob("*.jsonl"))}


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name, or a JSONL file; SuiteError when neither exists or a line is wrong."""
    shipped = shipped_suites()
    path = shipped.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        names = ", ".join(shipped) or "none"
        raise SuiteError(
            f"no suite {str(name_or_path)[:200]!r}: give a JSONL file or one of the shipped suites ({names})"
        )
    try:
        with path.open(encoding="utf-8") as lines:
            suite = parse_suite(path.name.removesuffix(".jsonl"), lines, source=str(path))
        return Suite(suite.name, suite.tasks, path)
    except UnicodeDecodeError as e:
        raise SuiteError(f"{path} is not UTF-8 text (byte {e.start}); save the suite as UTF-8") from None

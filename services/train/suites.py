"""The tasks of a training job: the train splits of its --suite suites, the test splits of its --eval-suite suites
(sampled per category) and the train tasks whose reference solutions round 1 plays, each refused naming the option
when it cannot be used."""

from __future__ import annotations

from services.eval.suite import EvalTask, Suite, SuiteError, load_suite
from services.train.demonstrations import choose_tasks
from services.train.settings import TrainSettings, TrainSettingsError


def load_suites(settings: TrainSettings) -> tuple[list[Suite], list[Suite]]:
    """The training tasks (the train split of each --suite) and the test tasks (the test split of each
    --eval-suite), sampled per category. TrainSettingsError naming the option and the suite when a suite is missing,
    gives no tasks of its split, or has a task id another suite of the option has (rollouts, demonstrations and
    results are kept by task id); and for --student with tasks that run as their own agents."""
    chosen: dict[str, list[Suite]] = {}
    for option, names, split, limit, limits in (
        ("--suite", settings.suite, "train", settings.limit, {}),
        ("--eval-suite", settings.eval_suite, "test", settings.eval_limit, dict(settings.eval_limit_for)),
    ):
        suites: list[Suite] = []
        seen: dict[str, str] = {}
        for name in names:
            try:
                suite = load_suite(name).select(split=split, categories=settings.categories, limit=limit, limits=limits)
            except SuiteError as e:
                raise TrainSettingsError(f"{option}: {e}") from None
            if not suite.tasks:
                categories = f" in the categories {', '.join(settings.categories)}" if settings.categories else ""
                raise TrainSettingsError(f"{option} {name!r} has no {split} tasks{categories}; choose another suite")
            for task in suite.tasks:
                if task.id in seen:
                    raise TrainSettingsError(
                        f"{option} {name!r}: task {task.id!r} is also in {seen[task.id]!r}; give suites whose task "
                        "ids differ"
                    )
                seen[task.id] = name
            suites.append(suite)
        chosen[option] = suites
    scored = {task.category for suite in chosen["--eval-suite"] for task in suite.tasks}
    unknown = [category for category, _ in settings.eval_limit_for if category not in scored]
    if unknown:
        raise TrainSettingsError(
            f"--eval-limit-for {unknown[0]}: no --eval-suite has such a test category; use one of "
            f"{', '.join(sorted(scored))}"
        )
    own = next((suite for suite in chosen["--suite"] if any(task.agent for task in suite.tasks)), None)
    if settings.student and own is not None:
        raise TrainSettingsError(
            f"--student {settings.student!r}: the tasks of {own.name!r} run as their own agents (a BFCL task's has "
            "its function), which a student cannot stand in for; leave --student or that suite out"
        )
    return chosen["--suite"], chosen["--eval-suite"]


def demonstration_tasks(settings: TrainSettings) -> list[EvalTask]:
    """The train tasks whose reference solutions round 1 plays: up to ``settings.demonstrations`` per category
    (``--demonstrations-for`` overrides it per category) of the train splits of ``settings.suite`` (all of them,
    not only the rollouts' sample), a choice seeded by ``settings.seed``. The test split is never among them.
    TrainSettingsError when ``--demonstrations-for`` names a category the splits do not have."""
    if not settings.demonstrates:
        return []
    pool = [
        task
        for name in settings.suite
        for task in load_suite(name).select(split="train", categories=settings.categories).tasks
    ]
    present = {task.category for task in pool}
    unknown = [category for category, _ in settings.demonstrations_for if category not in present]
    if unknown:
        suites = " nor ".join(repr(name) for name in settings.suite)
        lacks = f"neither {suites} has such" if len(settings.suite) > 1 else f"{suites} has no such"
        raise TrainSettingsError(
            f"--demonstrations-for {unknown[0]}: {lacks} train category; use one of {', '.join(sorted(present))}"
        )
    return choose_tasks(pool, settings.demonstrations, settings.seed, dict(settings.demonstrations_for))

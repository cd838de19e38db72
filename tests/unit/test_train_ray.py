"""`--ray` and `--ray-workers` of `meshpilot train` and `meshpilot eval`: their settings are checked before any work, an
address where no cluster answers is refused naming it (exit 1, no traceback), ray is not imported without the option,
and a Ray task's failure reaches the loop as the local runner's would."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshpilot.cli import app
from services.eval.checks import Trajectory
from services.eval.runner import PlannerAccess, RunUnavailable
from services.train import TrainSettings, TrainSettingsError
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ray_workers": 0}, r"^--ray-workers is 0; use 1 or more"),
        ({"ray_workers": 2}, r"^--ray-workers 2 needs --ray ADDRESS"),
    ],
)
def test_bad_ray_settings_name_the_option(change: dict, message: str) -> None:
    with pytest.raises(TrainSettingsError, match=message):
        TrainSettings(**change).validate()


def test_ray_workers_with_a_cluster_are_valid() -> None:
    assert TrainSettings(ray="127.0.0.1:6379", ray_workers=4).validate().ray_workers == 4


def test_the_command_exits_2_on_zero_ray_workers() -> None:
    done = CliRunner().invoke(app, ["train", "--ray", "127.0.0.1:6379", "--ray-workers", "0"])
    assert done.exit_code == 2, done.output
    assert "error: --ray-workers is 0; use 1 or more" in done.output


@pytest.mark.parametrize("command", [["train", "--limit", "1", "--no-baseline"], ["eval", "kg-test", "--limit", "1"]])
def test_a_cluster_that_is_not_there_is_named(command: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MESHPILOT_DATA_DIR", str(tmp_path))
    address = f"127.0.0.1:{free_port()}"
    done = CliRunner().invoke(app, [*command, "--ray", address])
    assert done.exit_code == 1, done.output
    assert f"error: --ray {address}: no Ray cluster answers there" in done.output
    assert "ray start --head" in done.output and "Traceback" not in done.output


def test_an_address_without_a_port_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MESHPILOT_DATA_DIR", str(tmp_path))
    done = CliRunner().invoke(app, ["train", "--limit", "1", "--ray", "head-node"])
    assert done.exit_code == 1, done.output
    assert "error: --ray 'head-node': use HOST:PORT" in done.output


def test_without_ray_nothing_imports_it(tmp_path: Path) -> None:
    """A train and an eval command without --ray, as far as the unreachable planner lets them go."""
    port = free_port()
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from meshpilot.cli import app
        for command in (["train", "--limit", "1", "--no-baseline"], ["eval", "kg-test", "--limit", "1"]):
            done = CliRunner().invoke(app, [*command, "--planner", "127.0.0.1:{port}"])
            assert done.exit_code == 1 and "unavailable" in done.output.lower(), done.output
        print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
    """)
    env = {"MESHPILOT_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


class FailingTask:
    """Stands in for a Ray remote function whose task raises ``error`` when awaited."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def remote(self, *args: Any) -> Any:
        async def fail() -> Trajectory:
            raise self.error

        return fail()


def run_failing(error: BaseException) -> None:
    from services.eval.ray_runner import RayRunner

    runner = RayRunner(PlannerAccess("127.0.0.1:1"))
    runner._remote = FailingTask(error)
    asyncio.run(runner.run("task", agent="a", timeout_s=1))


def test_a_run_the_planner_could_not_make_on_a_worker_stays_unfinished() -> None:
    import ray.exceptions

    with pytest.raises(RunUnavailable, match=r"^UNAVAILABLE: planner down$"):
        run_failing(ray.exceptions.RayTaskError("_run_on_worker", "tb", RunUnavailable("UNAVAILABLE: planner down")))
    with pytest.raises(RunUnavailable, match=r"^the Ray worker was lost: WorkerCrashedError$"):
        run_failing(ray.exceptions.WorkerCrashedError())


def test_any_other_failure_of_a_task_is_an_error_naming_it() -> None:
    import ray.exceptions

    with pytest.raises(RuntimeError, match=r"^a task failed on a Ray worker: ImportError: no module named services$"):
        run_failing(ray.exceptions.RayTaskError("_run_on_worker", "tb", ImportError("no module named services")))


class WorkersFailed(Exception):
    """Shaped as Ray Train's WorkerGroupError: the exception of each failed worker, by rank."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_a_failed_fit_is_reported_by_what_failed_in_the_worker() -> None:
    import ray.exceptions

    from services.train.finetune import FineTuneError
    from services.train.ray_backend import _training_failure

    no_examples = FineTuneError("no example to train on; run more tasks")
    assert isinstance(_training_failure(WorkersFailed({0: no_examples})), FineTuneError)
    assert str(_training_failure(WorkersFailed({0: no_examples}))) == "no example to train on; run more tasks"
    wrapped = ray.exceptions.RayTaskError("train_fn", "tb", MemoryError("out of memory"))
    failure = _training_failure(WorkersFailed({1: wrapped}))
    assert isinstance(failure, RuntimeError)
    assert str(failure) == "training under Ray failed on worker 1: MemoryError: out of memory"
    assert str(_training_failure(TimeoutError("controller"))) == "training under Ray failed: TimeoutError: controller"

"""Training under Ray Train (`meshpilot train --ray ADDRESS`): a round's Tune (fine_tune or grpo_tune with its examples
bound) runs in ``TorchTrainer``'s workers, ``--ray-workers`` of them on CPUs, with the checkpoints in the round's folder
as when it runs here, so an interrupted round resumes alike. Rank 0 writes the trained model beside them; the driver
loads it back as the FineTuneResult the export step takes. Paths are the driver's: on more than one machine the data
directory must be shared storage. Imported only when a cluster is given: ray is an optional extra."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from services.eval.ray_runner import where
from services.train.finetune import FineTuneError, FineTuneResult, export_model, load_pretrained
from services.train.settings import TrainSettings

Tune = Callable[..., FineTuneResult]
RECORD = "ray-train.json"
"""In the round's folder: how its training ran (workers, world size, where rank 0 ran) and its figures."""


def on_ray_train(tune: Tune, folder: Path, *, workers: int) -> Tune:
    """``tune`` as TorchTrainer runs it on the connected cluster with ``workers`` CPU workers; same signature and
    result. ``folder``: the round's folder, where the trained model and the record are written."""

    def run(
        *,
        base: Path,
        checkpoints: Path,
        settings: TrainSettings,
        on_step: Callable[[int, int], None] | None = None,
    ) -> FineTuneResult:
        out = folder / "ray-model"
        steps = Queue(actor_options={"num_cpus": 0})  # rank 0's progress, shown by the driver as it comes
        config = {"tune": tune, "base": base, "checkpoints": checkpoints, "settings": settings, "out": out}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={**config, "steps": steps, "workers": workers},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
            run_config=RunConfig(name=f"{settings.name}-{folder.name}", storage_path=str(folder / "ray")),
        )
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # raised in the driver's thread, below
                failure.append(e)

        fitting = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        fitting.start()
        while fitting.is_alive() or not steps.empty():
            try:
                done, total = steps.get(timeout=0.5)
            except queue.Empty:
                continue
            if on_step is not None:
                on_step(done, total)
        steps.shutdown()
        if failure:
            raise _training_failure(failure[0])
        record = json.loads((folder / RECORD).read_text())
        model, tokenizer = load_pretrained(out)
        shutil.rmtree(out, ignore_errors=True)  # in memory now; the export step writes it where it belongs
        return FineTuneResult(
            model, tokenizer, record["examples"], record["skipped_too_long"], record["steps"], record["loss"]
        )

    return run


def _train_worker(config: dict[str, Any]) -> None:
    """One TorchTrainer worker: the Tune, with Ray Train's process group already set up (HF Trainer and accelerate
    take it from there); rank 0 reports its steps and writes the model and the record."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    steps = config["steps"]
    result: FineTuneResult = config["tune"](
        base=config["base"],
        checkpoints=config["checkpoints"],
        settings=config["settings"],
        on_step=(lambda done, total: steps.put((done, total))) if rank == 0 else None,
    )
    if rank != 0:
        return
    out: Path = config["out"]
    export_model(result, out)
    record = {
        "trainer": f"{TorchTrainer.__module__}.{TorchTrainer.__name__}",
        "workers": config["workers"],
        "world_size": context.get_world_size(),
        "rank0": where(),
        "examples": result.examples,
        "skipped_too_long": result.skipped_too_long,
        "steps": result.steps,
        "loss": result.loss,
    }
    partial = out.parent / f".{RECORD}.partial"
    partial.write_text(json.dumps(record) + "\n")
    os.replace(partial, out.parent / RECORD)


def _training_failure(error: BaseException) -> Exception:
    """A failed fit as the CLI reports it: a worker's FineTuneError as itself (it says what to change), anything
    else as a RuntimeError naming the worker's error."""
    failures: dict[int, BaseException] = getattr(error, "worker_failures", None) or {}
    for rank, cause in sorted(failures.items()):
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's own exception
        if isinstance(cause, FineTuneError):
            return FineTuneError(str(cause))
        return RuntimeError(f"training under Ray failed on worker {rank}: {type(cause).__name__}: {cause}")
    return RuntimeError(f"training under Ray failed: {type(error).__name__}: {error}")

"""Runs tasks on a Ray cluster (`--ray ADDRESS`): each task is a Ray task that calls ``run_task`` (the same
``PlannerRunner.run`` as a local run) over a channel of its own to the planner; the caller judges, records and shows
progress as it does locally. Imported only when a cluster is given: ray is an optional extra."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from typing import Any

import ray

from services.eval.checks import Trajectory
from services.eval.runner import PlannerAccess, RunUnavailable, run_task

# Long enough for a head on a busy machine to accept; a cluster that is not there refuses at once.
PROBE_TIMEOUT_S = 10.0


class RayClusterError(RuntimeError):
    """The cluster cannot be used; the message names the address and says what to do."""


def connect(address: str) -> None:
    """Joins the Ray cluster at ``address`` (the head's HOST:PORT, ``ray://HOST:PORT`` or ``auto``) as its driver.
    RayClusterError naming the address when no cluster answers there. Workers' output stays in the cluster's logs
    (``<temp dir>/session_latest/logs``) so that it does not cut through the progress bars."""
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise RayClusterError(f"--ray {address!r}: use HOST:PORT, the head's address (port 6379 by default)")
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise RayClusterError(
                f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                "`ray start --head`, or leave --ray out to run everything in this process"
            ) from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayClusterError(f"--ray {address}: {e}") from None


def disconnect() -> None:
    ray.shutdown()


def where() -> str:
    """``<node id>/<pid>`` of the calling Ray worker."""
    return f"{ray.get_runtime_context().get_node_id()}/{os.getpid()}"


def _run_on_worker(access: PlannerAccess, task: str, agent: str, timeout_s: float) -> Trajectory:
    trajectory = asyncio.run(run_task(access, task, agent=agent, timeout_s=timeout_s))
    return dataclasses.replace(trajectory, worker=where())


class RayRunner:
    """An AgentRunner whose runs are made by Ray tasks, spread over the cluster's nodes. The tasks ask for no CPU:
    they wait on the planner, and training must find the cluster's CPUs free. A task is never retried by Ray (a Run
    is not idempotent); a lost worker is RunUnavailable, so the task stays unfinished and the next command runs it."""

    def __init__(self, access: PlannerAccess) -> None:
        self.access = access
        self._remote: Any = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="SPREAD")(_run_on_worker)

    async def run(self, task: str, *, agent: str, timeout_s: float) -> Trajectory:
        try:
            result: Trajectory = await self._remote.remote(self.access, task, agent, timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RunUnavailable):
                raise RunUnavailable(str(e.cause)) from None
            raise RuntimeError(f"a task failed on a Ray worker: {type(e.cause).__name__}: {e.cause}") from None
        except ray.exceptions.RayError as e:  # the worker or its node died, the object was lost
            raise RunUnavailable(f"the Ray worker was lost: {type(e).__name__}") from None
        return result

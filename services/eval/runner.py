"""Runs a suite's tasks through the planner (real Run RPCs) with bounded concurrency, resumably: every judged task is
appended to a results file, and a re-run skips the tasks already there."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import json_format

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common.clients import create_channel
from services.common.tls import TlsIdentity
from services.eval.checks import ToolCallRecord, Trajectory, is_rejection
from services.eval.suite import EvalTask, Suite, TaskOutcome, judge

# A run that goes on longer than this is stuck; it is recorded as failed (DEADLINE_EXCEEDED), not waited for.
DEFAULT_TASK_TIMEOUT_S = 300.0
# Transport failures (the planner down or overloaded) are not the agent's fault: such a task is not recorded, so a
# re-run tries it again.
_NOT_THE_AGENTS_FAULT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
)


class AgentRunner(Protocol):
    """Runs one task with an agent and reports what the run did. Raises RunUnavailable when the run could not be
    made at all (the planner unreachable, overloaded, the key refused)."""

    async def run(self, task: str, *, agent: str, timeout_s: float) -> Trajectory: ...


class RunUnavailable(Exception):
    """The run could not be made (not a failure of the agent); the task stays unfinished."""


class PlannerRunner:
    """An AgentRunner over the planner's Run RPC (a stub on a channel that carries the caller's API key)."""

    def __init__(self, stub: planner_pb2_grpc.PlannerServiceStub, clock: Callable[[], float] = time.monotonic) -> None:
        self.stub = stub
        self.clock = clock

    async def run(self, task: str, *, agent: str, timeout_s: float) -> Trajectory:
        started = self.clock()
        events: list[planner_pb2.RunEvent] = []
        try:
            async for event in self.stub.Run(planner_pb2.RunRequest(task=task, agent=agent), timeout=timeout_s):
                events.append(event)
        except grpc.aio.AioRpcError as e:
            if e.code() in _NOT_THE_AGENTS_FAULT:
                raise RunUnavailable(f"{e.code().name}: {e.details()}") from None
            error = f"{e.code().name}: {(e.details() or '')[:300]}"
            return dataclasses.replace(trajectory_of(events, self.clock() - started), error=error)
        return trajectory_of(events, self.clock() - started)


@dataclass(frozen=True)
class PlannerAccess:
    """How the caller reaches the planner: its address, the API key and the TLS identity the CLI uses. Plain data, so
    a process elsewhere (a Ray worker) can be handed it and open a channel of its own."""

    target: str
    api_key: str | None = None
    tls: TlsIdentity | None = None

    def channel(self) -> grpc.aio.Channel:
        return create_channel(self.target, api_key=self.api_key, tls=self.tls)


async def run_task(access: PlannerAccess, task: str, *, agent: str, timeout_s: float) -> Trajectory:
    """One task through the planner on a channel of its own: ``PlannerRunner.run``, as a Ray worker runs it."""
    async with access.channel() as channel:
        return await PlannerRunner(planner_pb2_grpc.PlannerServiceStub(channel)).run(
            task, agent=agent, timeout_s=timeout_s
        )


def trajectory_of(events: Iterable[planner_pb2.RunEvent], latency_s: float) -> Trajectory:
    """The trajectory of a run's events: steps started, tool calls with their outcome, the answer and total tokens."""
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    answer, error, run_id, steps, tokens, step_tokens = "", "", "", 0, 0, 0
    for event in events:
        run_id = run_id or event.run_id
        kind = event.WhichOneof("event")
        if kind == "step_started":
            steps += 1
        elif kind == "model_output":
            step_tokens += event.model_output.usage.total_tokens
        elif kind == "tool_call":
            arguments = json_format.MessageToDict(event.tool_call.arguments)
            calls[event.tool_call.call_id] = (event.tool_call.tool, arguments)
        elif kind == "tool_result" and event.tool_result.WhichOneof("outcome") == "error":
            errors[event.tool_result.call_id] = event.tool_result.error
        elif kind == "final_answer":
            answer, tokens = event.final_answer.answer, event.final_answer.usage.total_tokens
        elif kind == "error":
            error = f"{event.error.code}: {event.error.message[:300]}"
    records = tuple(
        ToolCallRecord(tool, args, errors.get(call_id, ""), is_rejection(errors.get(call_id, "")))
        for call_id, (tool, args) in calls.items()
    )
    return Trajectory(answer, records, steps, tokens or step_tokens, latency_s, error, run_id)


@dataclass(frozen=True)
class ResultLine:
    """One line of a results file: the task's id, category and judgement, and what its run did (``worker``: where
    the run was made from, under ``--ray``)."""

    task_id: str
    category: str
    passed: bool
    reward: float
    answer: str
    tool_calls: int
    valid_tool_calls: int
    steps: int
    total_tokens: int
    latency_s: float
    error: str
    run_id: str
    failed_checks: list[str]
    worker: str = ""

    @classmethod
    def of(cls, outcome: TaskOutcome) -> ResultLine:
        t = outcome.trajectory
        return cls(
            outcome.task.id, outcome.task.category, outcome.passed, round(outcome.reward, 4), t.answer[:2000],
            len(t.tool_calls), sum(call.valid for call in t.tool_calls), t.steps, t.total_tokens,
            round(t.latency_s, 4), t.error, t.run_id, [c.detail for c in outcome.checks if not c.passed], t.worker,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> ResultLine:
        return cls(**json.loads(line))


def read_results(path: Path) -> dict[str, ResultLine]:
    """The results recorded in ``path`` by task id (none when it does not exist). A torn last line (the process was
    killed mid-write) is skipped: that task runs again."""
    results: dict[str, ResultLine] = {}
    if not path.exists():
        return results
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            result = ResultLine.from_json(line)
        except (ValueError, TypeError):
            continue
        results[result.task_id] = result
    return results


@dataclass
class EvalProgress:
    """Counts of an evaluation in progress, handed to the progress callback after each task."""

    total: int
    done: int = 0
    passed: int = 0
    unavailable: int = 0


async def evaluate(
    suite: Suite,
    runner: AgentRunner,
    results_path: Path,
    *,
    agent: str = "",
    concurrency: int = 4,
    timeout_s: float = DEFAULT_TASK_TIMEOUT_S,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> dict[str, ResultLine]:
    """Runs every task of ``suite`` not yet in ``results_path`` with ``agent`` (a task's own agent wins), at most
    ``concurrency`` at a time, appending each judged task as it ends; returns the results of the suite's tasks.

    Tasks whose run could not be made (RunUnavailable) are left out of the file and the returned results."""
    if concurrency < 1:
        raise ValueError(f"concurrency is {concurrency}; use 1 or more")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = read_results(results_path)
    wanted = {task.id for task in suite.tasks}
    todo = [task for task in suite.tasks if task.id not in results]
    progress = EvalProgress(total=len(suite.tasks), done=len(wanted & results.keys()))
    progress.passed = sum(results[i].passed for i in wanted & results.keys())
    if on_progress is not None:
        on_progress(progress)
    gate = asyncio.Semaphore(concurrency)
    with results_path.open("a", encoding="utf-8") as out:

        async def one(task: EvalTask) -> None:
            async with gate:
                try:
                    trajectory = await runner.run(task.task, agent=task.agent or agent, timeout_s=timeout_s)
                except RunUnavailable:
                    progress.unavailable += 1
                    trajectory = None
            if trajectory is not None:
                result = ResultLine.of(judge(task, trajectory))
                out.write(result.to_json() + "\n")
                out.flush()
                results[task.id] = result
                progress.done += 1
                progress.passed += result.passed
            if on_progress is not None:
                on_progress(progress)

        await asyncio.gather(*(one(task) for task in todo))
    return {task.id: results[task.id] for task in suite.tasks if task.id in results}

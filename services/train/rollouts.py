"""Rollouts through the mesh: K sampled attempts per task, each a real Run of an agent that samples with its own
seed, judged by the evaluation checks and kept with what the model wrote and the run's snapshot (read from the
planner's journal). Appended to a file as they end, so an interrupted collection resumes where it stopped."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc, planner_pb2, tool_sources_pb2_grpc
from meshpilot.tools.v1 import tools_pb2
from services.common.json_values import message_to_json
from services.eval.runner import AgentRunner, RunUnavailable
from services.eval.suite import EvalTask, judge
from services.planner.store import JournalStore
from services.planner.types import ToolSpec
from services.train.examples import Rollout

AGENT_TIMEOUT_S = 30.0


def rollout_agent_name(job: str, attempt: int, task_agent: str = "") -> str:
    """The agent attempt ``attempt`` of job ``job`` runs as (agent names start with a letter): ``train-<job>-a<k>``
    for the job's agent, ``train-<job>-<task agent>-a<k>`` for a task's own agent (its name hashed when that would
    be over 63 characters, so that two task agents never share a copy)."""
    if not task_agent:
        return f"train-{job}-a{attempt}"[:63]
    name = f"train-{job}-{task_agent}-a{attempt}"
    if len(name) <= 63:
        return name
    return f"train-{job}-{hashlib.sha256(task_agent.encode()).hexdigest()[:10]}-a{attempt}"[:63]


async def prepare_rollout_agents(
    channel: grpc.aio.Channel,
    *,
    base: str,
    model: str,
    job: str,
    attempts: int,
    temperature: float,
    seed: int,
    task_agent: str = "",
    builtin_examples: bool | None = None,
) -> list[str]:
    """One agent per attempt: ``base``'s latest spec on ``model`` ("" keeps the base's), sampling at ``temperature``
    with seed ``seed + attempt``, with the planner's built-in examples as ``builtin_examples`` says (None: as the
    base); made or brought up to date. ``task_agent``: the task's own agent these are copies of (then ``base`` is
    that agent), which names them. Returns their names, by attempt."""
    stub = agents_pb2_grpc.AgentServiceStub(channel)
    spec = (await stub.GetAgent(agents_pb2.GetAgentRequest(name=base or "default"), timeout=AGENT_TIMEOUT_S)).spec
    names = []
    for attempt in range(attempts):
        sampled = agents_pb2.AgentSpec()
        sampled.CopyFrom(spec)
        if model:
            sampled.model = model
        sampled.sampling.temperature = temperature
        sampled.sampling.seed = seed + attempt
        if builtin_examples is not None:
            sampled.builtin_examples = builtin_examples
        name = rollout_agent_name(job, attempt, task_agent)
        await upsert_agent(stub, name, sampled)
        names.append(name)
    return names


async def prepare_task_rollout_agents(
    channel: grpc.aio.Channel,
    tasks: Sequence[EvalTask],
    *,
    model: str,
    job: str,
    attempts: int,
    temperature: float,
    seed: int,
    builtin_examples: bool | None = None,
) -> dict[str, list[str]]:
    """For every task that runs with its own agent (``task.agent``: a BFCL task's has its function), that agent's
    sampled copies, one per attempt, as ``prepare_rollout_agents`` makes them; by task agent."""
    copies: dict[str, list[str]] = {}
    for agent in dict.fromkeys(task.agent for task in tasks if task.agent):
        copies[agent] = await prepare_rollout_agents(
            channel, base=agent, model=model, job=job, attempts=attempts, temperature=temperature, seed=seed,
            task_agent=agent, builtin_examples=builtin_examples,
        )  # fmt: skip
    return copies


async def upsert_agent(stub: agents_pb2_grpc.AgentServiceStub, name: str, spec: agents_pb2.AgentSpec) -> None:
    """Creates agent ``name`` with ``spec``, or stores ``spec`` as its new version when it differs."""
    try:
        await stub.CreateAgent(agents_pb2.CreateAgentRequest(name=name, spec=spec), timeout=AGENT_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        current = await stub.GetAgent(agents_pb2.GetAgentRequest(name=name), timeout=AGENT_TIMEOUT_S)
        if current.spec != spec:
            await stub.UpdateAgent(agents_pb2.UpdateAgentRequest(name=name, spec=spec), timeout=AGENT_TIMEOUT_S)


class PlannerToolLister:
    """The tools the caller's agents may name, as the planner lists them (ToolSourceService.ListTools: the tools
    service's listing for the caller's tenant, what its runs' prompts were built from), through the planner's front
    door: the caller's API key and TLS as for every planner call."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tool_sources_pb2_grpc.ToolSourceServiceStub(channel)

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        response = await self._stub.ListTools(tools_pb2.ListToolsRequest(), timeout=timeout or AGENT_TIMEOUT_S)
        return [
            ToolSpec(tool.name, tool.description, message_to_json(tool.input_schema), tool.requires_approval)
            for tool in response.tools
        ]


def read_rollouts(path: Path) -> dict[tuple[str, int], Rollout]:
    """The rollouts recorded in ``path`` by (task id, attempt); a torn last line is skipped (that attempt runs
    again)."""
    rollouts: dict[tuple[str, int], Rollout] = {}
    if not path.exists():
        return rollouts
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rollout = Rollout.from_json(line)
        except (ValueError, TypeError, KeyError):
            continue
        rollouts[(rollout.task_id, rollout.attempt)] = rollout
    return rollouts


@dataclass
class RolloutProgress:
    total: int
    done: int = 0
    passed: int = 0
    unavailable: int = 0


async def collect_rollouts(
    tasks: Sequence[EvalTask],
    agents: Sequence[str],
    runner: AgentRunner,
    journal: JournalStore,
    path: Path,
    *,
    concurrency: int,
    timeout_s: float,
    on_progress: Callable[[RolloutProgress], None] | None = None,
    task_agents: Mapping[str, Sequence[str]] | None = None,
) -> list[Rollout]:
    """Runs attempt k of every task with ``agents[k]`` (a task with its own agent: with ``task_agents[task.agent][k]``,
    a sampled copy of that agent), at most ``concurrency`` at once, skipping the attempts already in ``path`` and
    appending each new one as it ends; returns every rollout of ``tasks`` (task, then attempt order). Runs the
    planner could not make (RunUnavailable) are not recorded: the next call retries them. ValueError, before any
    run, for a task whose own agent has no copies in ``task_agents``."""
    copies = task_agents or {}
    missing = sorted({task.agent for task in tasks if task.agent and len(copies.get(task.agent, ())) < len(agents)})
    if missing:
        raise ValueError(f"no sampled copies of the task agents {', '.join(missing[:3])}; prepare them first")

    def agent_of(task: EvalTask, attempt: int) -> str:
        return copies[task.agent][attempt] if task.agent else agents[attempt]

    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_rollouts(path)
    wanted = [(task, attempt) for task in tasks for attempt in range(len(agents))]
    progress = RolloutProgress(total=len(wanted))
    progress.done = sum((task.id, attempt) in done for task, attempt in wanted)
    progress.passed = sum(done[(t.id, a)].passed for t, a in wanted if (t.id, a) in done)
    if on_progress is not None:
        on_progress(progress)
    gate = asyncio.Semaphore(concurrency)
    with path.open("a", encoding="utf-8") as out:

        async def one(task: EvalTask, attempt: int) -> None:
            async with gate:
                try:
                    trajectory = await runner.run(task.task, agent=agent_of(task, attempt), timeout_s=timeout_s)
                except RunUnavailable:
                    progress.unavailable += 1
                    trajectory = None
            if trajectory is not None:
                outcome = judge(task, trajectory)
                outputs, snapshot = await journaled(journal, trajectory.run_id)
                calls = trajectory.tool_calls
                rollout = Rollout(
                    task.id, task.category, attempt, trajectory.run_id, round(outcome.reward, 4), outcome.passed,
                    trajectory.steps, len(calls), sum(call.valid for call in calls), trajectory.answer[:2000],
                    trajectory.error, outputs, snapshot, trajectory.worker,
                )  # fmt: skip
                out.write(rollout.to_json() + "\n")
                out.flush()
                done[(task.id, attempt)] = rollout
                progress.done += 1
                progress.passed += rollout.passed
            if on_progress is not None:
                on_progress(progress)

        await asyncio.gather(*(one(task, attempt) for task, attempt in wanted if (task.id, attempt) not in done))
    return [done[(t.id, a)] for t, a in wanted if (t.id, a) in done]


async def journaled(journal: JournalStore, run_id: str) -> tuple[dict[int, str], str]:
    """What the model wrote at each step of run ``run_id`` (its model_output events) and the run's last snapshot;
    nothing for a run that never started (no run id)."""
    if not run_id:
        return {}, ""
    record = await journal.get_run(run_id, tenant=None)
    outputs: dict[int, str] = {}
    for data in record.events:
        event = planner_pb2.RunEvent.FromString(data)
        if event.WhichOneof("event") == "model_output":
            outputs[event.model_output.step] = event.model_output.text
    return outputs, record.snapshot or ""

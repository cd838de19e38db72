"""Verified demonstrations (tool learning from a reference solver): a train task's reference solution played through
the planner's own executor against the real tools, judged by the task's checks, and kept as a Rollout whose steps
become training examples exactly as a verified run's do. For categories the agent almost never solves, its own
rollouts yield nothing to learn from; a played solution does, and it is only kept when the judge passes it."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import jsonschema
import xgrammar as xgr

from meshpilot.planner.v1 import planner_pb2
from services.common import FailedPreconditionError
from services.common.approval import ApprovalSigner
from services.common.config import PlannerConfig
from services.eval.checks import ToolCallRecord, Trajectory
from services.eval.runner import trajectory_of
from services.eval.suite import EvalTask, judge
from services.planner.agents import AgentDefinition
from services.planner.executor import ExecutorDeps, LLMClient, RunExecutor, ToolClient
from services.planner.journal import EventBus, RunJournal
from services.planner.policies import POLICIES
from services.planner.prompt import dumps
from services.planner.state import AgentRef, RunSnapshot
from services.planner.store import RunStore
from services.planner.types import GREEDY, Generation, Sampling, Timings, ToolOutcome, ToolSpec, Usage
from services.train.examples import Rollout
from services.train.rollouts import journaled

# A demonstration is no sampled attempt; its rollout says so.
DEMONSTRATION_ATTEMPT = -1


class DemonstrationError(ValueError):
    """A task whose reference solution cannot be read, or an agent that cannot be demonstrated; says why."""


@dataclass(frozen=True)
class SolutionCall:
    """One step of a reference solution: a tool call."""

    tool: str
    arguments: dict[str, Any]


def reference_solution(task: EvalTask) -> list[SolutionCall]:
    """The tool calls of ``task.meta["solution"]`` (services.eval.generate writes them); DemonstrationError when
    there is none or a step is not ``{"tool": NAME, "arguments": {...}}``."""
    steps = task.meta.get("solution")
    if not isinstance(steps, list) or not steps:
        raise DemonstrationError(f"task {task.id} has no reference solution (meta.solution); regenerate its suite")
    calls = []
    for step in steps:
        if not (
            isinstance(step, dict) and isinstance(step.get("tool"), str) and isinstance(step.get("arguments"), dict)
        ):
            raise DemonstrationError(f'task {task.id}: a solution step must be {{"tool": ..., "arguments": {{...}}}}')
        calls.append(SolutionCall(step["tool"], step["arguments"]))
    return calls


class SolutionRefused(FailedPreconditionError):
    """The step's schema offers no action that plays the solution; ends the run with this reason."""


class SolutionPlayer:
    """An LLMClient that plays ``solution`` as the guided policy's constrained decoder would write it.

    At a step with calls left it writes the next call (keys and arguments in the schema's order, the decoder's
    separators), validated against the step's JSON schema; once the calls are spent it picks, among the answers the
    schema offers (enum and const values), the first that passes every check of ``task``. Either way, when the
    schema offers no such action the run ends with SolutionRefused saying why."""

    def __init__(self, task: EvalTask, solution: Sequence[SolutionCall]) -> None:
        self.task, self.solution = task, list(solution)
        self.played = 0
        self.steps = 0

    async def generate(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any],
        max_tokens: int,
        *,
        timeout: float | None = None,
        model: str = "",
        sampling: Sampling = GREEDY,
    ) -> Generation:
        self.steps += 1
        options = json_schema.get("anyOf", [json_schema])
        if self.played < len(self.solution):
            text = self._call(options, json_schema, self.steps)
            self.played += 1
        else:
            text = self._answer(options, json_schema, self.steps)
        return Generation(text, Usage(), Timings())

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        return []

    def _call(self, options: list[dict[str, Any]], schema: dict[str, Any], step: int) -> str:
        call = self.solution[self.played]
        offered = {_const(option, "tool"): option for option in options if _const(option, "tool") is not None}
        option = offered.get(call.tool)
        if option is None:
            tools = ", ".join(str(name) for name in offered) or "none"
            raise SolutionRefused(f"step {step} offers no {call.tool} call (tools offered: {tools}){_answers(options)}")
        properties = list(option["properties"]["arguments"].get("properties") or {})
        arguments = {name: call.arguments[name] for name in properties if name in call.arguments}
        arguments.update({k: v for k, v in call.arguments.items() if k not in arguments})
        action = {"tool": call.tool, "arguments": arguments}
        try:
            jsonschema.validate(action, schema)
        except jsonschema.ValidationError as e:
            raise SolutionRefused(
                f"step {step}: the {call.tool} call does not fit the step's schema: {e.message}"
            ) from None
        text = dumps(action)
        if not decodable(schema, text):
            raise SolutionRefused(f"step {step}: the constrained decoder cannot write the {call.tool} call {text}")
        return text

    def _answer(self, options: list[dict[str, Any]], schema: dict[str, Any], step: int) -> str:
        answers = _answer_options(options)
        if not answers:
            raise SolutionRefused(f"step {step}: the solution's calls are spent and the step offers no answer to pick")
        calls = tuple(ToolCallRecord(c.tool, c.arguments) for c in self.solution)
        for answer in answers:
            trajectory = Trajectory(answer, calls)
            if all(check.evaluate(trajectory).passed for check in self.task.checks):
                text = dumps({"final_answer": answer})
                if not decodable(schema, text):
                    raise SolutionRefused(f"step {step}: the constrained decoder cannot write the answer {text}")
                return text
        shown = "; ".join(repr(a[:80]) for a in answers[:4])
        raise SolutionRefused(f"step {step}: no answer the step offers passes the task's checks ({shown})")


def decodable(schema: dict[str, Any], text: str) -> bool:
    """Whether the inference service's constrained decoder can write ``text`` under ``schema``: xgrammar over the
    schema without free whitespace, as inference_core.structured compiles it. Stricter than JSON Schema validation:
    xgrammar writes no escapes inside a length-bounded string, so no double quote or backslash there."""
    compiled = _grammars().compile_json_schema(json.dumps(schema, ensure_ascii=False), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


@functools.cache
def _grammars() -> xgr.GrammarCompiler:
    """A compiler over no vocabulary: only ``accept_string`` is asked of its grammars."""
    return xgr.GrammarCompiler(xgr.TokenizerInfo([]))


def _const(option: dict[str, Any], key: str) -> Any:
    spec = (option.get("properties") or {}).get(key)
    return spec.get("const") if isinstance(spec, dict) else None


def _answer_options(options: list[dict[str, Any]]) -> list[str]:
    answers: list[str] = []
    for option in options:
        spec = (option.get("properties") or {}).get("final_answer")
        if isinstance(spec, dict):
            answers += [v for v in spec.get("enum", [spec["const"]] if "const" in spec else []) if isinstance(v, str)]
    return answers


def _answers(options: list[dict[str, Any]]) -> str:
    answers = _answer_options(options)
    return f"; it offers only answers ({len(answers)})" if answers else ""


class ListedTools:
    """A ToolClient that lists ``listing`` (the tools the round's runs saw, from which its examples' prompts are
    rebuilt) and runs calls with ``client`` (the real tools service)."""

    def __init__(self, listing: Sequence[ToolSpec], client: ToolClient) -> None:
        self.listing, self.client = list(listing), client

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        return list(self.listing)

    async def execute(
        self,
        call_id: str,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str = "",
        approval_token: str = "",
        run_id: str = "",
    ) -> ToolOutcome:
        return await self.client.execute(
            call_id, name, arguments, timeout=timeout, idempotency_key=idempotency_key,
            approval_token=approval_token, run_id=run_id,
        )  # fmt: skip


@dataclass(frozen=True)
class Demonstration:
    """A task's played solution: ``kept`` when the judge passed it (every check, every call valid, no error), else
    ``reason`` says why not; ``rollout`` is the run as a Rollout (None when it could not be played at all)."""

    task_id: str
    category: str
    kept: bool
    reason: str
    rollout: Rollout | None

    def to_json(self) -> str:
        rollout = json.loads(self.rollout.to_json()) if self.rollout is not None else None
        data = {"task_id": self.task_id, "category": self.category, "kept": self.kept, "reason": self.reason}
        return json.dumps({**data, "rollout": rollout}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Demonstration:
        data = json.loads(line)
        rollout = Rollout.from_json(json.dumps(data["rollout"])) if data["rollout"] is not None else None
        return cls(data["task_id"], data["category"], bool(data["kept"]), data["reason"], rollout)


class Demonstrator:
    """Plays reference solutions as ``definition`` (a guided agent) with ``tools``, through the planner's RunExecutor,
    the model's part played by ``player`` (a SolutionPlayer).

    The runs are journaled in a SQLite store of a temporary directory, not in the planner's journal: they are no
    user's runs. Use as ``async with Demonstrator(...) as demonstrator: await demonstrator.demonstrate(task)``."""

    def __init__(
        self,
        definition: AgentDefinition,
        tools: ToolClient,
        *,
        agent: str = "demonstration",
        timeout_s: float = 60.0,
        player: Callable[[EvalTask, list[SolutionCall]], LLMClient] = SolutionPlayer,
    ) -> None:
        if definition.policy != "guided":
            raise DemonstrationError(
                f"demonstrations play solutions as the guided policy writes them; agent {agent!r} runs the "
                f"{definition.policy} policy (a react --student learns from them all the same)"
            )
        self.definition, self.tools, self.agent, self.player = definition, tools, agent, player
        self.budget = dataclasses.replace(definition.budget(PlannerConfig()), timeout_s=timeout_s)
        self.signer = ApprovalSigner(secrets.token_bytes(32))
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._store: RunStore | None = None

    async def __aenter__(self) -> Demonstrator:
        self._folder = tempfile.TemporaryDirectory(prefix="meshpilot-demonstrations-")
        self._store = RunStore(Path(self._folder.name) / "demonstrations.db")
        await self._store.open()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._store is not None:
            await self._store.close()
        if self._folder is not None:
            self._folder.cleanup()
        self._store = self._folder = None

    async def demonstrate(self, task: EvalTask) -> Demonstration:
        """``task``'s reference solution played and judged; not kept, with the reason, when it fails anywhere."""
        if self._store is None:
            raise RuntimeError("use the Demonstrator in `async with`")
        try:
            solution = reference_solution(task)
        except DemonstrationError as e:
            return Demonstration(task.id, task.category, False, str(e), None)
        store = self._store
        session = await store.create_session()
        snapshot = RunSnapshot(
            uuid.uuid4().hex, session.session_id, task.task, AgentRef(self.agent, 1, self.definition.to_dict()),
            self.budget,
        )  # fmt: skip
        await store.create_run(
            session.session_id, task.task, agent=self.agent, run_id=snapshot.run_id, snapshot=snapshot.to_json()
        )
        deps = ExecutorDeps(
            self.player(task, solution), self.tools, self.signer, step_max_tokens=PlannerConfig().step_max_tokens
        )
        policy = POLICIES[self.definition.policy](self.definition.policy_options)
        executor = RunExecutor(RunJournal(store, EventBus(), snapshot), self.definition, policy, deps)
        await executor.drive()
        record = await store.get_run(snapshot.run_id, tenant=None)
        trajectory = trajectory_of((planner_pb2.RunEvent.FromString(data) for data in record.events), 0.0)
        outcome = judge(task, trajectory)
        outputs, final = await journaled(store, snapshot.run_id)
        calls = trajectory.tool_calls
        rollout = Rollout(
            task.id, task.category, DEMONSTRATION_ATTEMPT, snapshot.run_id, round(outcome.reward, 4), outcome.passed,
            trajectory.steps, len(calls), sum(call.valid for call in calls), trajectory.answer[:2000],
            trajectory.error, outputs, final,
        )  # fmt: skip
        reason = _why_not(rollout, [check.detail for check in outcome.checks if not check.passed], calls)
        return Demonstration(task.id, task.category, not reason, reason, rollout)


def _why_not(rollout: Rollout, failed_checks: list[str], calls: Sequence[ToolCallRecord]) -> str:
    if rollout.error:
        return rollout.error
    if rollout.valid_call_rate < 1.0:
        refused = next(call for call in calls if not call.valid)
        return f"the tools service refused the {refused.tool} call: {refused.error[:200]}"
    if failed_checks:
        return "failed checks: " + "; ".join(failed_checks)
    return ""


def choose_tasks(
    tasks: Iterable[EvalTask], per_category: int, seed: int, counts: Mapping[str, int] | None = None
) -> list[EvalTask]:
    """Up to ``per_category`` tasks of each category (``counts[category]`` where given), a choice seeded by ``seed``
    (the same on every run), in the categories' first-seen order."""
    by_category: dict[str, list[EvalTask]] = {}
    for task in tasks:
        by_category.setdefault(task.category, []).append(task)
    chosen: list[EvalTask] = []
    for category, pool in by_category.items():
        wanted = (counts or {}).get(category, per_category)
        rng = random.Random(f"{seed}:{category}")
        chosen += sorted(rng.sample(pool, min(wanted, len(pool))), key=lambda t: t.id)
    return chosen


def read_demonstrations(path: Path) -> dict[str, Demonstration]:
    """The demonstrations recorded in ``path`` by task id; a torn last line is skipped (that task is played again)."""
    found: dict[str, Demonstration] = {}
    if not path.exists():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            demonstration = Demonstration.from_json(line)
        except (ValueError, TypeError, KeyError):
            continue
        found[demonstration.task_id] = demonstration
    return found


async def collect_demonstrations(
    tasks: Sequence[EvalTask],
    demonstrator: Demonstrator,
    path: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Demonstration]:
    """Every task's demonstration, played one after another (each is a few tool calls, no model) unless ``path``
    holds it already; each new one is appended to ``path`` as it ends, and ``on_progress(done, kept)`` told.
    Returns them in ``tasks`` order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_demonstrations(path)
    kept = 0
    with path.open("a", encoding="utf-8") as out:
        if out.tell() and not path.read_bytes().endswith(b"\n"):
            out.write("\n")  # after a torn last line, which is played again
        for number, task in enumerate(tasks, start=1):
            if task.id not in done:
                done[task.id] = await demonstrator.demonstrate(task)
                out.write(done[task.id].to_json() + "\n")
                out.flush()
            kept += done[task.id].kept
            if on_progress is not None:
                on_progress(number, kept)
    return [done[task.id] for task in tasks]


def demonstration_counts(demonstrations: Iterable[Demonstration]) -> dict[str, dict[str, int]]:
    """Per category: how many demonstrations were kept of those tried."""
    counts: dict[str, dict[str, int]] = {}
    for demonstration in demonstrations:
        figures = counts.setdefault(demonstration.category, {"kept": 0, "tried": 0})
        figures["tried"] += 1
        figures["kept"] += demonstration.kept
    return counts


def kept_rollouts(demonstrations: Iterable[Demonstration]) -> list[Rollout]:
    """The rollouts of the kept demonstrations, to learn from like verified rollouts."""
    return [d.rollout for d in demonstrations if d.kept and d.rollout is not None]

"""From rollouts to training examples: which rollouts are good enough to learn from (reward filtering), and the exact
chat each of their model calls saw, rebuilt by the agent's own policy from the run's journaled snapshot."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.planner.agents import AgentDefinition
from services.planner.policies import POLICIES, Context
from services.planner.prompt import dumps
from services.planner.state import RunSnapshot
from services.planner.types import ToolSpec

# Policies whose prompt is a function of the transcript (and the run's fence nonce) alone, so that a step's prompt
# can be rebuilt from the finished run; plan_execute's also depends on its plan's progress at that step.
REPLAYABLE_POLICIES = ("guided", "react")


class ExampleError(ValueError):
    """A rollout whose prompts cannot be rebuilt; the message says why."""


@dataclass(frozen=True)
class Rollout:
    """One attempt at a task: its judgement and what the model wrote at each step (``outputs``, by step number, as
    journaled), with the run's final snapshot (JSON) from which its prompts are rebuilt; ``worker``: where the run
    was made from, under ``--ray``."""

    task_id: str
    category: str
    attempt: int
    run_id: str
    reward: float
    passed: bool
    steps: int
    tool_calls: int
    valid_tool_calls: int
    answer: str
    error: str
    outputs: Mapping[int, str]
    snapshot: str
    worker: str = ""

    @property
    def valid_call_rate(self) -> float:
        return self.valid_tool_calls / self.tool_calls if self.tool_calls else 1.0

    @property
    def rank(self) -> tuple[float, float, int, int]:
        """Better rollouts sort first: higher reward, then a larger share of valid calls, then fewer steps (then the
        earlier attempt, so the choice is deterministic)."""
        return (-self.reward, -self.valid_call_rate, self.steps, self.attempt)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["outputs"] = {str(step): text for step, text in self.outputs.items()}
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Rollout:
        data = json.loads(line)
        data["outputs"] = {int(step): text for step, text in data["outputs"].items()}
        return cls(**data)


def select_rollouts(rollouts: Iterable[Rollout], *, min_reward: float, keep_per_task: int) -> list[Rollout]:
    """Reward filtering: per task, the best ``keep_per_task`` rollouts (``Rollout.rank``) among those that ended
    without an error, with reward >= ``min_reward`` and every tool call valid; tasks in first-seen order."""
    by_task: dict[str, list[Rollout]] = {}
    for rollout in rollouts:
        by_task.setdefault(rollout.task_id, []).append(rollout)
    chosen: list[Rollout] = []
    for attempts in by_task.values():
        good = [r for r in attempts if not r.error and r.reward >= min_reward and r.valid_call_rate == 1.0]
        chosen += sorted(good, key=lambda r: r.rank)[:keep_per_task]
    return chosen


@dataclass(frozen=True)
class StepExample:
    """One model call of a rollout: the chat the planner sent (``messages``) and what the model wrote
    (``completion``); the target of behaviour cloning."""

    task_id: str
    run_id: str
    step: int
    messages: list[dict[str, str]]
    completion: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> StepExample:
        return cls(**json.loads(line))


def step_examples(
    rollout: Rollout, tools: Sequence[ToolSpec], *, builtin_examples: bool | None = None
) -> list[StepExample]:
    """Every model call of ``rollout`` as an example: the prompt rebuilt by the agent's policy from the run's snapshot
    as it stood before that step (``tools``: the tools service's listing the run saw), and the step's output.

    The policy's ``request`` is what the executor called, over the same transcript, the same fence nonce and the same
    tools the agent may call, so the messages are the ones the model read; ``builtin_examples`` False rebuilds them
    without the planner's built-in worked examples instead (what a model trained for a lean prompt will read; None:
    as the run's agent had them). ExampleError for a policy whose prompt also depends on state the snapshot no
    longer holds (plan_execute)."""
    snapshot = RunSnapshot.from_json(rollout.snapshot)
    definition = AgentDefinition.from_dict(snapshot.agent.spec)
    if builtin_examples is not None:
        definition = dataclasses.replace(definition, builtin_examples=builtin_examples)
    return _examples(rollout, snapshot, definition, tools, dict(rollout.outputs))


def student_examples(rollout: Rollout, tools: Sequence[ToolSpec], student: AgentDefinition) -> list[StepExample]:
    """A guided run as a react agent's examples (the guided policy as the teacher of a free one): each step's action
    rewritten in the react format (``react_action``) and the prompt the ``student`` agent's policy builds over the
    rewritten transcript, the run's observations and nonce. Nothing for a run with a step whose output was refused
    (its note is the guided policy's words). ExampleError when the student is not a react agent."""
    if student.policy != "react":
        raise ExampleError(f"--student must be a react agent; this one runs the {student.policy} policy")
    snapshot = RunSnapshot.from_json(rollout.snapshot)
    if any(record.note is not None for record in snapshot.steps):
        return []
    actions = {step: react_action(text) for step, text in rollout.outputs.items()}
    steps = [dataclasses.replace(record, action=actions[record.step]) for record in snapshot.steps]
    return _examples(rollout, dataclasses.replace(snapshot, steps=steps), student, tools, actions)


def react_action(guided: str) -> str:
    """A guided action in the react policy's format, as its constrained decoder writes JSON: a call becomes a
    one-call ``tool_calls`` list, an answer keeps its text; each with a short thought."""
    try:
        action = json.loads(guided)
    except json.JSONDecodeError:
        raise ExampleError(f"the action {guided[:80]!r} is not JSON") from None
    if isinstance(action, dict) and isinstance(action.get("final_answer"), str):
        return dumps({"thought": "The observation answers the question.", "final_answer": action["final_answer"]})
    if isinstance(action, dict) and isinstance(action.get("tool"), str) and isinstance(action.get("arguments"), dict):
        call = {"tool": action["tool"], "arguments": action["arguments"]}
        return dumps({"thought": f"I look it up with {action['tool']}.", "tool_calls": [call]})
    raise ExampleError(f"the action {guided[:80]!r} is neither a tool call nor a final answer")


def _examples(
    rollout: Rollout,
    snapshot: RunSnapshot,
    definition: AgentDefinition,
    tools: Sequence[ToolSpec],
    completions: Mapping[int, str],
) -> list[StepExample]:
    if definition.policy not in REPLAYABLE_POLICIES:
        raise ExampleError(
            f"agent {snapshot.agent.name!r} runs the {definition.policy} policy, whose prompts cannot be rebuilt "
            f"from a finished run; train an agent whose policy is one of {', '.join(REPLAYABLE_POLICIES)}"
        )
    policy = POLICIES[definition.policy](definition.policy_options)
    context = Context(
        definition.instructions,
        [tool for tool in tools if definition.allows(tool.name)],
        definition.examples,
        definition.builtin_examples,
    )
    examples = []
    for step, completion in sorted(completions.items()):
        before = dataclasses.replace(
            snapshot,
            step=step,
            steps=[record for record in snapshot.steps if record.step < step],
            memory=copy.deepcopy(snapshot.memory),  # the policy may write to it; the nonce is what it reads
        )
        request = policy.request(before, context)
        examples.append(StepExample(rollout.task_id, rollout.run_id, step, request.messages, completion))
    return examples


def tools_to_json(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(tool) for tool in tools]


def tools_from_json(data: Sequence[Mapping[str, Any]]) -> list[ToolSpec]:
    return [ToolSpec(**tool) for tool in data]

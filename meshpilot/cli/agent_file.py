"""The agent definition file (YAML) users write, and its mapping to and from the AgentService's AgentSpec."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf import duration_pb2, json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshpilot.planner.v1 import agents_pb2
from services.common.json_values import plain_numbers


class AgentFileError(Exception):
    """The file cannot be read or does not define an agent; the message names the file and the field."""


class _Strict(BaseModel):
    # A misspelt key must fail, not be ignored: `max_step: 3` silently running with the default would be worse.
    model_config = ConfigDict(extra="forbid")


class PolicyFile(_Strict):
    """How the agent decides its next step; zeros select the planner's defaults."""

    name: Literal["guided", "react", "plan_execute"] | None = Field(
        None,
        description="guided (small models), react (reason, then tool calls or an answer) or plan_execute; "
        "unset selects the planner's default.",
    )
    max_parallel_tool_calls: int = Field(0, ge=0, description="react / plan_execute: most tool calls in one step.")
    max_plan_steps: int = Field(0, ge=0, description="plan_execute: most steps of a plan.")
    max_replans: int = Field(0, ge=0, description="plan_execute: how often a failed step may trigger a new plan.")


class BudgetFile(_Strict):
    """Default limits of the agent's runs; zeros select the planner's defaults, a run's own budget overrides them."""

    max_steps: int = Field(0, ge=0, description="Most agent steps (model calls).")
    max_tokens: int = Field(0, ge=0, description="Most tokens over all model calls (prompt + completion).")
    timeout_seconds: float = Field(0.0, ge=0, description="Wall-clock limit of a run.")


class SamplingFile(_Strict):
    """Sampling of every model call of the agent's runs."""

    temperature: float = Field(0.0, ge=0, description="0 is greedy.")
    top_p: float = Field(0.0, ge=0, le=1, description="Nucleus mass; 0 selects 1.")
    seed: int | None = Field(None, ge=0, description="Reproducible sampling when set.")
    step_max_tokens: int = Field(0, ge=0, description="max_tokens of each model call; 0 selects the default.")


class ExampleFile(_Strict):
    """A worked example shown to the model: a task and the tool call that starts it (the planner checks the tool and
    the arguments against its schema); optionally the tool's result and the answer taken from it."""

    task: str = Field(min_length=1, description="The question the example answers.")
    tool: str = Field(min_length=1, description="A tool the agent may call.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Its arguments, as the tool's schema wants.")
    observation: Any = Field(None, description="The tool's result as the model would see it; unset: not shown.")
    answer: str = Field("", description="The final answer taken from the observation; empty: not shown.")


class AgentFile(_Strict):
    """One agent definition as a user writes it (see deploy/agents/geo-react.yaml)."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9-]{0,62}$",
        description="Lowercase letters, digits and '-', starting with a letter, at most 63 characters.",
    )
    instructions: str = Field(min_length=1, description="The system prompt: who the agent is and how it works.")
    model: str = Field("", description="A model id of the inference service; empty selects its default model.")
    tools: list[str] = Field(default_factory=list, description='Tools the agent may call; ["*"] allows every tool.')
    approval_required: list[str] = Field(default_factory=list, description="Tools whose calls wait for a human.")
    policy: PolicyFile = PolicyFile()
    budget: BudgetFile = BudgetFile()
    sampling: SamplingFile = SamplingFile()
    history_turns: int | None = Field(None, ge=0, description="Earlier turns shown to the model; unset: default.")
    examples: list[ExampleFile] = Field(default_factory=list, description="Worked examples of the agent's tools.")
    builtin_examples: bool | None = Field(
        None, description="Whether the planner's built-in worked examples follow the agent's; unset: yes."
    )

    def to_spec(self) -> agents_pb2.AgentSpec:
        """The AgentSpec this file defines (the name travels next to it in the request)."""
        spec = agents_pb2.AgentSpec(
            instructions=self.instructions,
            model=self.model,
            tools=self.tools,
            approval_required=self.approval_required,
            policy=agents_pb2.PolicySpec(
                name=self.policy.name or "",
                max_parallel_tool_calls=self.policy.max_parallel_tool_calls,
                max_plan_steps=self.policy.max_plan_steps,
                max_replans=self.policy.max_replans,
            ),
            budget=agents_pb2.AgentBudget(max_steps=self.budget.max_steps, max_tokens=self.budget.max_tokens),
            sampling=agents_pb2.AgentSampling(**self.sampling.model_dump(exclude_none=True)),
        )
        if self.budget.timeout_seconds:
            spec.budget.timeout.CopyFrom(_duration(self.budget.timeout_seconds))
        if self.history_turns is not None:
            spec.history_turns = self.history_turns
        if self.builtin_examples is not None:
            spec.builtin_examples = self.builtin_examples
        for example in self.examples:
            item = spec.examples.add(task=example.task, tool=example.tool, answer=example.answer)
            item.arguments.update(example.arguments)
            if example.observation is not None:
                json_format.ParseDict(example.observation, item.observation)
        return spec

    @classmethod
    def from_agent(cls, agent: agents_pb2.Agent) -> AgentFile:
        """The file that defines ``agent`` (what `agents get` prints, ready to edit and `agents update -f`)."""
        spec = agent.spec
        return cls(
            name=agent.name,
            instructions=spec.instructions,
            model=spec.model,
            tools=list(spec.tools),
            approval_required=list(spec.approval_required),
            policy=PolicyFile.model_validate(
                {
                    "name": spec.policy.name or None,
                    "max_parallel_tool_calls": spec.policy.max_parallel_tool_calls,
                    "max_plan_steps": spec.policy.max_plan_steps,
                    "max_replans": spec.policy.max_replans,
                }
            ),
            budget=BudgetFile(
                max_steps=spec.budget.max_steps,
                max_tokens=spec.budget.max_tokens,
                timeout_seconds=spec.budget.timeout.ToTimedelta().total_seconds(),
            ),
            sampling=SamplingFile(
                temperature=round(spec.sampling.temperature, 6),  # float32 on the wire: 0.7 comes back 0.699999988
                top_p=round(spec.sampling.top_p, 6),
                seed=spec.sampling.seed if spec.sampling.HasField("seed") else None,
                step_max_tokens=spec.sampling.step_max_tokens,
            ),
            history_turns=spec.history_turns if spec.HasField("history_turns") else None,
            examples=[
                ExampleFile(
                    task=example.task,
                    tool=example.tool,
                    arguments=plain_numbers(json_format.MessageToDict(example.arguments)),
                    observation=(
                        plain_numbers(json_format.MessageToDict(example.observation))
                        if example.HasField("observation")
                        else None
                    ),
                    answer=example.answer,
                )
                for example in spec.examples
            ],
            builtin_examples=spec.builtin_examples if spec.HasField("builtin_examples") else None,
        )

    def to_yaml(self) -> str:
        """The definition as YAML in the file's own format (unset optional fields and no examples left out)."""
        data = self.model_dump(exclude_none=True)
        if not self.examples:
            del data["examples"]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


def parse_agent_file(text: str, source: str = "agent file") -> AgentFile:
    """Parses YAML ``text``; raises AgentFileError naming ``source`` and every bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AgentFileError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise AgentFileError(f"{source}: expected a mapping of agent fields (name, instructions, ...)")
    try:
        return AgentFile.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(str(part) for part in error['loc'])}': {error['msg']}" for error in e.errors()
        )
        raise AgentFileError(f"{source}: {problems}") from e


def load_agent_file(path: Path) -> AgentFile:
    """Reads and parses the agent file at ``path``; raises AgentFileError when it cannot."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AgentFileError(f"{path}: cannot read: {e.strerror}") from e
    return parse_agent_file(text, str(path))


def agent_summary(agent: agents_pb2.Agent) -> dict[str, Any]:
    """One row of `agents list`: the fields a reader scans for."""
    return {
        "name": agent.name,
        "version": agent.version,
        "policy": agent.spec.policy.name or "(default)",
        "model": agent.spec.model or "(default)",
        "tools": ", ".join(agent.spec.tools) or "(none)",
        "builtin": agent.builtin,
    }

"""Agents as data: a versioned definition (instructions, model, tools, policy, budgets, sampling) that runs name."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from services.common import InvalidArgumentError, NotFoundError, PlannerConfig
from services.planner.policies import POLICIES, PolicyOptions
from services.planner.prompt import DEFAULT_INSTRUCTIONS
from services.planner.store import DEFAULT_TENANT, AgentRecord, JournalStore, shown
from services.planner.types import AgentExample, Budget, Sampling, ToolSpec

DEFAULT_AGENT = "default"
ALL_TOOLS = "*"
# "time.*" in an agent's tools allows every tool of the MCP server named time, including tools it adds later.
SERVER_TOOLS = ".*"
AGENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_INSTRUCTIONS_CHARS = 8000
MAX_TOOLS = 128
MAX_EXAMPLES = 8
MAX_EXAMPLE_TEXT_CHARS = 500
# An example's arguments and observation, as compact JSON: what fits a small model's context next to the task.
MAX_EXAMPLE_JSON_CHARS = 2000
# Bounds of the numbers in a definition: (field, low, high); 0 always means "the default".
LIMITS: tuple[tuple[str, float, float], ...] = (
    ("policy.max_parallel_tool_calls", 0, 16),
    ("policy.max_plan_steps", 0, 20),
    ("policy.max_replans", 0, 10),
    ("budget.max_steps", 0, 100),
    ("budget.max_tokens", 0, 1_000_000),
    ("budget.timeout_seconds", 0, 86_400),
    ("sampling.temperature", 0, 2),
    ("sampling.top_p", 0, 1),
    ("sampling.step_max_tokens", 0, 8192),
    ("history_turns", 0, 100),
)


@dataclass(frozen=True)
class AgentDefinition:
    """What an agent is. Budget fields of 0 and ``None`` for step_max_tokens / history_turns take the planner's
    defaults at run time, so a definition stays valid when an operator changes them."""

    instructions: str
    model: str = ""
    tools: tuple[str, ...] = (ALL_TOOLS,)
    approval_required: tuple[str, ...] = ()
    policy: str = "guided"
    policy_options: PolicyOptions = field(default_factory=PolicyOptions)
    max_steps: int = 0
    max_tokens: int = 0
    timeout_seconds: float = 0.0
    sampling: Sampling = field(default_factory=Sampling)
    step_max_tokens: int = 0
    history_turns: int | None = None
    examples: tuple[AgentExample, ...] = ()
    builtin_examples: bool = True  # the planner's own worked examples follow the agent's in the prompt

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tools"], data["approval_required"] = list(self.tools), list(self.approval_required)
        data["examples"] = [asdict(example) for example in self.examples]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentDefinition:
        return cls(
            **{
                **data,
                "tools": tuple(data["tools"]),
                "approval_required": tuple(data["approval_required"]),
                "policy_options": PolicyOptions(**data["policy_options"]),
                "sampling": Sampling(**data["sampling"]),
                # Definitions stored before examples existed have none.
                "examples": tuple(AgentExample(**example) for example in data.get("examples", ())),
            }
        )

    def allows(self, tool: str) -> bool:
        """Whether ``tool`` is listed: by name, by "*", or by its MCP server as "server.*"."""
        server, dot, _ = tool.partition(".")
        return ALL_TOOLS in self.tools or tool in self.tools or (bool(dot) and server + SERVER_TOOLS in self.tools)

    def budget(self, defaults: PlannerConfig) -> Budget:
        """The agent's run budget with the planner's defaults filled in."""
        return Budget(
            max_steps=self.max_steps or defaults.max_steps,
            max_tokens=self.max_tokens or defaults.max_tokens,
            timeout_s=self.timeout_seconds or defaults.run_timeout_seconds,
        )


@dataclass(frozen=True)
class Agent:
    """One version of an agent."""

    name: str
    version: int
    definition: AgentDefinition
    create_time: float = 0.0
    builtin: bool = False


def default_agent(config: PlannerConfig) -> Agent:
    """The built-in agent: ``planner.default_agent_tools``, the guided policy unless ``planner.guided`` is off."""
    definition = AgentDefinition(
        instructions=DEFAULT_INSTRUCTIONS,
        tools=tuple(config.default_agent_tools),
        policy="guided" if config.guided else "react",
    )
    return Agent(DEFAULT_AGENT, 1, definition, builtin=True)


def _check_examples(definition: AgentDefinition, tools: dict[str, ToolSpec]) -> None:
    """Each example names a tool the agent may call, with arguments its schema accepts, in bounded text."""
    if len(definition.examples) > MAX_EXAMPLES:
        raise InvalidArgumentError(f"spec.examples has {len(definition.examples)} examples; at most {MAX_EXAMPLES}")
    for index, example in enumerate(definition.examples):
        where = f"spec.examples[{index}]"
        if not example.task.strip():
            raise InvalidArgumentError(f"{where}.task is empty; write the question the example answers")
        for name in ("task", "answer"):
            text = getattr(example, name)
            if len(text) > MAX_EXAMPLE_TEXT_CHARS:
                raise InvalidArgumentError(
                    f"{where}.{name} has {len(text)} characters; shorten it to {MAX_EXAMPLE_TEXT_CHARS}"
                )
        tool = tools.get(example.tool)
        if tool is None or not definition.allows(example.tool):
            raise InvalidArgumentError(
                f"{where}.tool {shown(example.tool)} is not a registered tool this agent may call (spec.tools)"
            )
        for name in ("arguments", "observation"):
            size = len(json.dumps(getattr(example, name), ensure_ascii=False))
            if size > MAX_EXAMPLE_JSON_CHARS:
                raise InvalidArgumentError(
                    f"{where}.{name} is {size} characters of JSON; shorten it to {MAX_EXAMPLE_JSON_CHARS}"
                )
        error = best_match(
            jsonschema.validators.validator_for(tool.input_schema)(tool.input_schema).iter_errors(example.arguments)
        )
        if error is not None:
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise InvalidArgumentError(
                f"{where}.arguments{path} does not fit tool {example.tool!r}: {error.message[:200]}"
            )


def check_definition(
    name: str, definition: AgentDefinition, tools: Sequence[ToolSpec], models: Sequence[str]
) -> AgentDefinition:
    """The definition with options defaulted, or InvalidArgumentError naming the first bad field and what to change."""
    if not AGENT_NAME.match(name):
        raise InvalidArgumentError(
            f"name {shown(name)} must be lowercase letters, digits and '-', start with a letter, at most 63 characters"
        )
    if not definition.instructions.strip():
        raise InvalidArgumentError("spec.instructions is empty; say who the agent is and how it should work")
    if len(definition.instructions) > MAX_INSTRUCTIONS_CHARS:
        raise InvalidArgumentError(
            f"spec.instructions has {len(definition.instructions)} characters; shorten it to {MAX_INSTRUCTIONS_CHARS}"
        )
    if definition.model and definition.model not in models:
        raise InvalidArgumentError(
            f"spec.model {shown(definition.model)} is not served; use one of: {', '.join(models) or 'none'} "
            "(or leave it empty for the default)"
        )
    known = {tool.name for tool in tools}
    servers = {name.partition(".")[0] + SERVER_TOOLS for name in known if "." in name}
    for field_name in ("tools", "approval_required"):
        names: tuple[str, ...] = getattr(definition, field_name)
        if len(names) > MAX_TOOLS:
            raise InvalidArgumentError(f"spec.{field_name} lists {len(names)} tools; at most {MAX_TOOLS}")
        patterns = {ALL_TOOLS, *servers} if field_name == "tools" else set()
        for index, tool in enumerate(names):
            if tool not in known and tool not in patterns:
                raise InvalidArgumentError(
                    f"spec.{field_name}[{index}]: unknown tool {shown(tool)}; registered tools: "
                    f"{', '.join(sorted(known)) or 'none'}"
                    + (' (or "*" for all, "server.*" for all of an MCP server\'s)' if field_name == "tools" else "")
                )
    _check_examples(definition, {tool.name: tool for tool in tools})
    if definition.policy not in POLICIES:
        raise InvalidArgumentError(
            f"spec.policy.name {shown(definition.policy)} is not a policy; choose one of: {', '.join(POLICIES)}"
        )
    values = {
        "policy.max_parallel_tool_calls": definition.policy_options.max_parallel_tool_calls,
        "policy.max_plan_steps": definition.policy_options.max_plan_steps,
        "policy.max_replans": definition.policy_options.max_replans,
        "budget.max_steps": definition.max_steps,
        "budget.max_tokens": definition.max_tokens,
        "budget.timeout_seconds": definition.timeout_seconds,
        "sampling.temperature": definition.sampling.temperature,
        "sampling.top_p": definition.sampling.top_p,
        "sampling.step_max_tokens": definition.step_max_tokens,
        "history_turns": definition.history_turns or 0,
    }
    for path, low, high in LIMITS:
        value = values[path]
        if not low <= value <= high:  # also refuses NaN
            raise InvalidArgumentError(
                f"spec.{path} is {_number(value)}; use a value from {_number(low)} to {_number(high)}"
            )
    defaults = PolicyOptions()
    options = definition.policy_options
    return replace(
        definition,
        policy_options=PolicyOptions(
            options.max_parallel_tool_calls or defaults.max_parallel_tool_calls,
            options.max_plan_steps or defaults.max_plan_steps,
            options.max_replans or defaults.max_replans,
        ),
        sampling=replace(definition.sampling, top_p=definition.sampling.top_p or 1.0),
    )


class AgentCatalog:
    """The agents of this planner: the built-in default (every tenant's) plus those each tenant stored. Definitions
    are checked against the tools and models the mesh serves right now (``list_tools`` / ``list_models``), so a typo
    fails at creation, not mid-run. ``tenant`` is the caller's: another tenant's agents are NOT_FOUND."""

    def __init__(
        self,
        store: JournalStore,
        defaults: PlannerConfig,
        list_tools: Callable[[], Awaitable[list[ToolSpec]]],
        list_models: Callable[[], Awaitable[list[str]]],
    ) -> None:
        self.store = store
        self.defaults = defaults
        self.builtin = default_agent(defaults)
        self._list_tools = list_tools
        self._list_models = list_models

    async def _checked(self, name: str, definition: AgentDefinition) -> AgentDefinition:
        if name == self.builtin.name:
            raise InvalidArgumentError(f"name {name!r} is the built-in agent's; pick another name")
        models = await self._list_models() if definition.model else []
        return check_definition(name, definition, await self._list_tools(), models)

    async def create(self, name: str, definition: AgentDefinition, *, tenant: str = DEFAULT_TENANT) -> Agent:
        definition = await self._checked(name, definition)
        return _agent(await self.store.add_agent_version(name, definition.to_dict(), new=True, tenant=tenant))

    async def update(self, name: str, definition: AgentDefinition, *, tenant: str = DEFAULT_TENANT) -> Agent:
        definition = await self._checked(name, definition)
        return _agent(await self.store.add_agent_version(name, definition.to_dict(), new=False, tenant=tenant))

    async def get(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> Agent:
        """The agent (0: its latest version); the empty name is the built-in agent."""
        if version < 0:
            raise InvalidArgumentError(f"version is {version}; use 1, 2, ... or 0 for the latest")
        if name in ("", self.builtin.name):
            if version not in (0, self.builtin.version):
                raise NotFoundError(f"the built-in agent has only version {self.builtin.version}")
            return self.builtin
        return _agent(await self.store.get_agent(name, version, tenant=tenant))

    async def list(self, *, tenant: str = DEFAULT_TENANT) -> list[Agent]:
        return [self.builtin, *(_agent(record) for record in await self.store.list_agents(tenant=tenant))]

    async def delete(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        if name == self.builtin.name:
            raise InvalidArgumentError("the built-in agent cannot be deleted")
        await self.store.delete_agent(name, tenant=tenant)


def _number(value: float) -> str:
    """``value`` as a person wrote it: whole numbers in full (``:g`` shows 1000001 as "1e+06"), else 7 digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.7g}"


def _agent(record: AgentRecord) -> Agent:
    return Agent(record.name, record.version, AgentDefinition.from_dict(record.spec), record.create_time)

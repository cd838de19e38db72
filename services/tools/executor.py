"""The core of ExecuteTool: approval checks, then runs that are idempotent under a key and outlive their caller."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.common import ConfigError, FailedPreconditionError, InvalidArgumentError
from services.common.approval import ApprovalSigner, arguments_digest
from services.tools.idempotency import MAX_KEY_CHARS, IdempotencyStore
from services.tools.registry import Tool, ToolCallError, ToolErrorKind, ToolOutcome, ToolRegistry


@dataclass(frozen=True)
class ToolCall:
    """One ExecuteTool request: the tool, its arguments and what makes the call safe to repeat and allowed to run.

    ``timeout_seconds`` None selects the tool's default; an empty ``idempotency_key`` runs the call every time.
    """

    name: str
    arguments: dict[str, Any] | None = None
    call_id: str = ""
    run_id: str = ""
    timeout_seconds: float | None = None
    idempotency_key: str = ""
    approval_token: str = ""
    tenant: str = "default"


@dataclass(frozen=True)
class Execution:
    """What a call returned; ``replayed``: the outcome belongs to an earlier call under the same key (no run now)."""

    outcome: ToolOutcome
    replayed: bool = False


@dataclass(frozen=True)
class _Running:
    tool: str
    digest: str
    task: asyncio.Task[Execution]


def interrupted_outcome(tool: str, key: str) -> ToolOutcome:
    """The error observation of a call whose earlier run under ``key`` never recorded an outcome."""
    return ToolOutcome(
        name=tool,
        duration_seconds=0.0,
        error=ToolCallError(
            ToolErrorKind.FAILED,
            f"an earlier call of tool {tool!r} with idempotency key {key!r} was interrupted (the tools service "
            "stopped while it ran), so whether it took effect is unknown; it is not run again. Check its effect "
            "and call again with a new key if it is still needed",
        ),
    )


class ToolExecutor:
    """Runs a registry's tools for ExecuteTool: validation, approval, then the run (idempotent with a key).

    ``execute`` raises before anything runs or is stored: NotFoundError (unknown tool), InvalidArgumentError
    (arguments that break the schema, a negative timeout, a key over 128 characters), PermissionDeniedError (a tool
    that requires approval without a token approving exactly this call; checked on replays too) and
    FailedPreconditionError (a key already used for another tool or other arguments). Otherwise it returns the
    outcome, a tool's failure included; see ``services.tools.idempotency`` for what a key guarantees.

    A tool requires approval when its definition says so or ``approval_required`` names it: a registered tool, or
    <source>.<tool> / <source>.* of a tool source in ``sources`` (MCP servers and OpenAPI documents, whose tools
    appear later). Any other name raises ConfigError, so a typo cannot leave a tool unguarded.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        store: IdempotencyStore,
        signer: ApprovalSigner,
        approval_required: Iterable[str] = (),
        sources: Iterable[str] = (),
        scoped: Callable[[str], ToolRegistry | None] = lambda tenant: None,
    ) -> None:
        marked = list(approval_required)
        declared = set(sources)
        unknown = [name for name in marked if name not in registry and name.partition(".")[0] not in declared]
        if unknown:
            available = ", ".join(tool.name for tool in registry.list()) or "none"
            patterns = ", ".join(f"{source}.*" for source in sorted(declared))
            raise ConfigError(
                f"tools.approval_required names {', '.join(map(repr, unknown))}, which no registered tool is called; "
                f"registered tools: {available}" + (f"; tools of sources: {patterns}" if patterns else "")
            )
        self.registry = registry
        self.store = store
        self.signer = signer
        self._marked = set(marked)
        self._scoped = scoped
        self._running: dict[str, _Running] = {}

    def tools(self, tenant: str = "default") -> list[Tool]:
        """The tools ``tenant`` may call (every tenant's, then its own sources'), ``requires_approval`` set for those
        the configuration marks too."""
        scoped = self._scoped(tenant)
        tools = self.registry.list() + (scoped.list() if scoped is not None else [])
        return [
            dataclasses.replace(tool, requires_approval=True) if self._marked_for_approval(tool.name) else tool
            for tool in tools
        ]

    def registry_for(self, tenant: str, name: str) -> ToolRegistry:
        """The registry that holds the tool ``name`` for ``tenant``: its own sources' first, then everyone's."""
        scoped = self._scoped(tenant)
        return scoped if scoped is not None and name in scoped else self.registry

    def requires_approval(self, name: str, tenant: str = "default") -> bool:
        """Whether the tool ``name`` runs only with an approval token; NotFoundError if the tenant has none."""
        tool = self.registry_for(tenant, name).get(name)
        return tool.requires_approval or self._marked_for_approval(name)

    def _marked_for_approval(self, name: str) -> bool:
        source, dot, _ = name.partition(".")
        return name in self._marked or (bool(dot) and f"{source}.*" in self._marked)

    async def execute(self, call: ToolCall) -> Execution:
        """Validates and authorises ``call``, then runs it or returns the outcome stored under its key."""
        key = call.idempotency_key
        if len(key) > MAX_KEY_CHARS:
            raise InvalidArgumentError(
                f"idempotency_key is {len(key)} characters long; use at most {MAX_KEY_CHARS} (a UUID fits)"
            )
        registry = self.registry_for(call.tenant, call.name)
        tool, arguments = registry.validate(call.name, call.arguments)
        limit = registry.effective_timeout(tool, call.timeout_seconds)
        if tool.requires_approval or self._marked_for_approval(tool.name):
            self.signer.verify(
                call.approval_token, run_id=call.run_id, call_id=call.call_id, tool=tool.name, arguments=arguments
            )
        if not key:
            return Execution(await registry.run(tool, arguments, limit))
        return await self._execute_keyed(key, tool, arguments, limit)

    async def _execute_keyed(self, key: str, tool: Tool, arguments: dict[str, Any], limit: float) -> Execution:
        digest = arguments_digest(arguments)
        running = self._running.get(key)
        joined = running is not None
        if running is None:
            # Registered before the first await, so a concurrent call with the key joins this run instead of
            # finding the started row and taking the run for an interrupted one.
            task = asyncio.create_task(self._claim_and_run(key, tool, arguments, digest, limit))
            running = self._running[key] = _Running(tool.name, digest, task)
            task.add_done_callback(lambda _: self._forget(key, task))
        else:
            _check_same_call(key, running.tool, running.digest, tool.name, digest)
        # Shielded: a caller that disconnects (or a planner killed mid-call) must not cancel the run, or its outcome
        # would never be stored and the retry would find an interrupted call instead.
        execution = await asyncio.shield(running.task)
        return dataclasses.replace(execution, replayed=True) if joined else execution

    def _forget(self, key: str, task: asyncio.Task[Execution]) -> None:
        running = self._running.get(key)
        if running is not None and running.task is task:
            del self._running[key]

    async def _claim_and_run(
        self, key: str, tool: Tool, arguments: dict[str, Any], digest: str, limit: float
    ) -> Execution:
        stored = await self.store.claim(key, tool.name, digest)
        if stored is not None:
            _check_same_call(key, stored.tool, stored.arguments_digest, tool.name, digest)
            if stored.outcome is not None or not tool.idempotent:
                return Execution(stored.outcome or interrupted_outcome(tool.name, key), replayed=True)
            # Interrupted, but the tool only reads: run it again under the same key.
        outcome = await self.registry.run(tool, arguments, limit)
        await self.store.record(key, outcome)
        return Execution(outcome)

    async def close(self) -> None:
        """Lets keyed runs still going finish (each within its time limit) and store their outcomes, then closes."""
        if self._running:
            await asyncio.wait([running.task for running in self._running.values()])
        await self.store.close()


def _check_same_call(key: str, used_tool: str, used_digest: str, tool: str, digest: str) -> None:
    if used_tool != tool:
        raise FailedPreconditionError(
            f"idempotency key {key!r} was used for another call (of tool {used_tool!r}); use a new key for a new call"
        )
    if used_digest != digest:
        raise FailedPreconditionError(
            f"idempotency key {key!r} was used for another call (tool {tool!r} with other arguments); "
            "use a new key for a new call"
        )

"""The tool registry: tools described by JSON Schema, arguments validated before anything runs, failures as observations."""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from services.common import InvalidArgumentError, NotFoundError
from services.common.errors import quoted
from services.common.json_values import plain_numbers

log = logging.getLogger(__name__)

ToolHandler = Callable[[dict[str, Any]], Awaitable[Any]]

# An optional "server." prefix namespaces the tools of an MCP server (time.get_current_time); built-ins have none.
TOOL_NAME_PATTERN = re.compile(r"^[a-z](?:[a-z0-9_]{0,30}\.[a-z])?[a-z0-9_]{0,63}$")
# A result larger than this is refused: it would swamp a small model's context and the journal.
MAX_RESULT_BYTES = 1024 * 1024
_MAX_MESSAGE_CHARS = 300
_MAX_VALUE_CHARS = 60
# How long a timed-out handler gets to unwind after cancellation before the call returns regardless.
_CANCEL_GRACE_SECONDS = 1.0


class ToolDefinitionError(ValueError):
    """A tool cannot be registered: the message names the tool and what to change in its definition."""


class ToolNameTakenError(ToolDefinitionError):
    """A tool of that name is already registered."""


class ToolFailure(Exception):
    """Raised by a handler to fail with a message meant for the agent (it becomes the error observation verbatim)."""


class ToolErrorKind(enum.Enum):
    """Why a call produced an error observation instead of a result."""

    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class ToolCallError:
    """The error observation of a failed call: what the agent reads instead of a result."""

    kind: ToolErrorKind
    message: str


@dataclass(frozen=True)
class ToolOutcome:
    """What one call produced: exactly one of ``result`` (a JSON value) or ``error``, and how long it took."""

    name: str
    duration_seconds: float
    result: Any = None
    error: ToolCallError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Tool:
    """A tool an agent can call.

    ``handler`` receives the validated arguments (a dict) and returns a JSON-serialisable value; it raises
    ``ToolFailure`` to fail with a message for the agent. ``timeout_seconds`` is its default limit (None: the
    registry's default); ``requires_approval`` asks the planner to get a human's consent before running it.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    timeout_seconds: float | None = None
    requires_approval: bool = False
    idempotent: bool = False
    """Running it again with the same arguments does no harm (it only reads): a keyed call interrupted by a crash of
    the tools service is run again instead of reported as of unknown effect."""


def _json_path(path: Iterable[Any]) -> str:
    text = "arguments"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _describe(error: ValidationError) -> str:
    """jsonschema's message with a long offending value cut short, so what is wrong with it stays readable."""
    shown = repr(error.instance)
    message = error.message
    if len(shown) > _MAX_VALUE_CHARS:
        message = message.replace(shown, shown[: _MAX_VALUE_CHARS - 3] + "...")
    return _shorten(message)


def _is_async_callable(handler: object) -> bool:
    # An object with an async __call__ is a handler too.
    call = type(handler).__dict__.get("__call__") if callable(handler) else None
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def _to_json_value(value: Any) -> Any:
    """The value as plain JSON (dicts with str keys, lists, str, finite numbers, bool, None); ValueError otherwise."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from e
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ValueError(f"it is {len(text.encode())} bytes of JSON, more than the {MAX_RESULT_BYTES} allowed")
    return json.loads(text)


class ToolRegistry:
    """The tools a service offers, by name, in registration order.

    ``execute`` raises NotFoundError (unknown tool) or InvalidArgumentError (arguments that break the schema, or a
    bad timeout) before running anything; once a tool runs, every failure comes back as an error observation in the
    ToolOutcome, never as an exception.
    """

    def __init__(self, *, default_timeout_seconds: float = 10.0, max_timeout_seconds: float = 60.0) -> None:
        if default_timeout_seconds <= 0 or max_timeout_seconds <= 0:
            raise ValueError("tool timeouts must be positive")
        self.default_timeout_seconds = min(default_timeout_seconds, max_timeout_seconds)
        self.max_timeout_seconds = max_timeout_seconds
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    def register(self, tool: Tool) -> Tool:
        """Adds ``tool``; raises ToolDefinitionError for a bad or duplicate name, an invalid schema or a sync handler."""
        if not TOOL_NAME_PATTERN.match(tool.name):
            raise ToolDefinitionError(
                f"tool name {tool.name!r} must match {TOOL_NAME_PATTERN.pattern} "
                "(lowercase letters, digits and underscores, starting with a letter, at most 64 characters, "
                "after an optional 'server.' prefix)"
            )
        if tool.name in self._tools:
            raise ToolNameTakenError(f"a tool named {tool.name!r} is already registered; pick another name")
        if not tool.description.strip():
            raise ToolDefinitionError(f"tool {tool.name!r} needs a description: the agent chooses tools by it")
        if not isinstance(tool.input_schema, dict) or tool.input_schema.get("type") != "object":
            raise ToolDefinitionError(f"tool {tool.name!r}: input_schema must be a JSON Schema of type 'object'")
        validator_class = jsonschema.validators.validator_for(
            tool.input_schema, default=jsonschema.Draft202012Validator
        )
        try:
            validator_class.check_schema(tool.input_schema)
        except SchemaError as e:
            path = "/".join(map(str, e.path)) or "(root)"
            raise ToolDefinitionError(
                f"tool {tool.name!r}: input_schema is not a valid JSON Schema at {path}: {e.message}"
            ) from e
        if not _is_async_callable(tool.handler):
            raise ToolDefinitionError(f"tool {tool.name!r}: handler must be an async function")
        if tool.timeout_seconds is not None and tool.timeout_seconds <= 0:
            raise ToolDefinitionError(f"tool {tool.name!r}: timeout_seconds must be positive")
        self._validators[tool.name] = validator_class(tool.input_schema)
        self._tools[tool.name] = tool
        return tool

    def unregister(self, name: str) -> Tool:
        """Removes the tool called ``name`` (calls already running finish); NotFoundError when there is none."""
        tool = self.get(name)
        del self._tools[name]
        del self._validators[name]
        return tool

    def list(self) -> list[Tool]:
        """The registered tools in registration order."""
        return list(self._tools.values())

    def get(self, name: str) -> Tool:
        """The tool called ``name``; NotFoundError listing the available tools otherwise."""
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self._tools) or "none"
            raise NotFoundError(f"unknown tool {quoted(name)}; available tools: {available}")
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def validate(self, name: str, arguments: dict[str, Any] | None) -> tuple[Tool, dict[str, Any]]:
        """The tool and its normalised arguments; NotFoundError or InvalidArgumentError (naming the JSON path)."""
        tool = self.get(name)
        arguments = plain_numbers(arguments if arguments is not None else {})
        error: ValidationError | None = best_match(self._validators[name].iter_errors(arguments))
        if error is not None:
            raise InvalidArgumentError(
                f"invalid arguments for tool {name!r}: {_json_path(error.absolute_path)}: {_describe(error)}"
            )
        return tool, arguments

    def effective_timeout(self, tool: Tool, timeout_seconds: float | None) -> float:
        """The caller's limit (else the tool's, else the default), capped at the registry maximum."""
        if timeout_seconds is not None and (math.isnan(timeout_seconds) or timeout_seconds < 0):
            raise InvalidArgumentError(
                f"timeout must be positive (got {timeout_seconds}s); leave it unset for the default"
            )
        chosen = timeout_seconds or tool.timeout_seconds or self.default_timeout_seconds
        return min(chosen, self.max_timeout_seconds)

    async def execute(
        self, name: str, arguments: dict[str, Any] | None = None, timeout_seconds: float | None = None
    ) -> ToolOutcome:
        """Validates, then runs the tool within its time limit; see the class docstring for what raises."""
        tool, arguments = self.validate(name, arguments)
        return await self.run(tool, arguments, self.effective_timeout(tool, timeout_seconds))

    async def run(self, tool: Tool, arguments: dict[str, Any], limit: float) -> ToolOutcome:
        """Runs ``tool`` on arguments ``validate`` returned, within ``limit`` seconds; its failures become the outcome.

        Cancelling the caller cancels the handler (a caller that must not cancel it shields this coroutine).
        """
        name = tool.name
        started = time.perf_counter()

        def outcome(result: Any = None, error: ToolCallError | None = None) -> ToolOutcome:
            return ToolOutcome(name=name, duration_seconds=time.perf_counter() - started, result=result, error=error)

        # asyncio.wait rather than wait_for: a TimeoutError the handler raises itself is its failure, not our limit.
        task = asyncio.ensure_future(tool.handler(arguments))
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=_CANCEL_GRACE_SECONDS)
            return outcome(
                error=ToolCallError(ToolErrorKind.TIMEOUT, f"tool {name!r} ran past its time limit of {limit:g}s")
            )
        try:
            raw = task.result()
        except ToolFailure as e:
            return outcome(error=ToolCallError(ToolErrorKind.FAILED, str(e) or f"tool {name!r} failed"))
        except asyncio.CancelledError:
            return outcome(error=ToolCallError(ToolErrorKind.FAILED, f"tool {name!r} was cancelled"))
        except Exception as e:
            log.warning("tool %s raised", name, exc_info=e)
            message = f"tool {name!r} failed: {type(e).__name__}: {_shorten(str(e))}"
            return outcome(error=ToolCallError(ToolErrorKind.FAILED, message))
        try:
            result = _to_json_value(raw)
        except ValueError as e:
            message = f"tool {name!r} returned a result that is not valid JSON ({_shorten(str(e))})"
            return outcome(error=ToolCallError(ToolErrorKind.FAILED, message))
        return outcome(result=result)

"""Checks of an agent's run against a task: contains, exact, numeric, an expected tool call, unanswerable."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

# What the agents say when the tools had nothing (the guided policy's own words first): "could not find" in any form,
# in English or Chinese (the suites ask in both).
_UNANSWERED = re.compile(
    r"could ?n[o']t find|cannot find|can't find|unable to find|no (?:such|answer|information|data)|do ?n[o']t know|"
    r"not (?:available|found|known)|there is no|does not exist|doesn't exist|could not (?:answer|determine)|"
    r"找不到|没有找到|无法找到|不知道",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call of a run: the tool, its arguments, the error it returned ("" when it returned a result), and
    whether it was ``rejected`` before running (a tool unknown or not the agent's, arguments its schema refuses)."""

    tool: str
    arguments: Mapping[str, Any]
    error: str = ""
    rejected: bool = False

    @property
    def valid(self) -> bool:
        """The call named one of the agent's tools with arguments the tool accepts (it may still have failed: "no
        country named Zorvania" is the right call for an unanswerable question)."""
        return not self.rejected


# How the planner and the tools service word a call refused before it ran (services/tools/registry.py, the
# executor's allow-list); the journal keeps only the text of a call's error.
_REJECTIONS = re.compile(r"^(?:unknown tool |invalid arguments for tool )|is not one of this agent's tools")


def is_rejection(error: str) -> bool:
    """Whether a tool call's error says the call was refused before it ran (not that the tool failed)."""
    return bool(_REJECTIONS.search(error))


@dataclass(frozen=True)
class Trajectory:
    """What one run of a task did: its answer, tool calls, steps, tokens and time; ``error`` ("CODE: message") when
    the run ended with an error instead of an answer. ``worker``: where the run was made from when not this process
    (``<Ray node id>/<pid>`` under ``--ray``)."""

    answer: str
    tool_calls: tuple[ToolCallRecord, ...] = ()
    steps: int = 0
    total_tokens: int = 0
    latency_s: float = 0.0
    error: str = ""
    run_id: str = ""
    worker: str = ""


@dataclass(frozen=True)
class CheckResult:
    """Whether one check passed, and why not in a few words (empty when it passed)."""

    kind: str
    passed: bool
    detail: str = ""


class Check(Protocol):
    """A judgement of a trajectory. ``to_json`` gives back the suite line's form (``{"type": kind, ...}``)."""

    kind: ClassVar[str]

    def evaluate(self, trajectory: Trajectory) -> CheckResult: ...
    def to_json(self) -> dict[str, Any]: ...


def normalize(text: str) -> str:
    """Case, width and accents folded and spaces collapsed, so "São Tomé" matches "sao tome"; CJK text is kept."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())


def _brief(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Contains:
    """The answer contains one of ``values`` (normalized)."""

    values: tuple[str, ...]
    kind: ClassVar[str] = "contains"

    def evaluate(self, trajectory: Trajectory) -> CheckResult:
        answer = normalize(trajectory.answer)
        if any(normalize(value) in answer for value in self.values):
            return CheckResult(self.kind, True)
        return CheckResult(self.kind, False, f"the answer does not contain {' or '.join(map(repr, self.values))}")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "values": list(self.values)}


@dataclass(frozen=True)
class Exact:
    """The whole answer is ``value`` (normalized, a final full stop ignored)."""

    value: str
    kind: ClassVar[str] = "exact"

    def evaluate(self, trajectory: Trajectory) -> CheckResult:
        if normalize(trajectory.answer).rstrip(".。") == normalize(self.value).rstrip(".。"):
            return CheckResult(self.kind, True)
        return CheckResult(self.kind, False, f"the answer is not exactly {self.value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}


@dataclass(frozen=True)
class Numeric:
    """A number in the answer is within ``tolerance`` of ``value`` (thousands separators allowed)."""

    value: float
    tolerance: float = 0.0
    kind: ClassVar[str] = "numeric"

    def evaluate(self, trajectory: Trajectory) -> CheckResult:
        numbers = [float(n.replace(",", "")) for n in _NUMBER.findall(trajectory.answer)]
        if any(abs(n - self.value) <= self.tolerance for n in numbers):
            return CheckResult(self.kind, True)
        return CheckResult(self.kind, False, f"no number within {self.tolerance:g} of {self.value:g} in the answer")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value, "tolerance": self.tolerance}


@dataclass(frozen=True)
class ToolCalled:
    """The run called ``tool`` with acceptable arguments: for each argument in ``arguments``, its value is one of the
    listed ones (the Berkeley Function Calling Leaderboard's form; a list holding "" marks an optional argument), and
    it passed no argument that is not listed."""

    tool: str
    arguments: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    kind: ClassVar[str] = "tool_call"

    def evaluate(self, trajectory: Trajectory) -> CheckResult:
        calls = [call for call in trajectory.tool_calls if call.tool == self.tool]
        if not calls:
            made = ", ".join(sorted({call.tool for call in trajectory.tool_calls})) or "none"
            return CheckResult(self.kind, False, f"{self.tool} was not called (called: {_brief(made)})")
        reasons = [self._mismatch(call.arguments) for call in calls]
        if any(reason == "" for reason in reasons):
            return CheckResult(self.kind, True)
        return CheckResult(self.kind, False, reasons[0])

    def _mismatch(self, arguments: Mapping[str, Any]) -> str:
        for name in arguments:
            if name not in self.arguments:
                return f"unexpected argument {_brief(name)!r}"
        for name, accepted in self.arguments.items():
            if name not in arguments:
                if "" in accepted or not accepted:
                    continue
                return f"argument {name!r} is missing"
            if not any(_same_value(arguments[name], value) for value in accepted if value != ""):
                return f"argument {name!r} is {_brief(repr(arguments[name]))}, expected one of {_brief(repr(accepted))}"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "tool": self.tool, "arguments": {k: list(v) for k, v in self.arguments.items()}}


def _same_value(given: Any, expected: Any) -> bool:
    """Equal as JSON values, numbers compared as numbers (the model's 10 is BFCL's 10.0) and strings normalized."""
    if isinstance(expected, bool) or isinstance(given, bool):
        return given is expected
    if isinstance(expected, int | float) and isinstance(given, int | float):
        return math.isclose(float(given), float(expected), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(expected, str) and isinstance(given, str):
        return normalize(given) == normalize(expected)
    if isinstance(expected, list) and isinstance(given, list):
        return len(given) == len(expected) and all(_same_value(g, e) for g, e in zip(given, expected, strict=True))
    if isinstance(expected, dict) and isinstance(given, dict):
        if given.keys() == expected.keys() and all(_same_value(given[k], expected[k]) for k in expected):
            return True
        return _accepted_fields(given, expected)
    return bool(given == expected)


def _accepted_fields(given: dict[str, Any], expected: dict[str, Any]) -> bool:
    """BFCL's form of a dict argument's possible answers: each field lists its accepted values ("" among them: the
    field may be left out), and no other field is given."""
    if not all(isinstance(accepted, list) for accepted in expected.values()) or not given.keys() <= expected.keys():
        return False
    for name, accepted in expected.items():
        if name not in given:
            if "" not in accepted and accepted:
                return False
        elif not any(_same_value(given[name], value) for value in accepted if value != ""):
            return False
    return True


@dataclass(frozen=True)
class Unanswerable:
    """The answer says the agent could not find it (the data has no answer), instead of making one up."""

    kind: ClassVar[str] = "unanswerable"

    def evaluate(self, trajectory: Trajectory) -> CheckResult:
        if _UNANSWERED.search(trajectory.answer):
            return CheckResult(self.kind, True)
        return CheckResult(
            self.kind, False, f"the answer does not say it could not find one: {_brief(trajectory.answer)!r}"
        )

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind}


CHECK_KINDS = ("contains", "exact", "numeric", "tool_call", "unanswerable")


def parse_check(value: Any) -> Check:
    """A Check from its JSON form; ValueError saying what to write when the form is wrong."""
    if not isinstance(value, dict):
        raise ValueError(
            f'a check is an object such as {{"type": "contains", "values": ["Paris"]}}, not {_kind(value)}'
        )
    kind = value.get("type")
    if kind == "contains":
        values = value.get("values", [value["value"]] if "value" in value else None)
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError('a contains check needs "values": a list of non-empty strings')
        return Contains(tuple(values))
    if kind == "exact":
        if not isinstance(value.get("value"), str):
            raise ValueError('an exact check needs "value": a string')
        return Exact(value["value"])
    if kind == "numeric":
        number, tolerance = value.get("value"), value.get("tolerance", 0)
        if not isinstance(number, int | float) or not _is_number(number) or not _is_number(tolerance) or tolerance < 0:
            raise ValueError('a numeric check needs "value": a number, and "tolerance": a number >= 0 (default 0)')
        return Numeric(float(number), float(tolerance))
    if kind == "tool_call":
        tool, arguments = value.get("tool"), value.get("arguments", {})
        if not isinstance(tool, str) or not tool:
            raise ValueError('a tool_call check needs "tool": the name of the tool')
        if not isinstance(arguments, dict) or not all(isinstance(v, list) for v in arguments.values()):
            raise ValueError('a tool_call check\'s "arguments" maps each argument to a list of accepted values')
        return ToolCalled(tool, {k: tuple(v) for k, v in arguments.items()})
    if kind == "unanswerable":
        return Unanswerable()
    raise ValueError(f"check type {_brief(repr(kind))} is not one of: {', '.join(CHECK_KINDS)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__

"""Grounded answers: the facts in tool results that a final answer may quote, and the sentence that states one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.planner.guardrails import visible

# The key a scalar gets when no dict key names it (a tool that returns a bare number or list).
RESULT_KEY = "result"
MAX_VALUE_CHARS = 160
MAX_FACTS = 64
# A name, not code: longer, or with a brace or a line break (a SPARQL query), an argument is no subject of a sentence.
MAX_SUBJECT_CHARS = 80
# A list's true length beside it, "timezones_count" (services/tools/builtin/knowledge.py), since a list may be cut.
COUNT_SUFFIX = "_count"
# The last item of a cut list, "... 12 more" (services/tools/builtin/knowledge.py's ``capped``): no fact.
_LEFT_OUT = re.compile(r"\.\.\. \d+ more")
_NUMBER = re.compile(r"[+-]?\d[\d,]*(\.\d+)?")
# A question for a number of things; answered only by a count or another number.
_HOW_MANY = re.compile(r"\bhow many\b|\bnumber of\b|几个|几种|多少个|多少种", re.IGNORECASE)
# Keys that name no topic of their own (a calculator's "result"): such a fact answers whatever was asked of the tool.
GENERIC_KEYS = frozenset({RESULT_KEY, "value", "answer"})
# Words a question may use for a key that its own words miss; Chinese words because questions arrive in Chinese too.
KEY_ALIASES = {
    "phone_code": ("calling", "dialing", "dial", "区号", "电话"),
    "timezones": ("time zone", "时区"),
    "capital": ("首都",),
    "currency": ("money", "货币", "钱"),
    "region": ("continent", "地区", "大洲"),
    "subregion": ("part of", "地区"),
    "native_name": ("native", "local name"),
    # Time tools (current_time's "time" matches by its own name; mcp-server-time says "datetime").
    "datetime": ("time", "date", "时间", "几点"),
    "day_of_week": ("what day", "weekday", "星期"),
}


@dataclass(frozen=True)
class Fact:
    """One scalar of a tool result: the key that names it, its text, what the tool was asked about, and the length of
    the list it was an item of (0 if none), so that a sentence says "timezones ... include" or "timezone ... is"."""

    key: str
    value: str
    subject: str
    list_size: int = 0

    def sentence(self) -> str:
        """The fact as the answer a person reads, e.g. "The capital of France is Paris."."""
        if self.key.endswith(COUNT_SUFFIX):
            counted = self.key.removesuffix(COUNT_SUFFIX).replace("_", " ")
            if not self.subject:
                return f"Number of {counted}: {self.value}"
            return f"The number of {counted} of {self.subject} is {self.value}."
        name = self.key.replace("_", " ")
        if self.list_size == 1 and name.endswith("s") and not name.endswith("ss"):
            name = name[:-1]
        if not self.subject:
            return f"{name[:1].upper()}{name[1:]}: {self.value}"
        verb = "include" if self.list_size > 1 else "is"
        return f"The {name} of {self.subject} {verb} {self.value}."

    def answers(self, question: str) -> bool:
        """Whether the question asks for this kind of fact: it names the key (a word of it, singular or plural, or an
        alias), or the key is generic. What keeps "The time of UTC is ..." from answering "Write a haiku".

        A "how many" question is answered by a count ("<key>_count" of what it names) or another number only, and a
        count answers nothing else: "The number of timezones of Latvia is 1." is no answer to "Which time zone?".
        """
        how_many = asks_how_many(question)
        if self.key.endswith(COUNT_SUFFIX):
            return how_many and _names(question, self.key.removesuffix(COUNT_SUFFIX))
        if how_many and not _is_number(self.value):
            return False
        return self.key in GENERIC_KEYS or _names(question, self.key)


def asks_how_many(question: str) -> bool:
    """Whether ``question`` asks for a number of things ("How many time zones ...", "几个时区")."""
    return _HOW_MANY.search(question) is not None


def _names(question: str, key: str) -> bool:
    """Whether ``question`` names ``key``: a word of it (singular or plural) or one of its aliases."""
    text = question.casefold()
    words = set(re.findall(r"\w+", text))
    for part in key.split("_"):
        if len(part) >= 3 and ({part, part.rstrip("s"), part + "s"} & words):
            return True
    return any(alias in text for alias in KEY_ALIASES.get(key, ()))


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def subject_of(arguments: Iterable[object]) -> str:
    """What a call was asked about, as a sentence names it: its first scalar argument if that is a name ("France"),
    else nothing ("SELECT (COUNT(?c) ...) WHERE { ... }" is no subject)."""
    for value in arguments:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            text = str(value).strip()
            if len(text) > MAX_SUBJECT_CHARS or any(c in text for c in "{}\n"):
                return ""
            return text
    return ""


def collect_facts(result: Any, subject: str, exclude: Iterable[object] = ()) -> list[Fact]:
    """Every scalar in ``result`` as a Fact named by its nearest dict key, in sorted key order, without repeats.

    Values equal to one in ``exclude`` (what the agent asked about, e.g. the country it looked up) are left out:
    repeating the question is not an answer. Values are taken as a person sees them (``visible``): an answer quotes
    them, so hidden characters in a tool's result must not ride along.
    """
    excluded = {str(value).strip().casefold() for value in exclude}
    facts: dict[tuple[str, str], Fact] = {}

    def walk(value: Any, key: str, list_size: int) -> None:
        if isinstance(value, dict):
            for name in sorted(value):
                walk(value[name], str(name), 0)
        elif isinstance(value, list):
            for item in value:
                walk(item, key, len(value))
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            text = visible(str(value)).strip()
            if _LEFT_OUT.fullmatch(text):
                return
            if text and text.casefold() not in excluded and len(text) <= MAX_VALUE_CHARS and len(facts) < MAX_FACTS:
                facts.setdefault((key, text), Fact(key, text, subject, list_size))

    walk(result, RESULT_KEY, 0)
    return list(facts.values())

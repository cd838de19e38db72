"""Suites generated from the knowledge graph's data (the countries the knowledge service loads), with a fixed seed and a
fixed train/test split: a country (or subregion, currency, made-up name) is in one split only, so no test question
asks about something a training question did. Each task carries a reference solution in ``meta["solution"]``: the tool
calls of the default agent's tools that a careful agent makes (services.train.demonstrations plays and verifies them)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.eval.checks import Check, Contains, Numeric, Unanswerable
from services.eval.suite import EvalTask

SEED = 14
# A quarter of the subjects are held out for testing; the split hashes the subject, so it never moves when the
# sample sizes or the seed change.
TEST_SHARE = 4
CATEGORIES = ("one_hop", "reverse", "two_hop", "calling_code", "chinese", "counting", "unanswerable")
_SYLLABLES = ("zor", "va", "mel", "qui", "tan", "bra", "ost", "li", "dor", "ix", "ka", "run", "sel", "thu", "vin")


def split_of(subject: str) -> str:
    """ "test" for a fixed quarter of subjects, "train" for the rest (by a hash, not by the seed)."""
    digest = hashlib.sha256(f"meshpilot-eval:{subject}".encode()).digest()
    return "test" if digest[0] % TEST_SHARE == 0 else "train"


@dataclass(frozen=True)
class Country:
    iso2: str
    name: str
    capital: str
    currency: str
    currency_name: str
    subregion: str
    phone_code: str
    chinese_name: str
    timezones: int

    @classmethod
    def of(cls, record: dict[str, Any]) -> Country:
        return cls(
            record["iso2"], record["name"].strip(), (record.get("capital") or "").strip(),
            (record.get("currency") or "").strip(), (record.get("currency_name") or "").strip(),
            (record.get("subregion") or "").strip(), (record.get("phone_code") or "").strip().lstrip("+"),
            ((record.get("translations") or {}).get("zh-CN") or "").strip(), len(record.get("timezones") or []),
        )  # fmt: skip

    @property
    def currency_values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.currency_name, self.currency) if v)


def _task(
    category: str, kind: str, subject: str, task: str, checks: Sequence[Check], solution: Sequence[dict[str, Any]]
) -> EvalTask:
    return EvalTask(
        f"{category}-{kind}-{subject}",
        task,
        tuple(checks),
        category,
        split_of(subject),
        meta={"subject": subject, "solution": list(solution)},
    )


def _call(tool: str, **arguments: Any) -> dict[str, Any]:
    """One step of a reference solution: a tool call as the agent writes it."""
    return {"tool": tool, "arguments": arguments}


def _literal(text: str) -> str:
    """``text`` as a SPARQL string literal in single quotes (long quotes when it holds one): the agent's constrained
    decoder cannot write a double quote or a backslash inside a length-bounded JSON string (xgrammar leaves escapes
    out of such strings), and the guided policy bounds every string argument."""
    if any(c in text for c in '"\\\n') or text.endswith("'"):
        raise ValueError(f"{text!r} cannot be written as a SPARQL literal without escapes")
    return f"'''{text}'''" if "'" in text else f"'{text}'"


def _by_capital(capital: str, variable: str, path: str) -> dict[str, Any]:
    """A query from a capital to one fact of its country. One query, not entity_facts on the capital then a second
    lookup: most capitals are no entity of the graph (a capital is a plain string; entity_facts finds a state of that
    name for 102 of 170, one of them in the wrong country), and the guided policy answers as soon as a result has a
    key the question names ("country"), so a second lookup is never offered. The variable names the fact (a key the
    question names), so its value is among the answers the policy offers."""
    query = f"SELECT ?{variable} WHERE {{ ?c mp:capital {_literal(capital)} ; {path} }}"
    return _call("sparql_query", query=query)


_COUNTRY_NAME = "rdfs:label ?country FILTER(lang(?country) = 'en')"


def _one_hop(countries: list[Country]) -> Iterator[EvalTask]:
    for c in countries:
        lookup = [_call("country_facts", name=c.name)]
        if c.capital:
            question = f"What is the capital of {c.name}?"
            yield _task("one_hop", "capital", c.iso2, question, [Contains((c.capital,))], lookup)
        if c.currency_values:
            question = f"What currency is used in {c.name}?"
            yield _task("one_hop", "currency", c.iso2, question, [Contains(c.currency_values)], lookup)
        if c.subregion:
            question = f"Which subregion is {c.name} in?"
            yield _task("one_hop", "subregion", c.iso2, question, [Contains((c.subregion,))], lookup)


def _unique_capitals(countries: list[Country]) -> list[Country]:
    counts = Counter(c.capital for c in countries)
    return [c for c in countries if c.capital and counts[c.capital] == 1 and c.capital != c.name]


def _reverse(countries: list[Country]) -> Iterator[EvalTask]:
    for c in _unique_capitals(countries):
        question = f"Which country has {c.capital} as its capital?"
        solution = [_by_capital(c.capital, "country", _COUNTRY_NAME)]
        yield _task("reverse", "capital", c.iso2, question, [Contains((c.name,))], solution)


def _two_hop(countries: list[Country]) -> Iterator[EvalTask]:
    for c in _unique_capitals(countries):
        if c.currency_values:
            question = f"What currency is used in the country whose capital is {c.capital}?"
            solution = [_by_capital(c.capital, "currency", "mp:currency/rdfs:label ?currency")]
            yield _task("two_hop", "currency", c.iso2, question, [Contains(c.currency_values)], solution)
        if c.subregion:
            question = f"Which subregion is the country whose capital is {c.capital} in?"
            solution = [_by_capital(c.capital, "subregion", "mp:subregion/rdfs:label ?subregion")]
            yield _task("two_hop", "subregion", c.iso2, question, [Contains((c.subregion,))], solution)


def _calling_code(countries: list[Country]) -> Iterator[EvalTask]:
    for c in countries:
        # A number check, not a substring one: "+1" must not pass on an answer that merely contains "2021".
        if c.phone_code.isdigit():
            question = f"What is the calling code of {c.name}?"
            solution = [_call("country_facts", name=c.name)]
            yield _task("calling_code", "phone", c.iso2, question, [Numeric(float(c.phone_code))], solution)


def _chinese(countries: list[Country]) -> Iterator[EvalTask]:
    for c in countries:
        if not c.chinese_name:
            continue
        # The tool resolves the Chinese name itself (the graph labels countries in Chinese too).
        lookup = [_call("country_facts", name=c.chinese_name)]
        if c.capital:
            question = f"{c.chinese_name}的首都是哪里？"
            yield _task("chinese", "capital", c.iso2, question, [Contains((c.capital,))], lookup)
        if c.currency_values:
            question = f"{c.chinese_name}使用什么货币？"
            yield _task("chinese", "currency", c.iso2, question, [Contains(c.currency_values)], lookup)


def _counting(countries: list[Country]) -> Iterator[EvalTask]:
    # The tools give each list's length beside it ("countries_count", "timezones_count"): one lookup by name, which
    # forgives a misspelling, where a COUNT query must spell the label exactly.
    for subregion, count in sorted(Counter(c.subregion for c in countries if c.subregion).items()):
        question = f"How many countries are in the subregion {subregion}?"
        solution = [_call("entity_facts", name=subregion)]
        subject = subregion.replace(" ", "_")
        yield _task("counting", "subregion", subject, question, [Numeric(float(count))], solution)
    users = Counter(c.currency_name for c in countries if c.currency_name)
    for name, count in sorted(users.items()):
        if count >= 2:
            question = f"How many countries use the {name} as their currency?"
            solution = [_call("entity_facts", name=name)]
            yield _task("counting", "currency", name.replace(" ", "_"), question, [Numeric(float(count))], solution)
    for c in countries:
        if c.timezones:
            question = f"How many time zones does {c.name} have?"
            solution = [_call("country_facts", name=c.name)]
            yield _task("counting", "timezones", c.iso2, question, [Numeric(float(c.timezones))], solution)


def _made_up_names(rng: random.Random, taken: set[str], count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() + rng.choice(
            ("ia", "land", "stan", "o")
        )
        if name.casefold() not in taken and name not in names:
            names.append(name)
    return names


def _unanswerable(countries: list[Country], rng: random.Random) -> Iterator[EvalTask]:
    taken = {c.name.casefold() for c in countries}
    # Two lookups that find nothing answering the question, after which the guided policy offers only NO_ANSWER.
    for name in _made_up_names(rng, taken, 60):
        lookups = [_call("country_facts", name=name), _call("entity_facts", name=name)]
        yield _task("unanswerable", "capital", name, f"What is the capital of {name}?", [Unanswerable()], lookups)
    for c in countries:
        # The graph has no heads of state and (this data version) no populations.
        lookups = [_call("country_facts", name=c.name), _call("entity_facts", name=c.name)]
        question = f"Who is the president of {c.name}?"
        yield _task("unanswerable", "leader", c.iso2, question, [Unanswerable()], lookups)


def generate_kg_tasks(
    records: list[dict[str, Any]], *, seed: int = SEED, per_category: dict[str, int]
) -> list[EvalTask]:
    """Tasks of every category from the country records, sampled with ``seed``: at most ``per_category[split]``
    per category and split, in a fixed order (category, then id)."""
    countries = sorted((Country.of(r) for r in records), key=lambda c: c.iso2)
    rng = random.Random(seed)
    generated = {
        "one_hop": list(_one_hop(countries)),
        "reverse": list(_reverse(countries)),
        "two_hop": list(_two_hop(countries)),
        "calling_code": list(_calling_code(countries)),
        "chinese": list(_chinese(countries)),
        "counting": list(_counting(countries)),
        "unanswerable": list(_unanswerable(countries, rng)),
    }
    chosen: list[EvalTask] = []
    for category in CATEGORIES:
        for split, limit in sorted(per_category.items()):
            pool = [t for t in generated[category] if t.split == split]
            sample = rng.sample(pool, min(limit, len(pool)))
            chosen += sorted(sample, key=lambda t: t.id)
    return chosen

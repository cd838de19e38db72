"""The country_facts tool: a country's capital, currency, region and other facts as one small JSON object."""

from __future__ import annotations

import json
from typing import Any

from meshpilot.knowledge.v1 import knowledge_pb2
from services.tools.builtin.knowledge import COUNT_SUFFIX, KnowledgeClient, capped, resolve_entity, term_value
from services.tools.registry import Tool, ToolFailure

# A country answer stays a few lines long: the United States alone has 29 zones.
_MAX_TIMEZONES = 5
# Everyday names the graph's labels (English, translations, ISO codes) do not cover.
ALIASES = {
    "uk": "United Kingdom",
    "britain": "United Kingdom",
    "great britain": "United Kingdom",
    "england": "United Kingdom",
    "america": "United States",
    "united states of america": "United States",
    "holland": "Netherlands",
    "czechia": "Czech Republic",
    "türkiye": "Turkey",
    "turkiye": "Turkey",
    "palestine": "Palestinian Territory Occupied",
}
# Output keys in the order a reader expects them, from the predicates' local names in services/knowledge/dataset.py.
_SINGLE = {
    "capital": "capital",
    "region": "region",
    "subregion": "subregion",
    "nativeName": "native_name",
    "iso2": "iso_code",
    "tld": "internet_domain",
    "population": "population",
}
_FIRST = ("country", "capital", "currency", "region", "subregion", "phone_code", "timezones")
_ORDER = (*_FIRST, "timezones" + COUNT_SUFFIX, *_SINGLE.values())


async def _currency_text(client: KnowledgeClient, fact: knowledge_pb2.Fact) -> str:
    """The currency as "Euro (EUR, €)": its name, code and symbol, from the Currency entity's own facts."""
    name = fact.object_label or fact.object.value.rsplit("/", 1)[-1]
    currency = await client.get_entity(fact.object.value)
    details = {f.predicate_name: f.object.value for f in currency.facts if not f.incoming}
    extras = [details[key] for key in ("code", "symbol") if details.get(key) and details[key] != name]
    return f"{name} ({', '.join(extras)})" if extras else name


def _phone_code(value: str) -> str:
    return value if value.startswith("+") else f"+{value}"


async def _country_with_capital(client: KnowledgeClient, name: str) -> str | None:
    """The IRI of the one country whose capital is ``name`` (any case), or None: no country, or several."""
    # A JSON string is a valid SPARQL string literal: quotes, backslashes and control characters come escaped.
    literal = json.dumps(" ".join(name.split()).lower(), ensure_ascii=False)
    query = f"SELECT ?c WHERE {{ ?c mp:capital ?capital FILTER(LCASE(STR(?capital)) = {literal}) }}"
    response = await client.query(query, limit=2)
    iris = [row.bindings["c"].value for row in response.rows if "c" in row.bindings]
    return iris[0] if len(iris) == 1 else None


# Facts of a country that are not facts of its capital (a city lies in one time zone, not in its country's three).
_COUNTRY_ONLY = frozenset({"population", "native_name", "iso_code", "timezones" + COUNT_SUFFIX})


async def country_facts(client: KnowledgeClient, name: str) -> dict[str, Any]:
    """The facts of the country ``name`` (in any language the graph labels it), compactly. A name that is no
    country's but one country's capital gives that country ("Bridgetown": Barbados), so a question asked the other
    way round ("Which country has Bridgetown as its capital?") is one lookup too. ToolFailure if neither."""
    name = ALIASES.get(" ".join(name.split()).casefold(), name)
    try:
        match, _ = await resolve_entity(client, name, "Country")
    except ToolFailure as failure:
        iri = await _country_with_capital(client, name)
        if iri is None:
            raise failure from None
        # A reader (or the guided policy, which names a fact by what was asked) takes these as the city's facts:
        # keep only what is true of the capital too, so "the population of Paris" is not France's.
        return {key: value for key, value in (await _facts(client, iri)).items() if key not in _COUNTRY_ONLY}
    return await _facts(client, match.iri)


async def _facts(client: KnowledgeClient, iri: str) -> dict[str, Any]:
    entity = await client.get_entity(iri)
    facts: dict[str, Any] = {"country": entity.label}
    timezones: list[str] = []
    currencies: list[str] = []
    for fact in entity.facts:
        if fact.incoming:
            continue
        key = fact.predicate_name
        if key == "currency":
            currencies.append(await _currency_text(client, fact))
        elif key == "timezone":
            timezones.append(fact.object.value)
        elif key == "phoneCode":
            facts["phone_code"] = _phone_code(fact.object.value)
        elif key in _SINGLE:
            facts[_SINGLE[key]] = term_value(fact.object, fact.object_label)
    if currencies:
        facts["currency"] = currencies[0] if len(currencies) == 1 else currencies
    if timezones:
        facts["timezones"] = capped(timezones, _MAX_TIMEZONES)
        facts["timezones" + COUNT_SUFFIX] = len(timezones)
    return {key: facts[key] for key in dict.fromkeys(_ORDER) if key in facts}


def country_facts_tool(client: KnowledgeClient) -> Tool:
    """The ``country_facts`` tool over ``client``: {"name": "France"} -> {"country": "France", "capital": "Paris", ...}."""

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        return await country_facts(client, arguments["name"])

    return Tool(
        name="country_facts",
        description=(
            "Look up facts about a country: capital, currency, region, subregion, phone code, time zones, "
            'native name. Example: {"name": "France"}'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 100,
                    # The guided policy narrows it to the spans of the question (services/planner/prompt.py).
                    "x-from-request": True,
                    "description": "The country's name, e.g. 'Japan' (other languages and ISO codes work too).",
                }
            },
            "required": ["name"],
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=10.0,
        idempotent=True,  # no side effects: safe to run again
    )

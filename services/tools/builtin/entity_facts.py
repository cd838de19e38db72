"""The entity_facts tool: the facts of any knowledge-graph entity (state, currency, region, country) compactly."""

from __future__ import annotations

from typing import Any

from services.knowledge.dataset import ENTITY_KINDS, NAMESPACE
from services.tools.builtin.knowledge import (
    COUNT_SUFFIX,
    KnowledgeClient,
    capped,
    resolve_entity,
    snake_case,
    term_value,
)
from services.tools.registry import Tool

# rdf:type and rdfs:label are shown once as "type" and "entity"; the labels in twenty languages would drown the rest.
_SKIPPED_PREDICATES = {"type", "label"}
# Enough for a region's countries; a country's hundred states are cut in the result anyway.
_FACT_LIMIT = 400
# The entities pointing at this one, named by their kind ("countries" of the Euro), from the graph's IRI layout
# (mp:country/FR): "The countries of Western Europe include France" reads better than "subregion_of".
_KIND_OF_IRI = {f"{NAMESPACE}{kind}/": kind[:-1] + "ies" if kind.endswith("y") else kind + "s" for kind in ENTITY_KINDS}


def _add(facts: dict[Any, list[Any]], key: Any, value: Any) -> None:
    values = facts.setdefault(key, [])
    if value not in values:
        values.append(value)


async def entity_facts(client: KnowledgeClient, name: str) -> dict[str, Any]:
    """The facts of the entity ``name``: its own facts, then lists of the entities pointing at it, named by their kind
    ("countries") or else "<predicate>_of", each with its length as "<key>_count" unless the entity had more facts
    than were read (the count would be short)."""
    match, others = await resolve_entity(client, name)
    entity = await client.get_entity(match.iri, limit=_FACT_LIMIT, include_incoming=True)
    outgoing: dict[str, list[Any]] = {}
    incoming: dict[tuple[str, str], list[Any]] = {}
    for fact in entity.facts:
        if fact.predicate_name in _SKIPPED_PREDICATES:
            continue
        if fact.incoming:
            kind = _KIND_OF_IRI.get(fact.object.value.rsplit("/", 1)[0] + "/", "")
            _add(incoming, (kind, snake_case(fact.predicate_name)), fact.object_label or fact.object.value)
        else:
            _add(outgoing, snake_case(fact.predicate_name), term_value(fact.object, fact.object_label))
    result: dict[str, Any] = {"entity": entity.label or match.label}
    types = list(entity.types) or list(match.types)
    if types:
        result["type"] = types[0] if len(types) == 1 else types
    for key, values in outgoing.items():
        if len(values) == 1:
            result[key] = values[0]
        else:
            _listed(result, key, values, entity.truncated)
    kinds = [kind for kind, _ in incoming]
    for (kind, predicate), values in incoming.items():
        # A kind pointing here by two predicates (none in this graph) keeps them apart by predicate.
        key = kind if kind and kinds.count(kind) == 1 else f"{predicate}_of"
        _listed(result, key, values, entity.truncated)
    if entity.truncated:
        result["truncated"] = True
    if others:
        result["other_matches"] = [f"{m.label} ({', '.join(m.types)})" for m in others[:5]]
    return result


def _listed(result: dict[str, Any], key: str, values: list[Any], truncated: bool) -> None:
    """Puts ``values`` (capped) at ``key`` in ``result``, and their count at "<key>_count" when it is complete."""
    result[key] = capped(values)
    if not truncated:
        result[key + COUNT_SUFFIX] = len(values)


def entity_facts_tool(client: KnowledgeClient) -> Tool:
    """The ``entity_facts`` tool over ``client``: {"name": "Euro"} -> {"entity": "Euro", "type": "Currency", ...}."""

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        return await entity_facts(client, arguments["name"])

    return Tool(
        name="entity_facts",
        description=(
            "Look up facts about any place or thing in the knowledge graph: a state or province, a currency, "
            'a region such as Europe, or a country. Example: {"name": "California"}'
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
                    "description": "The entity's name, e.g. 'Bavaria', 'Euro' or 'Western Europe'.",
                }
            },
            "required": ["name"],
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=10.0,
        idempotent=True,  # no side effects: safe to run again
    )

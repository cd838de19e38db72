"""The sparql_query tool: a read-only SPARQL query against the knowledge graph, rows as small JSON objects."""

from __future__ import annotations

from typing import Any

from services.tools.builtin.knowledge import KnowledgeClient, term_value
from services.tools.registry import Tool

DEFAULT_ROWS = 25
MAX_ROWS = 100
MAX_QUERY_CHARS = 4000


async def sparql_query(client: KnowledgeClient, query: str, limit: int = DEFAULT_ROWS) -> dict[str, Any]:
    """SELECT -> {"rows": [{var: value}], "truncated"}; ASK -> {"answer": bool}; CONSTRUCT -> {"triples": [[s, p, o]]}.

    IRIs stay full IRIs (so they can be pasted into the next query); literals become numbers, booleans or strings.
    """
    response = await client.query(query, limit=min(limit, MAX_ROWS))
    if response.HasField("boolean"):
        return {"answer": response.boolean}
    if response.triples:
        triples = [[term_value(t.subject), term_value(t.predicate), term_value(t.object)] for t in response.triples]
        return {"triples": triples, "truncated": response.truncated}
    rows = [
        {var: term_value(row.bindings[var]) for var in response.variables if var in row.bindings}
        for row in response.rows
    ]
    return {"rows": rows, "truncated": response.truncated}


def sparql_query_tool(client: KnowledgeClient) -> Tool:
    """The ``sparql_query`` tool over ``client``."""

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        return await sparql_query(client, arguments["query"], arguments.get("limit", DEFAULT_ROWS))

    return Tool(
        name="sparql_query",
        description=(
            "Run a SPARQL SELECT or ASK query on the countries knowledge graph (prefix mp: <https://meshpilot.dev/kg/>; "
            "classes mp:Country, mp:State, mp:Currency, mp:Region; predicates rdfs:label, mp:capital, mp:currency, "
            "mp:region, mp:subregion, mp:phoneCode, mp:timezone, mp:iso2). "
            'Example: {"query": "SELECT ?capital WHERE { ?c rdfs:label \'Japan\'@en ; mp:capital ?capital }"}'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_QUERY_CHARS,
                    "description": "The SPARQL query.",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_ROWS,
                    "description": f"Most rows to return (default {DEFAULT_ROWS}).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=30.0,
        idempotent=True,  # no side effects: safe to run again
    )

"""The knowledge-graph tools against an in-process fake KnowledgeService that records what it was asked."""

from __future__ import annotations

import importlib
import json
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common import InvalidArgumentError
from services.tools import KnowledgeClient, ToolErrorKind, ToolRegistry, builtin_tools
from services.tools.builtin.knowledge import capped
from tests.conftest import free_port

ENTITY_FACTS = importlib.import_module("services.tools.builtin.entity_facts")
NS = "https://meshpilot.dev/kg/"
RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
RDFS_LABEL = "http://www.w3.org/2000/01/rdf-schema#label"
XSD = "http://www.w3.org/2001/XMLSchema#"

FRANCE, GERMANY, US = NS + "country/FR", NS + "country/DE", NS + "country/US"
GEORGIA_COUNTRY, GEORGIA_STATE = NS + "country/GE", NS + "state/US-GA"
NORTH_KOREA, SOUTH_KOREA = NS + "country/KP", NS + "country/KR"
EUR, USD = NS + "currency/EUR", NS + "currency/USD"
EUROPE, WESTERN_EUROPE = NS + "region/europe", NS + "subregion/western-europe"

# (subject, predicate local name, object IRI or literal, language or datatype) in the vocabulary of
# services/knowledge/dataset.py.
TRIPLES: list[tuple[str, str, str, str]] = [
    (FRANCE, "type", NS + "Country", ""),
    (FRANCE, "label", "France", "@en"),
    (FRANCE, "label", "Frankreich", "@de"),
    (FRANCE, "nativeName", "France", ""),
    (FRANCE, "iso2", "FR", ""),
    (FRANCE, "phoneCode", "33", ""),
    (FRANCE, "tld", ".fr", ""),
    (FRANCE, "capital", "Paris", ""),
    (FRANCE, "currency", EUR, ""),
    (FRANCE, "region", EUROPE, ""),
    (FRANCE, "subregion", WESTERN_EUROPE, ""),
    (FRANCE, "timezone", "Europe/Paris", ""),
    (FRANCE, "utcOffset", "UTC+01:00", ""),
    (FRANCE, "latitude", "46.00000000", XSD + "decimal"),
    (GERMANY, "type", NS + "Country", ""),
    (GERMANY, "label", "Germany", "@en"),
    (GERMANY, "currency", EUR, ""),
    (GERMANY, "region", EUROPE, ""),
    (GERMANY, "subregion", WESTERN_EUROPE, ""),
    (US, "type", NS + "Country", ""),
    (US, "label", "United States", "@en"),
    (US, "capital", "Washington", ""),
    (US, "currency", USD, ""),
    *[(US, "timezone", f"America/Zone{i:02d}", "") for i in range(30)],
    (GEORGIA_COUNTRY, "type", NS + "Country", ""),
    (GEORGIA_COUNTRY, "label", "Georgia", "@en"),
    (GEORGIA_COUNTRY, "capital", "Tbilisi", ""),
    (GEORGIA_STATE, "type", NS + "State", ""),
    (GEORGIA_STATE, "label", "Georgia", "@en"),
    (GEORGIA_STATE, "country", US, ""),
    (GEORGIA_STATE, "stateCode", "GA", ""),
    (NORTH_KOREA, "type", NS + "Country", ""),
    (NORTH_KOREA, "label", "North Korea", "@en"),
    (SOUTH_KOREA, "type", NS + "Country", ""),
    (SOUTH_KOREA, "label", "South Korea", "@en"),
    (EUR, "type", NS + "Currency", ""),
    (EUR, "label", "Euro", "@en"),
    (EUR, "code", "EUR", ""),
    (EUR, "symbol", "€", ""),
    (USD, "type", NS + "Currency", ""),
    (USD, "label", "United States dollar", "@en"),
    (USD, "code", "USD", ""),
    (USD, "symbol", "$", ""),
    (EUROPE, "type", NS + "Region", ""),
    (EUROPE, "label", "Europe", "@en"),
    (WESTERN_EUROPE, "type", NS + "Subregion", ""),
    (WESTERN_EUROPE, "label", "Western Europe", "@en"),
    (WESTERN_EUROPE, "region", EUROPE, ""),
]


_CAPITAL_QUERY = re.compile(r"mp:capital \?capital FILTER\(LCASE\(STR\(\?capital\)\) = (\".*\")\)")


def _normalise(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def _iri(predicate: str) -> str:
    return {"type": RDF_TYPE, "label": RDFS_LABEL}.get(predicate, NS + predicate)


def _term(value: str, qualifier: str) -> knowledge_pb2.Term:
    if value.startswith("https://"):
        return knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_IRI, value=value)
    if qualifier.startswith("@"):
        return knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_LITERAL, value=value, language=qualifier[1:])
    return knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_LITERAL, value=value, datatype=qualifier or XSD + "string")


@dataclass
class FakeKnowledge(knowledge_pb2_grpc.KnowledgeServiceServicer):
    """A tiny graph with the real vocabulary; records every request; Query answers from ``query_handler``."""

    requests: list[tuple[str, Any]] = field(default_factory=list)
    query_handler: Callable[[knowledge_pb2.QueryRequest, grpc.aio.ServicerContext], Any] | None = None
    fail_with: tuple[grpc.StatusCode, str] | None = None

    def english_label(self, iri: str) -> str:
        return next((o for s, p, o, q in TRIPLES if s == iri and p == "label" and q == "@en"), "")

    def types(self, iri: str) -> list[str]:
        return [o.rsplit("/", 1)[-1] for s, p, o, _ in TRIPLES if s == iri and p == "type"]

    async def _maybe_fail(self, context: grpc.aio.ServicerContext) -> None:
        if self.fail_with is not None:
            await context.abort(*self.fail_with)

    async def LookupEntities(
        self, request: knowledge_pb2.LookupEntitiesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.LookupEntitiesResponse:
        self.requests.append(("LookupEntities", request))
        await self._maybe_fail(context)
        wanted = _normalise(request.label)
        best: dict[str, knowledge_pb2.EntityMatch] = {}
        for subject, predicate, label, _ in TRIPLES:
            if predicate != "label" or (request.type and request.type not in self.types(subject)):
                continue
            found = _normalise(label)
            score = 1.0 if found == wanted else 0.7 if found.startswith(wanted) else 0.3 if wanted in found else 0.0
            if score and (subject not in best or best[subject].score < score):
                best[subject] = knowledge_pb2.EntityMatch(
                    iri=subject,
                    label=self.english_label(subject),
                    types=self.types(subject),
                    matched_label=label,
                    score=score,
                )
        matches = sorted(best.values(), key=lambda m: -m.score)[: request.limit or 10]
        return knowledge_pb2.LookupEntitiesResponse(matches=matches)

    async def GetEntity(
        self, request: knowledge_pb2.GetEntityRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.Entity:
        self.requests.append(("GetEntity", request))
        await self._maybe_fail(context)
        if not any(s == request.iri for s, *_ in TRIPLES):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no entity {request.iri}")
        facts = [
            knowledge_pb2.Fact(
                predicate=_iri(p), predicate_name=p, object=_term(o, q), object_label=self.english_label(o)
            )
            for s, p, o, q in TRIPLES
            if s == request.iri
        ]
        if request.include_incoming:
            facts += [
                knowledge_pb2.Fact(
                    predicate=_iri(p),
                    predicate_name=p,
                    object=_term(s, ""),
                    object_label=self.english_label(s),
                    incoming=True,
                )
                for s, p, o, _ in TRIPLES
                if o == request.iri and p != "type"
            ]
        limit = request.limit or 100
        return knowledge_pb2.Entity(
            iri=request.iri,
            label=self.english_label(request.iri),
            types=self.types(request.iri),
            facts=facts[:limit],
            truncated=len(facts) > limit,
        )

    async def Query(
        self, request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.QueryResponse:
        self.requests.append(("Query", request))
        await self._maybe_fail(context)
        if self.query_handler is None and (asked := _CAPITAL_QUERY.search(request.sparql)):
            # country_facts' fallback for a name that is no country's: the countries with that capital.
            capital = json.loads(asked[1])
            rows = [
                knowledge_pb2.Row(bindings={"c": _term(s, "")})
                for s, p, o, _ in TRIPLES
                if p == "capital" and o.lower() == capital
            ]
            return knowledge_pb2.QueryResponse(variables=["c"], rows=rows)
        assert self.query_handler is not None, "the test did not expect a Query"
        return await self.query_handler(request, context)

    def asked(self, method: str) -> list[Any]:
        return [request for name, request in self.requests if name == method]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeKnowledge, str]]:
    servicer = FakeKnowledge()
    server = grpc.aio.server()
    knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def knowledge(fake: tuple[FakeKnowledge, str]) -> AsyncIterator[FakeKnowledge]:
    yield fake[0]


@pytest.fixture
async def registry(fake: tuple[FakeKnowledge, str]) -> AsyncIterator[ToolRegistry]:
    client = KnowledgeClient(fake[1])
    await client.open()
    registry = ToolRegistry()
    for tool in builtin_tools(client):
        registry.register(tool)
    try:
        yield registry
    finally:
        await client.close()


async def result_of(registry: ToolRegistry, name: str, arguments: dict[str, Any]) -> Any:
    outcome = await registry.execute(name, arguments)
    assert outcome.error is None, outcome.error
    return outcome.result


async def error_of(registry: ToolRegistry, name: str, arguments: dict[str, Any]) -> str:
    outcome = await registry.execute(name, arguments)
    assert outcome.error is not None, outcome.result
    assert outcome.error.kind is ToolErrorKind.FAILED
    return outcome.error.message


async def test_country_facts_is_compact(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    assert await result_of(registry, "country_facts", {"name": "France"}) == {
        "country": "France",
        "capital": "Paris",
        "currency": "Euro (EUR, €)",
        "region": "Europe",
        "subregion": "Western Europe",
        "phone_code": "+33",
        "timezones": ["Europe/Paris"],
        "timezones_count": 1,
        "native_name": "France",
        "iso_code": "FR",
        "internet_domain": ".fr",
    }
    lookups = knowledge.asked("LookupEntities")
    assert [(r.label, r.type) for r in lookups] == [("France", "Country")]
    assert [r.iri for r in knowledge.asked("GetEntity")] == [FRANCE, EUR]


async def test_country_facts_matches_other_languages_and_case(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "frankreich"})
    assert result["country"] == "France"
    assert result["capital"] == "Paris"


async def test_country_facts_caps_long_lists(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "United States"})
    assert result["currency"] == "United States dollar (USD, $)"
    assert result["timezones"] == [f"America/Zone{i:02d}" for i in range(5)] + ["... 25 more"]
    assert result["timezones_count"] == 30  # the true count, not the items shown


@pytest.mark.parametrize("name", ["America", " united  states of AMERICA "])
async def test_country_facts_everyday_names(registry: ToolRegistry, knowledge: FakeKnowledge, name: str) -> None:
    assert (await result_of(registry, "country_facts", {"name": name}))["country"] == "United States"
    assert knowledge.asked("LookupEntities")[0].label == "United States"


async def test_country_facts_prefers_the_country_of_a_shared_name(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "Georgia"})
    assert result == {"country": "Georgia", "capital": "Tbilisi"}


async def test_country_facts_of_a_capital_is_its_country(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    assert await result_of(registry, "country_facts", {"name": "tbilisi"}) == {
        "country": "Georgia",
        "capital": "Tbilisi",
    }
    assert [r.label for r in knowledge.asked("LookupEntities")] == ["tbilisi", "tb"]  # the name, then close matches
    assert [r.iri for r in knowledge.asked("GetEntity")] == [GEORGIA_COUNTRY]


async def test_country_facts_of_a_capital_two_countries_share_is_no_country(
    registry: ToolRegistry, knowledge: FakeKnowledge
) -> None:
    async def two(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        rows = [knowledge_pb2.Row(bindings={"c": _term(iri, "")}) for iri in (FRANCE, GERMANY)]
        return knowledge_pb2.QueryResponse(variables=["c"], rows=rows)

    knowledge.query_handler = two
    assert await error_of(registry, "country_facts", {"name": "Atlantis"}) == (
        "no country named 'Atlantis' in the knowledge graph"
    )
    assert knowledge.asked("GetEntity") == []


async def test_country_facts_unknown_name(registry: ToolRegistry) -> None:
    assert await error_of(registry, "country_facts", {"name": "Atlantis"}) == (
        "no country named 'Atlantis' in the knowledge graph"
    )


async def test_country_facts_unknown_name_suggests_close_matches(
    registry: ToolRegistry, knowledge: FakeKnowledge
) -> None:
    message = await error_of(registry, "country_facts", {"name": "Frnace"})
    assert message == "no country named 'Frnace' in the knowledge graph; close matches: France"
    assert [r.label for r in knowledge.asked("LookupEntities")] == ["Frnace", "Fr"]


async def test_country_facts_ambiguous_partial_name_lists_candidates(registry: ToolRegistry) -> None:
    message = await error_of(registry, "country_facts", {"name": "Korea"})
    assert message.startswith("no country named 'Korea' in the knowledge graph; close matches: ")
    assert "North Korea" in message and "South Korea" in message


async def test_country_facts_single_partial_match_is_used(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "United"})
    assert result["country"] == "United States"


async def test_entity_facts_of_a_currency_lists_who_uses_it(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    result = await result_of(registry, "entity_facts", {"name": "euro"})
    assert result == {
        "entity": "Euro",
        "type": "Currency",
        "code": "EUR",
        "symbol": "€",
        "countries": ["France", "Germany"],
        "countries_count": 2,
    }
    assert knowledge.asked("GetEntity")[0].include_incoming


async def test_entity_facts_of_a_region(registry: ToolRegistry) -> None:
    result = await result_of(registry, "entity_facts", {"name": "Western Europe"})
    assert result == {
        "entity": "Western Europe",
        "type": "Subregion",
        "region": "Europe",
        "countries": ["France", "Germany"],
        "countries_count": 2,
    }


async def test_entity_facts_names_each_kind_pointing_at_it(registry: ToolRegistry) -> None:
    result = await result_of(registry, "entity_facts", {"name": "Europe"})
    assert result["countries"] == ["France", "Germany"] and result["countries_count"] == 2
    assert result["subregions"] == ["Western Europe"] and result["subregions_count"] == 1


async def test_entity_facts_counts_what_it_cuts(registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ENTITY_FACTS, "capped", lambda values: capped(values, 1))
    result = await result_of(registry, "entity_facts", {"name": "Europe"})
    assert result["countries"] == ["France", "... 1 more"]
    assert result["countries_count"] == 2  # all of them, not the items shown


async def test_entity_facts_gives_no_count_of_a_list_it_did_not_read_whole(
    registry: ToolRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ENTITY_FACTS, "_FACT_LIMIT", 3)  # Europe: type, label and one of its three incoming facts
    result = await result_of(registry, "entity_facts", {"name": "Europe"})
    assert result["truncated"] is True
    assert result["countries"] == ["France"]
    assert "countries_count" not in result  # a count of the facts read would be short


async def test_entity_facts_shows_other_entities_of_the_same_name(registry: ToolRegistry) -> None:
    result = await result_of(registry, "entity_facts", {"name": "Georgia"})
    assert result["entity"] == "Georgia"
    assert result["type"] == "Country"
    assert result["other_matches"] == ["Georgia (State)"]


async def test_entity_facts_literals_keep_their_types(registry: ToolRegistry) -> None:
    result = await result_of(registry, "entity_facts", {"name": "France"})
    assert result["latitude"] == 46.0
    assert result["phone_code"] == "33"
    assert "label" not in result


async def test_entity_facts_unknown_name(registry: ToolRegistry) -> None:
    assert await error_of(registry, "entity_facts", {"name": "Narnia"}) == (
        "no entity named 'Narnia' in the knowledge graph"
    )


def _literal(value: str, datatype: str = XSD + "string") -> knowledge_pb2.Term:
    return knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_LITERAL, value=value, datatype=datatype)


async def test_sparql_query_returns_rows(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    async def answer(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        rows = [
            knowledge_pb2.Row(
                bindings={
                    "country": knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_IRI, value=FRANCE),
                    "n": _literal("3", XSD + "integer"),
                }
            ),
            knowledge_pb2.Row(bindings={"n": _literal("2.5", XSD + "decimal")}),
        ]
        return knowledge_pb2.QueryResponse(variables=["country", "n"], rows=rows, truncated=True)

    knowledge.query_handler = answer
    query = "SELECT ?country ?n WHERE { ?country mp:n ?n }"
    result = await result_of(registry, "sparql_query", {"query": query})
    assert result == {"rows": [{"country": FRANCE, "n": 3}, {"n": 2.5}], "truncated": True}
    (asked,) = knowledge.asked("Query")
    assert asked.sparql == query
    assert asked.limit == 25


async def test_sparql_query_row_cap_is_passed_on(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    async def answer(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        return knowledge_pb2.QueryResponse(variables=["x"])

    knowledge.query_handler = answer
    assert await result_of(registry, "sparql_query", {"query": "SELECT ?x {}", "limit": 5.0}) == {
        "rows": [],
        "truncated": False,
    }
    assert knowledge.asked("Query")[0].limit == 5
    with pytest.raises(InvalidArgumentError, match=r"arguments.limit: 1000 is greater than the maximum of 100"):
        await registry.execute("sparql_query", {"query": "SELECT ?x {}", "limit": 1000})


async def test_sparql_query_ask_and_construct(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    async def ask(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        return knowledge_pb2.QueryResponse(boolean=False)

    knowledge.query_handler = ask
    assert await result_of(registry, "sparql_query", {"query": "ASK { ?s ?p ?o }"}) == {"answer": False}

    async def construct(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        iri = knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_IRI, value=FRANCE)
        capital = knowledge_pb2.Term(kind=knowledge_pb2.Term.KIND_IRI, value=NS + "capital")
        triple = knowledge_pb2.Triple(subject=iri, predicate=capital, object=_literal("Paris"))
        return knowledge_pb2.QueryResponse(triples=[triple])

    knowledge.query_handler = construct
    assert await result_of(registry, "sparql_query", {"query": "CONSTRUCT { ?s ?p ?o } WHERE { ?s ?p ?o }"}) == {
        "triples": [[FRANCE, NS + "capital", "Paris"]],
        "truncated": False,
    }


async def test_malformed_sparql_quotes_the_service_message(registry: ToolRegistry, knowledge: FakeKnowledge) -> None:
    parser_message = "invalid SPARQL: error at 1:8: expected variable; fix the query and send it again"

    async def reject(request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, parser_message)

    knowledge.query_handler = reject
    message = await error_of(registry, "sparql_query", {"query": "SELECT WHERE"})
    assert message == f"the knowledge service rejected the request: {parser_message}"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "knowledge service unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "the knowledge service ran out of time: slow; ask for less"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "the knowledge service is overloaded: slow; try again later"),
        (grpc.StatusCode.INTERNAL, "the knowledge service failed (INTERNAL): slow"),
    ],
)
async def test_knowledge_errors_become_observations(
    registry: ToolRegistry, knowledge: FakeKnowledge, code: grpc.StatusCode, expected: str
) -> None:
    knowledge.fail_with = (code, "slow")
    for name, arguments in [("country_facts", {"name": "France"}), ("sparql_query", {"query": "ASK {}"})]:
        assert (await error_of(registry, name, arguments)).startswith(expected)


async def test_knowledge_service_down_is_unavailable_observation() -> None:
    port = free_port()  # nothing listens there
    client = KnowledgeClient(f"127.0.0.1:{port}")
    await client.open()
    registry = ToolRegistry()
    for tool in builtin_tools(client):
        registry.register(tool)
    try:
        assert await error_of(registry, "country_facts", {"name": "France"}) == "knowledge service unavailable"
        assert await error_of(registry, "sparql_query", {"query": "ASK {}"}) == "knowledge service unavailable"
    finally:
        await client.close()


async def test_closed_client_is_unavailable(fake: tuple[FakeKnowledge, str]) -> None:
    client = KnowledgeClient(fake[1])
    registry = ToolRegistry()
    for tool in builtin_tools(client):
        registry.register(tool)
    assert (await result_of(registry, "country_facts", {"name": "France"}))["capital"] == "Paris"
    await client.close()
    assert await error_of(registry, "country_facts", {"name": "France"}) == "knowledge service unavailable"

"""The knowledge-graph tools against a real in-process knowledge server over a real (small) countries store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpilot.knowledge.v1 import knowledge_pb2_grpc
from services.common import KnowledgeConfig, MeshConfig, ServerConfig, create_channel
from services.knowledge import DatasetSpec, OxigraphStore
from services.knowledge import create_server as create_knowledge_server
from services.tools import KnowledgeClient, ToolErrorKind, ToolRegistry, builtin_tools

pytestmark = pytest.mark.slow

COUNTRIES = frozenset({"FR", "DE", "JP", "US", "GE", "GB", "BS"})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OxigraphStore]:
    path: Path = tmp_path_factory.mktemp("knowledge")
    store = OxigraphStore(path, dataset=DatasetSpec(countries=COUNTRIES), workers=1)
    store.start_sync()
    yield store
    store.close_sync()


@pytest.fixture
async def registry(store: OxigraphStore) -> AsyncIterator[ToolRegistry]:
    config = MeshConfig(knowledge=KnowledgeConfig(server=ServerConfig(port=0)))
    server = create_knowledge_server(config, store)
    await server.start()
    await server.set_serving()
    channel = create_channel(server.address)
    registry = ToolRegistry()
    for tool in builtin_tools(KnowledgeClient(stub=knowledge_pb2_grpc.KnowledgeServiceStub(channel))):
        registry.register(tool)
    try:
        yield registry
    finally:
        await channel.close()
        await server.stop(0)


async def result_of(registry: ToolRegistry, name: str, arguments: dict[str, Any]) -> Any:
    outcome = await registry.execute(name, arguments)
    assert outcome.error is None, outcome.error
    return outcome.result


async def error_of(registry: ToolRegistry, name: str, arguments: dict[str, Any]) -> str:
    outcome = await registry.execute(name, arguments)
    assert outcome.error is not None, outcome.result
    assert outcome.error.kind is ToolErrorKind.FAILED
    return outcome.error.message


async def test_country_facts_france(registry: ToolRegistry) -> None:
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


@pytest.mark.parametrize(
    ("name", "country"),
    [
        ("japan", "Japan"),
        ("日本", "Japan"),
        ("USA", "United States"),
        ("UK", "United Kingdom"),
        ("Bahamas", "The Bahamas"),
    ],
)
async def test_country_facts_other_names(registry: ToolRegistry, name: str, country: str) -> None:
    assert (await result_of(registry, "country_facts", {"name": name}))["country"] == country


async def test_country_facts_shared_name_prefers_the_country(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "Georgia"})
    assert result["capital"] == "Tbilisi"


@pytest.mark.parametrize(
    ("capital", "country"), [("Tbilisi", "Georgia"), (" nassau ", "The Bahamas"), ("TOKYO", "Japan")]
)
async def test_country_facts_of_a_capital_is_its_country(registry: ToolRegistry, capital: str, country: str) -> None:
    result = await result_of(registry, "country_facts", {"name": capital})
    assert result["country"] == country and result["capital"].casefold() == capital.strip().casefold()
    assert {"currency", "region", "phone_code"} <= set(result)
    assert not {"population", "native_name", "iso_code", "timezones_count"} & set(result), (
        "the country's own facts are not the city's"
    )


async def test_country_facts_counts_every_time_zone(registry: ToolRegistry) -> None:
    result = await result_of(registry, "country_facts", {"name": "United States"})
    query = "SELECT (COUNT(?zone) AS ?n) WHERE { country:US mp:timezone ?zone }"
    [row] = (await result_of(registry, "sparql_query", {"query": query}))["rows"]
    assert result["timezones_count"] == row["n"] > len(result["timezones"]) - 1  # the list is cut, the count is not
    assert result["timezones"][-1] == f"... {row['n'] - 5} more"


@pytest.mark.parametrize("name", ['Par"is', "Paris\\", "Paris' } ASK { ?s ?p ?o"])
async def test_country_facts_of_a_name_with_quotes_is_no_country_and_no_query_error(
    registry: ToolRegistry, name: str
) -> None:
    message = await error_of(registry, "country_facts", {"name": name})
    assert message.startswith("no country named ")


async def test_country_facts_unknown(registry: ToolRegistry) -> None:
    message = await error_of(registry, "country_facts", {"name": "Atlantis"})
    assert message.startswith("no country named 'Atlantis' in the knowledge graph")


async def test_entity_facts_currency(registry: ToolRegistry) -> None:
    result = await result_of(registry, "entity_facts", {"name": "Euro"})
    assert result["entity"] == "Euro"
    assert result["type"] == "Currency"
    assert result["code"] == "EUR"
    assert set(result["countries"]) == {"France", "Germany"}
    assert result["countries_count"] == 2


async def test_sparql_query(registry: ToolRegistry) -> None:
    query = 'SELECT ?capital WHERE { ?c rdfs:label "Japan"@en ; mp:capital ?capital }'
    assert await result_of(registry, "sparql_query", {"query": query}) == {
        "rows": [{"capital": "Tokyo"}],
        "truncated": False,
    }


async def test_sparql_query_malformed_quotes_the_parser(registry: ToolRegistry) -> None:
    message = await error_of(registry, "sparql_query", {"query": "SELECT ?x WHERE { ?x mp:capital }"})
    assert message.startswith("the knowledge service rejected the request: invalid SPARQL")
    assert "fix the query" in message

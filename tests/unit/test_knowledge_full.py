"""The knowledge service over the full countries dataset, through the gRPC server (slow: loads ~63k triples)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common import KnowledgeConfig, MeshConfig, ServerConfig, create_channel
from services.knowledge import OxigraphStore, create_server
from services.knowledge.dataset import NAMESPACE, default_data_dir

pytestmark = pytest.mark.slow

MP = NAMESPACE
ENDLESS = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh")


@pytest.fixture(scope="module")
def config(data_dir: Path) -> MeshConfig:
    return MeshConfig(data_dir=data_dir, knowledge=KnowledgeConfig(server=ServerConfig(port=0)))


@pytest.fixture(scope="module")
def store(config: MeshConfig) -> Iterator[OxigraphStore]:
    store = OxigraphStore.from_config(config.knowledge)
    store.start_sync()
    report = store.load_report
    print(
        f"\nfull knowledge store: {report.triples} triples, load {report.load_seconds:.2f}s, {report.size_bytes} bytes"
    )
    yield store
    store.close_sync()


@pytest.fixture
async def stub(store: OxigraphStore, config: MeshConfig) -> AsyncIterator[knowledge_pb2_grpc.KnowledgeServiceStub]:
    server = create_server(config, store)
    await server.start()
    await server.set_serving()
    channel = create_channel(server.address)
    yield knowledge_pb2_grpc.KnowledgeServiceStub(channel)
    await channel.close()
    await server.stop(0)


async def _select(stub, sparql: str, limit: int = 0) -> list[dict[str, str]]:
    reply = await stub.Query(knowledge_pb2.QueryRequest(sparql=sparql, limit=limit))
    return [{k: v.value for k, v in row.bindings.items()} for row in reply.rows]


async def test_every_country_and_state_of_the_package_is_loaded(stub) -> None:
    countries = json.loads((default_data_dir() / "countries.json").read_text())
    states = sum(len(json.loads(p.read_text())) for p in (default_data_dir() / "by-country").glob("*/states.json"))
    [row] = await _select(stub, "SELECT (COUNT(?c) AS ?n) WHERE { ?c a mp:Country }")
    assert int(row["n"]) == len(countries) == 250
    [row] = await _select(stub, "SELECT (COUNT(?s) AS ?n) WHERE { ?s a mp:State }")
    assert int(row["n"]) == states


async def test_capital_of_france_is_paris(stub) -> None:
    rows = await _select(stub, 'SELECT ?capital WHERE { ?c rdfs:label "France"@en ; mp:capital ?capital }')
    assert rows == [{"capital": "Paris"}]


async def test_japans_currency_is_the_yen(stub) -> None:
    rows = await _select(
        stub,
        "SELECT ?name ?code ?symbol WHERE { country:JP mp:currency ?c . "
        "?c rdfs:label ?name ; mp:code ?code ; mp:symbol ?symbol }",
    )
    assert len(rows) == 1
    assert "yen" in rows[0]["name"].lower()
    assert (rows[0]["code"], rows[0]["symbol"]) == ("JPY", "¥")


async def test_every_country_has_a_chinese_label(stub) -> None:
    [row] = await _select(
        stub,
        'SELECT (COUNT(DISTINCT ?c) AS ?n) WHERE { ?c a mp:Country ; rdfs:label ?l FILTER(langMatches(lang(?l), "zh-CN")) }',
    )
    assert int(row["n"]) == 250
    rows = await _select(
        stub, 'SELECT ?c WHERE { ?c rdfs:label ?l FILTER(str(?l) = "法国" && langMatches(lang(?l), "zh-CN")) }'
    )
    assert rows == [{"c": MP + "country/FR"}]


@pytest.mark.parametrize(
    ("label", "iri"),
    [
        ("cote d'ivoire", "country/CI"),
        ("Côte d’Ivoire", "country/CI"),
        ("JAPAN", "country/JP"),
        ("日本", "country/JP"),
        ("法国", "country/FR"),
        ("curacao", "country/CW"),
        ("Deutschland", "country/DE"),
        ("Bayern", "state/DE-BY"),
        ("euro", "currency/EUR"),
        ("western europe", "subregion/western-europe"),
    ],
)
async def test_lookup(stub, label: str, iri: str) -> None:
    reply = await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label=label))
    assert reply.matches[0].iri == MP + iri
    assert reply.matches[0].score == 1.0


async def test_lookup_filters_by_type(stub) -> None:
    reply = await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="georgia", type="State"))
    assert [m.iri for m in reply.matches] == [MP + "state/US-GA"]
    everything = await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="georgia"))
    assert [m.iri for m in everything.matches[:2]] == [MP + "country/GE", MP + "state/US-GA"]


async def test_facts_of_france(stub) -> None:
    entity = await stub.GetEntity(
        knowledge_pb2.GetEntityRequest(iri=MP + "country/FR", include_incoming=True, limit=500)
    )
    facts = {(f.predicate_name, f.object_label or f.object.value) for f in entity.facts if not f.incoming}
    assert {("capital", "Paris"), ("currency", "Euro"), ("region", "Europe"), ("iso3", "FRA")} <= facts
    incoming = {f.object_label for f in entity.facts if f.incoming and f.predicate_name == "country"}
    assert "Île-de-France" in incoming


async def test_ask_and_construct(stub) -> None:
    ask = await stub.Query(knowledge_pb2.QueryRequest(sparql='ASK { country:DE mp:capital "Berlin" }'))
    assert ask.boolean is True
    construct = await stub.Query(
        knowledge_pb2.QueryRequest(
            sparql="CONSTRUCT { ?c mp:usesCurrency ?code } WHERE { ?c mp:currency/mp:code ?code "
            'FILTER(?code IN ("JPY", "EUR")) }'
        )
    )
    triples = {(t.subject.value, t.object.value) for t in construct.triples}
    assert {(MP + "country/JP", "JPY"), (MP + "country/FR", "EUR"), (MP + "country/DE", "EUR")} <= triples
    assert not construct.truncated


async def test_row_limit_and_truncated(stub) -> None:
    reply = await stub.Query(knowledge_pb2.QueryRequest(sparql="SELECT ?s WHERE { ?s a mp:State }", limit=10))
    assert len(reply.rows) == 10 and reply.truncated
    default = await stub.Query(knowledge_pb2.QueryRequest(sparql="SELECT ?s WHERE { ?s a mp:State }"))
    assert len(default.rows) == 100 and default.truncated


async def test_runaway_query_times_out_and_the_service_stays_usable(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Query(knowledge_pb2.QueryRequest(sparql=ENDLESS, timeout=Duration(seconds=1)))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within its 1s budget and was stopped" in caught.value.details()
    assert await _select(stub, "SELECT ?c WHERE { country:JP mp:capital ?c }") == [{"c": "Tokyo"}]


@pytest.mark.parametrize(
    ("sparql", "message"),
    [
        ("SELECT ?c WHERE { ?c mp:capital }", "invalid SPARQL: error at 1:"),
        ('DELETE DATA { country:FR mp:capital "Paris" }', "the knowledge service is read-only"),
    ],
)
async def test_bad_queries(stub, sparql: str, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Query(knowledge_pb2.QueryRequest(sparql=sparql))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_unknown_entity_is_not_found(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=MP + "country/XX"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_second_start_reopens_without_reloading(store: OxigraphStore, config: MeshConfig) -> None:
    again = OxigraphStore.from_config(config.knowledge)
    await again.start()
    try:
        assert store.load_report.loaded
        assert not again.load_report.loaded
        assert again.load_report.triples == store.load_report.triples
        result = await again.query('ASK { country:FR mp:capital "Paris" }')
        assert result.boolean is True
    finally:
        await again.close()

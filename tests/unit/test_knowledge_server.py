"""The knowledge gRPC server in-process: proto conversion, status codes, deadlines and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

import services.knowledge
from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common import KnowledgeConfig, MeshConfig, ServerConfig, create_channel, serve
from services.knowledge import (
    EntityFacts,
    EntityMatch,
    GraphStore,
    OxigraphStore,
    QueryResult,
    create_server,
)
from services.knowledge.dataset import NAMESPACE, DatasetSpec

MP = NAMESPACE
SUBSET = DatasetSpec(countries=frozenset({"FR", "DE", "JP", "CI"}))
ENDLESS = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"
Term = knowledge_pb2.Term


class RecordingStore(GraphStore):
    """Records what the servicer passes down; ``may_start`` gates start() so readiness can be observed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.time_left: list[float | None] = []
        self.may_start = asyncio.Event()

    async def start(self) -> None:
        await self.may_start.wait()

    async def query(self, sparql, *, limit=None, timeout=None, time_left=None) -> QueryResult:
        self.calls.append(("query", {"sparql": sparql, "limit": limit, "timeout": timeout}))
        self.time_left.append(time_left)
        return QueryResult(boolean=True)

    async def lookup(self, label, *, type=None, limit=None) -> list[EntityMatch]:
        self.calls.append(("lookup", {"label": label, "type": type, "limit": limit}))
        return [EntityMatch(MP + "country/FR", "France", ("Country",), "法国", 1.0)]

    async def get_entity(self, iri, *, limit=None, include_incoming=False, time_left=None) -> EntityFacts:
        self.calls.append(("get_entity", {"iri": iri, "limit": limit, "include_incoming": include_incoming}))
        self.time_left.append(time_left)
        return EntityFacts(iri, "France", ["Country"], [], truncated=False)


def _config(tmp_path: Path) -> MeshConfig:
    return MeshConfig(data_dir=tmp_path, knowledge=KnowledgeConfig(server=ServerConfig(port=0)))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OxigraphStore]:
    store = OxigraphStore(tmp_path_factory.mktemp("knowledge"), dataset=SUBSET, max_limit=50)
    store.start_sync()
    yield store
    store.close_sync()


@pytest.fixture
async def stub(store: OxigraphStore, tmp_path: Path) -> AsyncIterator[knowledge_pb2_grpc.KnowledgeServiceStub]:
    server = create_server(_config(tmp_path), store)
    await server.start()
    await server.set_serving()
    channel = create_channel(server.address)
    yield knowledge_pb2_grpc.KnowledgeServiceStub(channel)
    await channel.close()
    await server.stop(0)


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[tuple[RecordingStore, knowledge_pb2_grpc.KnowledgeServiceStub]]:
    fake = RecordingStore()
    server = create_server(_config(tmp_path), fake)
    await server.start()
    channel = create_channel(server.address)
    yield fake, knowledge_pb2_grpc.KnowledgeServiceStub(channel)
    await channel.close()
    await server.stop(0)


def test_exports() -> None:
    assert set(services.knowledge.__all__) == {
        "NAMESPACE",
        "PREFIX",
        "PREFIXES",
        "DatasetSpec",
        "EntityFacts",
        "EntityMatch",
        "Fact",
        "GraphStore",
        "KnowledgeServicer",
        "LoadReport",
        "OxigraphStore",
        "QueryResult",
        "RdfTerm",
        "RdfTriple",
        "TermKind",
        "create_server",
        "main",
    }


async def test_default_store_lives_under_the_data_dir(tmp_path: Path) -> None:
    server = create_server(_config(tmp_path))
    [binding] = server.bindings
    assert binding.full_name == "meshpilot.knowledge.v1.KnowledgeService"
    assert isinstance(binding.servicer.store, OxigraphStore)
    assert binding.servicer.store.path == tmp_path / "knowledge"


async def test_health_is_not_serving_until_the_store_has_started(tmp_path: Path) -> None:
    fake = RecordingStore()
    server = create_server(_config(tmp_path), fake)
    stop = asyncio.Event()
    running = asyncio.create_task(serve(server, startup=fake.start, stop_event=stop))
    channel = create_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    service = "meshpilot.knowledge.v1.KnowledgeService"
    try:
        for _ in range(100):
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        fake.may_start.set()
        for _ in range(100):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        await running
        await channel.close()


async def test_zero_means_default_and_durations_become_seconds(recorded) -> None:
    fake, stub = recorded
    await stub.Query(knowledge_pb2.QueryRequest(sparql="ASK {}"))
    await stub.Query(
        knowledge_pb2.QueryRequest(sparql="ASK {}", limit=7, timeout=Duration(seconds=2, nanos=500_000_000))
    )
    await stub.Query(knowledge_pb2.QueryRequest(sparql="ASK {}", timeout=Duration()))
    await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="法国"))
    await stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=MP + "country/FR", limit=3, include_incoming=True))
    assert fake.calls == [
        ("query", {"sparql": "ASK {}", "limit": None, "timeout": None}),
        ("query", {"sparql": "ASK {}", "limit": 7, "timeout": 2.5}),
        ("query", {"sparql": "ASK {}", "limit": None, "timeout": None}),
        ("lookup", {"label": "法国", "type": None, "limit": None}),
        ("get_entity", {"iri": MP + "country/FR", "limit": 3, "include_incoming": True}),
    ]


async def test_the_callers_deadline_is_passed_as_time_left(recorded) -> None:
    fake, stub = recorded
    await stub.Query(knowledge_pb2.QueryRequest(sparql="ASK {}", timeout=Duration(seconds=30)), timeout=2)
    await stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=MP + "country/FR"), timeout=3)
    await stub.Query(knowledge_pb2.QueryRequest(sparql="ASK {}"))
    assert fake.calls[0][1]["timeout"] == 30, "the query's own timeout is passed as it is"
    assert 0 < fake.time_left[0] < 2.1
    assert 2 < fake.time_left[1] < 3.1
    assert fake.time_left[2] is None, "no deadline, no limit"


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.Query(knowledge_pb2.QueryRequest(sparql="ASK {}", limit=-1)),
        lambda stub: stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="France", limit=-5)),
        lambda stub: stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=MP + "country/FR", limit=-1)),
    ],
)
async def test_negative_limits_are_invalid(recorded, call) -> None:
    _, stub = recorded
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit must be positive (or 0 for the default)" in caught.value.details()


async def test_select_over_grpc(stub) -> None:
    reply = await stub.Query(
        knowledge_pb2.QueryRequest(sparql="SELECT ?c ?cur WHERE { country:FR mp:capital ?c ; mp:currency ?cur }")
    )
    assert list(reply.variables) == ["c", "cur"]
    [row] = reply.rows
    assert row.bindings["c"] == Term(
        kind=Term.KIND_LITERAL, value="Paris", datatype="http://www.w3.org/2001/XMLSchema#string"
    )
    assert row.bindings["cur"] == Term(kind=Term.KIND_IRI, value=MP + "currency/EUR")
    assert not reply.HasField("boolean") and not reply.truncated


async def test_ask_and_construct_over_grpc(stub) -> None:
    ask = await stub.Query(knowledge_pb2.QueryRequest(sparql='ASK { country:JP mp:currency/mp:code "JPY" }'))
    assert ask.HasField("boolean") and ask.boolean is True
    construct = await stub.Query(
        knowledge_pb2.QueryRequest(sparql='CONSTRUCT { ?c rdfs:label ?l } WHERE { ?c mp:iso2 "JP" ; rdfs:label ?l }')
    )
    labels = {(t.object.value, t.object.language) for t in construct.triples}
    assert ("日本", "zh-cn") in labels and ("Japan", "en") in labels
    assert all(t.subject.kind == Term.KIND_IRI for t in construct.triples)


async def test_row_limit_over_grpc(stub) -> None:
    reply = await stub.Query(knowledge_pb2.QueryRequest(sparql="SELECT ?s WHERE { ?s a mp:State }", limit=1000))
    assert len(reply.rows) == 50 and reply.truncated


@pytest.mark.parametrize(
    ("sparql", "message"),
    [
        ("SELECT ?x WHERE { ?x ?y }", "invalid SPARQL: error at 1:"),
        ('INSERT DATA { country:FR mp:capital "Lyon" }', "the knowledge service is read-only"),
        ("LOAD <http://example.com/x.ttl>", "the knowledge service is read-only"),
    ],
)
async def test_bad_queries_are_invalid_argument(stub, sparql: str, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Query(knowledge_pb2.QueryRequest(sparql=sparql))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_runaway_query_is_deadline_exceeded_and_the_server_keeps_answering(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Query(knowledge_pb2.QueryRequest(sparql=ENDLESS, timeout=Duration(nanos=300_000_000)))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "was stopped; make it more selective" in caught.value.details()
    after = await stub.Query(knowledge_pb2.QueryRequest(sparql="ASK { country:CI ?p ?o }"))
    assert after.boolean is True


async def test_lookup_over_grpc(stub) -> None:
    reply = await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="cote d'ivoire", type="Country"))
    [match] = reply.matches
    assert (match.iri, match.label, list(match.types), match.score) == (
        MP + "country/CI",
        "Ivory Coast",
        ["Country"],
        1.0,
    )
    chinese = await stub.LookupEntities(knowledge_pb2.LookupEntitiesRequest(label="日本", limit=1))
    assert [m.iri for m in chinese.matches] == [MP + "country/JP"]


async def test_get_entity_over_grpc(stub) -> None:
    entity = await stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=MP + "country/FR"))
    assert (entity.label, list(entity.types)) == ("France", ["Country"])
    facts = {f.predicate_name: (f.object.value, f.object_label) for f in entity.facts if f.predicate_name != "label"}
    assert facts["capital"] == ("Paris", "")
    assert facts["currency"] == (MP + "currency/EUR", "Euro")
    assert facts["region"] == (MP + "region/europe", "Europe")


@pytest.mark.parametrize(
    ("iri", "code", "message"),
    [
        (MP + "country/ZZ", grpc.StatusCode.NOT_FOUND, "find IRIs with LookupEntities"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "iri is empty"),
    ],
)
async def test_get_entity_errors(stub, iri: str, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetEntity(knowledge_pb2.GetEntityRequest(iri=iri))
    assert caught.value.code() == code
    assert message in caught.value.details()

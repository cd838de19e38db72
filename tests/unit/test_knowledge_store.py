"""OxigraphStore on a small subset of the countries data: SPARQL, limits, real timeouts, lookup, entity facts, reuse."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.knowledge.dataset import NAMESPACE, DatasetSpec
from services.knowledge.model import TermKind
from services.knowledge.store import MARKER_FILE, OxigraphStore
from services.knowledge.worker import WorkerFailure

MP = NAMESPACE
SUBSET = DatasetSpec(countries=frozenset({"FR", "DE", "JP", "CI", "AD"}))
# Counting a three-way cross product of a few thousand triples (~10^10 solutions) never finishes on its own.
ENDLESS = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"


def _start(path: Path, **kwargs) -> OxigraphStore:
    store = OxigraphStore(path, dataset=kwargs.pop("dataset", SUBSET), **kwargs)
    store.start_sync()
    return store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knowledge")


@pytest.fixture(scope="module")
def store(store_path: Path) -> Iterator[OxigraphStore]:
    store = _start(store_path, default_limit=50, max_limit=200)
    yield store
    store.close_sync()


@pytest.fixture
def single_worker(tmp_path: Path) -> Iterator[OxigraphStore]:
    store = _start(tmp_path, workers=1, max_in_flight=2)
    yield store
    store.close_sync()


async def _wait_for_workers(store: OxigraphStore) -> None:
    for _ in range(300):
        if store.workers.alive == store.workers.size:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {store.workers.alive} of {store.workers.size} workers came back")


def test_first_start_loads_the_dataset(store: OxigraphStore) -> None:
    report = store.load_report
    assert report is not None and report.loaded
    assert report.triples > 1000
    assert report.size_bytes > 0
    assert json.loads((store.path / MARKER_FILE).read_text())["fingerprint"] == SUBSET.fingerprint()


async def test_select_with_predeclared_prefixes(store: OxigraphStore) -> None:
    result = await store.query("SELECT ?capital WHERE { country:FR mp:capital ?capital }")
    assert result.variables == ["capital"]
    assert [row["capital"].value for row in result.rows] == ["Paris"]
    assert result.rows[0]["capital"].kind is TermKind.LITERAL
    assert not result.truncated


async def test_select_follows_edges_and_language_tags(store: OxigraphStore) -> None:
    result = await store.query(
        "SELECT ?code ?name ?zh WHERE { country:JP mp:currency ?c . ?c mp:code ?code ; rdfs:label ?name . "
        'country:JP rdfs:label ?zh FILTER(langMatches(lang(?zh), "zh-CN")) }'
    )
    [row] = result.rows
    assert (row["code"].value, row["name"].value, row["zh"].value) == ("JPY", "Japanese yen", "日本")
    assert row["zh"].language == "zh-cn"


async def test_unbound_variables_are_absent(store: OxigraphStore) -> None:
    result = await store.query("SELECT ?c ?missing WHERE { country:FR mp:capital ?c OPTIONAL { ?c mp:nope ?missing } }")
    assert result.rows == [{"c": result.rows[0]["c"]}]


async def test_ask(store: OxigraphStore) -> None:
    assert (await store.query('ASK { country:FR mp:capital "Paris" }')).boolean is True
    assert (await store.query('ASK { country:FR mp:capital "Lyon" }')).boolean is False


async def test_construct_and_describe_return_triples(store: OxigraphStore) -> None:
    result = await store.query("CONSTRUCT { ?c mp:capitalName ?n } WHERE { ?c mp:capital ?n }")
    assert {(t.subject.value, t.object.value) for t in result.triples} >= {(MP + "country/FR", "Paris")}
    assert all(t.predicate.value == MP + "capitalName" for t in result.triples)
    described = await store.query("DESCRIBE currency:EUR")
    assert any(t.predicate.value == MP + "code" and t.object.value == "EUR" for t in described.triples)


async def test_row_limit_sets_truncated(store: OxigraphStore) -> None:
    query = "SELECT ?c WHERE { ?c a mp:Country }"
    limited = await store.query(query, limit=2)
    assert len(limited.rows) == 2 and limited.truncated
    everything = await store.query(query, limit=5)
    assert len(everything.rows) == 5 and not everything.truncated


async def test_default_and_maximum_row_limits(store: OxigraphStore) -> None:
    states = "SELECT ?s WHERE { ?s a mp:State }"
    default = await store.query(states)
    assert len(default.rows) == 50 and default.truncated
    capped = await store.query(states, limit=100_000)
    assert len(capped.rows) == 200 and capped.truncated
    constructed = await store.query("CONSTRUCT { ?s a mp:Place } WHERE { ?s a mp:State }", limit=3)
    assert len(constructed.triples) == 3 and constructed.truncated


async def test_a_runaway_query_is_stopped_and_the_store_keeps_serving(store: OxigraphStore) -> None:
    pids_before = set(store.workers.pids())
    with pytest.raises(DeadlineExceededError, match=r"did not finish within its 0.5s budget and was stopped"):
        await store.query(ENDLESS, timeout=0.5)
    result = await store.query('ASK { country:DE mp:capital "Berlin" }')
    assert result.boolean is True
    await _wait_for_workers(store)
    pids_after = set(store.workers.pids())
    assert len(pids_before - pids_after) == 1, "the worker that ran the query was killed and replaced"


async def test_timeout_is_capped_by_the_maximum(single_worker: OxigraphStore) -> None:
    single_worker.max_timeout = 0.5
    with pytest.raises(DeadlineExceededError, match=r"within its 0\.5s budget"):
        await single_worker.query(ENDLESS, timeout=3600)


async def _until_busy(store: OxigraphStore) -> None:
    for _ in range(300):
        if store.workers.idle == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never picked the query up")


async def test_a_busy_store_refuses_instead_of_queueing_forever(single_worker: OxigraphStore) -> None:
    running = asyncio.create_task(single_worker.query(ENDLESS, timeout=3))
    await _until_busy(single_worker)
    with pytest.raises(ResourceExhaustedError, match=r"all 1 knowledge query workers stayed busy for the whole 0\.2s"):
        await single_worker.query("ASK { ?s ?p ?o }", timeout=0.2)
    waiting = asyncio.create_task(single_worker.query("ASK { ?s ?p ?o }", timeout=1))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhaustedError, match="already has 2 queries in flight; retry later"):
        await single_worker.query("ASK { ?s ?p ?o }")
    with pytest.raises(ResourceExhaustedError, match="stayed busy"):
        await waiting
    with pytest.raises(DeadlineExceededError):
        await running


async def test_a_worker_that_dies_is_reported_and_replaced(single_worker: OxigraphStore) -> None:
    [pid] = single_worker.workers.pids()
    running = asyncio.create_task(single_worker.query(ENDLESS, timeout=30))
    await _until_busy(single_worker)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ResourceExhaustedError, match="worker died while running the query"):
        await running
    await _wait_for_workers(single_worker)
    assert (await single_worker.query("ASK { country:AD ?p ?o }")).boolean is True


@pytest.mark.parametrize(
    ("sparql", "kwargs", "message"),
    [
        ("SELECT ?x WHERE { ?x ?y }", {}, r"invalid SPARQL: error at 1:\d+: expected .*fix the query"),
        ('INSERT DATA { country:FR mp:capital "Lyon" }', {}, "the knowledge service is read-only"),
        ("DELETE WHERE { ?s ?p ?o }", {}, "the knowledge service is read-only"),
        ("SELECT * WHERE { SERVICE <http://127.0.0.1:1/sparql> { ?s ?p ?o } }", {}, "SERVICE"),
        ("", {}, "sparql is empty"),
        ("ASK { ?s ?p ?o }", {"limit": -1}, "limit must be positive"),
        ("ASK { ?s ?p ?o }", {"timeout": -1.0}, "timeout must be positive"),
    ],
)
async def test_bad_queries_say_what_to_change(store: OxigraphStore, sparql: str, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await store.query(sparql, **kwargs)


async def test_lookup_ignores_case_and_accents_and_reads_chinese(store: OxigraphStore) -> None:
    [ivory, *_] = await store.lookup("cote d'ivoire")
    assert (ivory.iri, ivory.label, ivory.score) == (MP + "country/CI", "Ivory Coast", 1.0)
    assert (await store.lookup("JAPAN"))[0].iri == MP + "country/JP"
    assert (await store.lookup("日本"))[0].iri == MP + "country/JP"
    [france, *_] = await store.lookup("法国")
    assert (france.iri, france.matched_label, france.types) == (MP + "country/FR", "法国", ("Country",))
    assert (await store.lookup("Deutschland"))[0].iri == MP + "country/DE"
    assert (await store.lookup("FRA"))[0].iri == MP + "country/FR"


async def test_lookup_by_type(store: OxigraphStore) -> None:
    [euro] = await store.lookup("euro", type="Currency")
    assert (euro.iri, euro.label) == (MP + "currency/EUR", "Euro")
    regions = await store.lookup("europe", type=MP + "Subregion")
    assert {m.iri for m in regions} >= {MP + "subregion/western-europe"}
    with pytest.raises(InvalidArgumentError, match="unknown type 'Planet'"):
        await store.lookup("earth", type="Planet")


async def test_entity_facts_carry_object_labels(store: OxigraphStore) -> None:
    entity = await store.get_entity(MP + "country/FR")
    assert (entity.label, entity.types, entity.truncated) == ("France", ["Country"], False)
    facts = {(f.predicate_name, f.object.value, f.object_label) for f in entity.facts}
    assert ("capital", "Paris", "") in facts
    assert ("currency", MP + "currency/EUR", "Euro") in facts
    assert ("region", MP + "region/europe", "Europe") in facts
    assert ("subregion", MP + "subregion/western-europe", "Western Europe") in facts
    assert entity.facts[0].predicate_name == "type"
    assert not any(f.incoming for f in entity.facts)


async def test_entity_short_forms(store: OxigraphStore) -> None:
    assert (await store.get_entity("mp:country/JP")).label == "Japan"
    assert (await store.get_entity(f"<{MP}currency/JPY>")).label == "Japanese yen"


async def test_incoming_edges_on_request(store: OxigraphStore) -> None:
    entity = await store.get_entity(MP + "currency/EUR", include_incoming=True)
    incoming = {(f.predicate_name, f.object.value, f.object_label) for f in entity.facts if f.incoming}
    assert ("currency", MP + "country/FR", "France") in incoming
    assert ("currency", MP + "country/DE", "Germany") in incoming


async def test_entity_fact_limit(store: OxigraphStore) -> None:
    entity = await store.get_entity(MP + "country/FR", limit=3)
    assert len(entity.facts) == 3 and entity.truncated
    assert [f.predicate_name for f in entity.facts[:2]] == ["type", "label"]
    assert entity.facts[1].object.language == "en"


@pytest.mark.parametrize(
    ("iri", "error", "message"),
    [
        (MP + "country/XX", NotFoundError, "no entity <https://meshpilot.dev/kg/country/XX>.*LookupEntities"),
        ("", InvalidArgumentError, "iri is empty; send an entity IRI"),
        ("France", InvalidArgumentError, "not a valid IRI .*send an absolute IRI.*LookupEntities"),
        ("http://exa mple.com/x", InvalidArgumentError, "not a valid IRI"),
    ],
)
async def test_bad_entity_iris(store: OxigraphStore, iri: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        await store.get_entity(iri)


async def test_a_failure_inside_the_worker_is_raised_and_the_worker_kept(single_worker: OxigraphStore) -> None:
    [pid] = single_worker.workers.pids()
    with pytest.raises(WorkerFailure, match="unknown request str"):
        single_worker.workers.run("not a request", time.monotonic() + 5, 5)  # type: ignore[arg-type]
    assert single_worker.workers.pids() == [pid]
    assert (await single_worker.query("ASK { country:FR ?p ?o }")).boolean is True


async def test_no_running_worker_is_unavailable(single_worker: OxigraphStore) -> None:
    single_worker.workers.close()
    with pytest.raises(UnavailableError, match="no knowledge query worker is running; see the knowledge service log"):
        await single_worker.query("ASK { ?s ?p ?o }")


async def test_calls_before_start_are_unavailable(tmp_path: Path) -> None:
    store = OxigraphStore(tmp_path, dataset=SUBSET)
    with pytest.raises(UnavailableError, match="still loading"):
        await store.query("ASK { ?s ?p ?o }")
    with pytest.raises(UnavailableError, match="still loading"):
        await store.lookup("France")


async def test_second_start_reuses_the_store(store: OxigraphStore, store_path: Path) -> None:
    database_files = {p: p.stat().st_mtime_ns for p in (store_path / "oxigraph").glob("*.sst")}
    again = OxigraphStore(store_path, dataset=SUBSET)
    await again.start()
    try:
        assert again.load_report is not None and not again.load_report.loaded
        assert again.load_report.triples == store.load_report.triples
        assert {p: p.stat().st_mtime_ns for p in database_files} == database_files
        assert (await again.query("ASK { country:CI mp:capital ?c }")).boolean is True
        assert (await again.lookup("Andorra"))[0].iri == MP + "country/AD"
    finally:
        await again.close()


def test_other_data_or_a_damaged_marker_rebuilds_the_store(tmp_path: Path) -> None:
    first = _start(tmp_path, dataset=DatasetSpec(countries=frozenset({"AD"})), workers=1)
    first.close_sync()
    wider = _start(tmp_path, dataset=DatasetSpec(countries=frozenset({"AD", "LI"})), workers=1)
    wider.close_sync()
    assert wider.load_report.loaded and wider.load_report.triples > first.load_report.triples
    (tmp_path / MARKER_FILE).write_text("{not json")
    repaired = _start(tmp_path, dataset=DatasetSpec(countries=frozenset({"AD", "LI"})), workers=1)
    repaired.close_sync()
    assert repaired.load_report.loaded and repaired.load_report.triples == wider.load_report.triples


def test_start_fails_loudly_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / MARKER_FILE).write_text(json.dumps({"fingerprint": SUBSET.fingerprint(), "triples": 1}))
    (tmp_path / "oxigraph").mkdir()
    (tmp_path / "oxigraph" / "CURRENT").write_text("garbage\n")
    store = OxigraphStore(tmp_path, dataset=SUBSET)
    with pytest.raises(RuntimeError, match="could not open the store"):
        store.start_sync()
    store.close_sync()

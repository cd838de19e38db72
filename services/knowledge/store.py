"""The graph store interface and its pyoxigraph implementation: an on-disk store loaded once, queried by workers."""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyoxigraph import NamedNode, RdfFormat, Store

from services.common.config import KnowledgeConfig
from services.common.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    quoted,
)
from services.knowledge.dataset import NAMESPACE, PREFIX, DatasetSpec, write_ntriples
from services.knowledge.labels import LabelIndex
from services.knowledge.model import EntityFacts, EntityMatch, QueryResult
from services.knowledge.sparql import check_read_only_query, syntax_error_message
from services.knowledge.worker import EntityRequest, QueryRequest, QuerySyntaxError, QueryWorkerPool, child_command

log = logging.getLogger(__name__)

MARKER_FILE = "dataset.json"
DATABASE_DIR = "oxigraph"
# Building the lookup index reads every label once at start; it gets a budget of its own, not a caller's.
_INDEX_BUDGET_SECONDS = 300.0

_NAMES_QUERY = """
SELECT ?s ?text WHERE {
  { ?s rdfs:label ?text } UNION { ?s mp:nativeName ?text } UNION { ?s mp:iso2 ?text } UNION { ?s mp:iso3 ?text }
  UNION { ?s mp:code ?text } UNION { ?s mp:iso3166_2 ?text }
}"""
_ENGLISH_QUERY = 'SELECT ?s ?label WHERE { ?s rdfs:label ?label FILTER(langMatches(lang(?label), "en")) }'
_TYPES_QUERY = "SELECT ?s ?class WHERE { ?s a ?class }"
# The graph's IRIs have at most 62 characters; a longer one names nothing here.
MAX_IRI_CHARS = 1000


class GraphStore(abc.ABC):
    """Read-only access to the knowledge graph.

    Contract: ``start()`` makes the store ready (loading the dataset if needed) and must complete before any other
    call; ``close()`` releases it. Errors are domain errors from services.common.errors: InvalidArgumentError for bad
    input (malformed or updating SPARQL, empty label or IRI, unknown type), NotFoundError for an unknown entity,
    DeadlineExceededError when a query overruns its time budget (the work is stopped, not abandoned),
    ResourceExhaustedError when the store is too busy, UnavailableError before ``start()`` has finished.
    ``limit``/``timeout`` of None select the store's defaults; values above its maxima are capped. ``time_left`` is
    how long the caller still waits (its gRPC deadline), None for no deadline: no work runs past it, and it never
    lengthens the budget (a caller with a 30 s deadline and no timeout gets the default).

    A query over its budget is DEADLINE_EXCEEDED rather than RESOURCE_EXHAUSTED: the fault is this query's cost, the
    same query will fail again on an idle service, and the fix is the caller's (a more selective query or a longer
    timeout). RESOURCE_EXHAUSTED is kept for the service being busy, where the same query can succeed later.
    """

    async def start(self) -> None:  # noqa: B027 - stores with nothing to prepare need not override it
        """Prepares the store."""

    async def close(self) -> None:  # noqa: B027
        """Releases the store's resources."""

    @abc.abstractmethod
    async def query(
        self, sparql: str, *, limit: int | None = None, timeout: float | None = None, time_left: float | None = None
    ) -> QueryResult:
        """Runs a SELECT, ASK, CONSTRUCT or DESCRIBE query; at most ``limit`` rows or triples, ``truncated`` set
        when more existed."""

    @abc.abstractmethod
    async def lookup(self, label: str, *, type: str | None = None, limit: int | None = None) -> list[EntityMatch]:
        """Entities whose label, native name or code matches ``label`` ignoring case and accents, best first;
        ``type`` keeps only entities of that class (local name such as "Country", or class IRI)."""

    @abc.abstractmethod
    async def get_entity(
        self, iri: str, *, limit: int | None = None, include_incoming: bool = False, time_left: float | None = None
    ) -> EntityFacts:
        """The entity's outgoing edges (and incoming ones if asked), objects labelled in English."""


@dataclass(frozen=True)
class LoadReport:
    """How the store came to be ready: freshly loaded (with the load time) or reused from disk."""

    loaded: bool
    triples: int
    load_seconds: float
    size_bytes: int


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_store(database_dir: str, spec: DatasetSpec) -> tuple[int, float]:
    """Creates the on-disk store at ``database_dir`` and bulk-loads the dataset; returns (triples, seconds).

    The service runs it in a child process (``_build_in_child``): the read-write RocksDB handle is then certainly
    closed before workers open the store read-only, and the bulk load never holds the server's GIL.
    """
    started = time.monotonic()
    target = Path(database_dir)
    ntriples = target.parent / "dataset.nt"
    try:
        count = write_ntriples(spec, ntriples)
        store = Store(str(target))
        store.bulk_load(path=str(ntriples), format=RdfFormat.N_TRIPLES)
        store.optimize()
        store.flush()
        del store
    finally:
        ntriples.unlink(missing_ok=True)
    return count, time.monotonic() - started


def _build_in_child(database: Path, spec: DatasetSpec) -> tuple[int, float]:
    command, env = child_command("build", str(database), spec.to_json())
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the knowledge store {database} failed: {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return int(summary["triples"]), float(summary["seconds"])


class OxigraphStore(GraphStore):
    """The countries graph in a pyoxigraph (RocksDB) store under ``path``.

    ``path`` holds ``oxigraph/`` (the database) and ``dataset.json`` (what was loaded, written last). On start, a
    marker that matches ``dataset.fingerprint()`` means the store is reused as is; otherwise the database is rebuilt.
    Queries run in ``workers`` killable processes (see services.knowledge.worker); lookups use an in-memory index.
    """

    def __init__(
        self,
        path: Path,
        *,
        dataset: DatasetSpec | None = None,
        workers: int = 2,
        default_timeout: float = 5.0,
        max_timeout: float = 30.0,
        default_limit: int = 100,
        max_limit: int = 10_000,
        max_in_flight: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.dataset = dataset or DatasetSpec()
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout
        self.default_limit = default_limit
        self.max_limit = max_limit
        self._pool = QueryWorkerPool(self.path / DATABASE_DIR, workers)
        self._max_in_flight = max_in_flight or 8 * workers
        self._in_flight = threading.BoundedSemaphore(self._max_in_flight)
        self._threads = ThreadPoolExecutor(self._max_in_flight, thread_name_prefix="knowledge-query")
        self._index: LabelIndex | None = None
        self.load_report: LoadReport | None = None

    @classmethod
    def from_config(cls, config: KnowledgeConfig, **kwargs: Any) -> OxigraphStore:
        if config.store_path is None:
            raise ValueError("knowledge.store_path is not set; load the config with load_config()")
        return cls(
            config.store_path,
            default_timeout=config.query_timeout_seconds,
            max_timeout=config.max_query_timeout_seconds,
            default_limit=config.default_row_limit,
            max_limit=config.max_row_limit,
            workers=config.query_workers,
            max_in_flight=config.max_in_flight_queries,
            **{"dataset": DatasetSpec(include_cities=config.include_cities), **kwargs},
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    def start_sync(self) -> None:
        """``start()`` for callers without an event loop: load or reuse the store, start the workers, build the index."""
        if self._index is not None:
            return
        self.load_report = self._ensure_loaded()
        self._pool.start()
        self._index = self._build_index()
        log.info("knowledge lookup index: %d names", len(self._index))

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        self._pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    @property
    def workers(self) -> QueryWorkerPool:
        """The query worker processes."""
        return self._pool

    def _ensure_loaded(self) -> LoadReport:
        marker = self.path / MARKER_FILE
        database = self.path / DATABASE_DIR
        fingerprint = self.dataset.fingerprint()
        if marker.exists() and database.exists():
            try:
                recorded = json.loads(marker.read_text())
            except (OSError, ValueError):
                recorded = {}
            if recorded.get("fingerprint") == fingerprint:
                report = LoadReport(False, recorded.get("triples", 0), 0.0, directory_size(database))
                log.info(
                    "reusing knowledge store %s (%d triples, %d bytes)", database, report.triples, report.size_bytes
                )
                return report
            log.info("knowledge store %s was built from other data; rebuilding it", database)
        marker.unlink(missing_ok=True)
        shutil.rmtree(database, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        triples, seconds = _build_in_child(database, self.dataset)
        report = LoadReport(True, triples, seconds, directory_size(database))
        partial = marker.with_suffix(".tmp")
        partial.write_text(json.dumps({"fingerprint": fingerprint, "triples": triples, "load_seconds": seconds}))
        os.replace(partial, marker)
        log.info(
            "loaded knowledge store %s: %d triples in %.2fs, %d bytes on disk",
            database,
            triples,
            seconds,
            report.size_bytes,
        )
        return report

    def _select_all(self, sparql: str) -> list[tuple[str, str]]:
        result = self._pool.run(
            QueryRequest(sparql, None), time.monotonic() + _INDEX_BUDGET_SECONDS, _INDEX_BUDGET_SECONDS
        )
        first, second = result.variables
        return [(row[first].value, row[second].value) for row in result.rows if first in row and second in row]

    def _build_index(self) -> LabelIndex:
        english: dict[str, str] = {}
        for iri, label in self._select_all(_ENGLISH_QUERY):
            english.setdefault(iri, label)
        types: dict[str, set[str]] = {}
        for iri, class_iri in self._select_all(_TYPES_QUERY):
            types.setdefault(iri, set()).add(class_iri)
        return LabelIndex(self._select_all(_NAMES_QUERY), english, types)

    def _require_started(self) -> LabelIndex:
        if self._index is None:
            raise UnavailableError("the knowledge store is still loading; retry when the service reports SERVING")
        return self._index

    def _budget(self, timeout: float | None, time_left: float | None) -> float:
        if timeout is None:
            budget = min(self.default_timeout, self.max_timeout)
        elif timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout:g}s; leave it unset for the default")
        else:
            budget = min(timeout, self.max_timeout)
        return budget if time_left is None else max(min(budget, time_left), 0.001)

    def _row_limit(self, limit: int | None) -> int:
        if limit is None or limit == 0:
            return self.default_limit
        if limit < 0:
            raise InvalidArgumentError(
                f"limit must be positive (or 0 for the default {self.default_limit}), got {limit}"
            )
        return min(limit, self.max_limit)

    async def _run(self, request: QueryRequest | EntityRequest, budget: float) -> Any:
        self._require_started()
        if not self._in_flight.acquire(blocking=False):
            raise ResourceExhaustedError(
                f"the knowledge service already has {self._max_in_flight} queries in flight; retry later"
            )
        deadline = time.monotonic() + budget
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, self._pool.run, request, deadline, budget)
        finally:
            self._in_flight.release()

    async def query(
        self, sparql: str, *, limit: int | None = None, timeout: float | None = None, time_left: float | None = None
    ) -> QueryResult:
        check_read_only_query(sparql)
        request = QueryRequest(sparql, self._row_limit(limit))
        try:
            return await self._run(request, self._budget(timeout, time_left))
        except QuerySyntaxError as e:
            raise InvalidArgumentError(syntax_error_message(sparql, str(e))) from None

    async def lookup(self, label: str, *, type: str | None = None, limit: int | None = None) -> list[EntityMatch]:
        index = self._require_started()
        if limit is not None and limit > self.max_limit:
            limit = self.max_limit
        return await asyncio.to_thread(index.lookup, label, type, limit)

    async def get_entity(
        self, iri: str, *, limit: int | None = None, include_incoming: bool = False, time_left: float | None = None
    ) -> EntityFacts:
        iri = expand_iri(iri)
        request = EntityRequest(iri, self._row_limit(limit), include_incoming)
        entity = await self._run(request, self._budget(None, time_left))
        if entity is None:
            raise NotFoundError(
                f'no entity <{iri}> in the knowledge graph; find IRIs with LookupEntities (e.g. label "France")'
            )
        return entity


def expand_iri(iri: str) -> str:
    """Validates an entity IRI, accepting the ``mp:`` short form ("mp:country/FR")."""
    text = iri.strip()
    if not text:
        raise InvalidArgumentError(f'iri is empty; send an entity IRI such as "{NAMESPACE}country/FR"')
    if len(text) > MAX_IRI_CHARS:
        raise InvalidArgumentError(
            f'iri has {len(text)} characters; send an entity IRI of at most {MAX_IRI_CHARS} such as "{NAMESPACE}country/FR"'
        )
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith(f"{PREFIX}:"):
        text = NAMESPACE + text[len(PREFIX) + 1 :]
    try:
        NamedNode(text)
    except ValueError as e:
        raise InvalidArgumentError(
            f'iri {quoted(iri)} is not a valid IRI ({e}); send an absolute IRI such as "{NAMESPACE}country/FR" '
            "(LookupEntities finds the IRI of a name)"
        ) from None
    return text

"""Query workers: child processes that open the store read-only and answer one request at a time.

pyoxigraph's Python API cannot cancel a running query (oxigraph issue #1926: the Rust CancellationToken is not
exposed), so the only way to enforce a time budget is to run the query in a process we can kill. A worker that
overruns its budget is killed and replaced in the background; the others keep serving.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pyoxigraph import (
    BlankNode,
    Literal,
    NamedNode,
    QueryBoolean,
    QuerySolutions,
    Store,
)

from services.common.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from services.knowledge.dataset import PREFIXES, RDF_TYPE, RDFS_LABEL
from services.knowledge.model import (
    EntityFacts,
    Fact,
    QueryResult,
    RdfTerm,
    RdfTriple,
    TermKind,
    local_name,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 60.0
# An entity's outgoing edges are sorted before the limit applies; this bounds the work for a pathological hub.
_MAX_OUTGOING_SCANNED = 10_000


class QuerySyntaxError(ValueError):
    """The store's parser rejected the query; the message is the parser's."""


class WorkerFailure(RuntimeError):
    """The worker raised something other than a syntax error (a store or evaluation failure)."""


@dataclass(frozen=True)
class QueryRequest:
    sparql: str
    limit: int | None


@dataclass(frozen=True)
class EntityRequest:
    iri: str
    limit: int
    include_incoming: bool


def to_term(term: Any) -> RdfTerm:
    if isinstance(term, NamedNode):
        return RdfTerm(TermKind.IRI, term.value)
    if isinstance(term, BlankNode):
        return RdfTerm(TermKind.BLANK_NODE, term.value)
    if isinstance(term, Literal):
        return RdfTerm(TermKind.LITERAL, term.value, term.datatype.value, term.language or "")
    # An RDF 1.2 triple term; only a query can produce one here. It travels as its N-Triples text.
    return RdfTerm(TermKind.LITERAL, str(term))


def _run_query(store: Store, request: QueryRequest) -> QueryResult:
    try:
        answer = store.query(request.sparql, prefixes=PREFIXES)
    except SyntaxError as e:
        raise QuerySyntaxError(str(e)) from e
    if isinstance(answer, QueryBoolean):
        return QueryResult(boolean=bool(answer))
    cap = None if request.limit is None else request.limit + 1
    if isinstance(answer, QuerySolutions):
        variables = [v.value for v in answer.variables]
        rows = [
            {name: to_term(solution[name]) for name in variables if solution[name] is not None}
            for solution in islice(answer, cap)
        ]
        truncated = request.limit is not None and len(rows) > request.limit
        return QueryResult(variables=variables, rows=rows[: request.limit], truncated=truncated)
    triples = [RdfTriple(to_term(t.subject), to_term(t.predicate), to_term(t.object)) for t in islice(answer, cap)]
    truncated = request.limit is not None and len(triples) > request.limit
    return QueryResult(triples=triples[: request.limit], truncated=truncated)


def _label(store: Store, node: NamedNode, cache: dict[str, str]) -> str:
    """The English label of ``node``, else any label, else ""."""
    if node.value not in cache:
        labels = [
            q.object for q in store.quads_for_pattern(node, RDFS_LABEL, None, None) if isinstance(q.object, Literal)
        ]
        english = [label.value for label in labels if label.language == "en"]
        cache[node.value] = english[0] if english else (labels[0].value if labels else "")
    return cache[node.value]


def _fact_order(fact: Fact) -> tuple[int, str, str]:
    # Types and the English name first, then the domain facts, then translations, then incoming edges: an agent
    # that asks for ten facts gets the capital and currency, not ten translations of the name.
    if fact.incoming:
        group = 4
    elif fact.predicate == RDF_TYPE.value:
        group = 0
    elif fact.predicate == RDFS_LABEL.value:
        group = 1 if fact.object.language == "en" else 3
    else:
        group = 2
    return (group, fact.predicate_name, fact.object.language + fact.object.value)


def _quads(store: Store, subject: Any, obj: Any) -> Iterator[Any]:
    return iter(store.quads_for_pattern(subject, None, obj, None))


def _entity(store: Store, request: EntityRequest) -> EntityFacts | None:
    node = NamedNode(request.iri)
    labels: dict[str, str] = {}
    outgoing = list(islice(_quads(store, node, None), _MAX_OUTGOING_SCANNED))
    incoming_quads = _quads(store, None, node)
    first_incoming = next(incoming_quads, None)
    if not outgoing and first_incoming is None:
        return None
    facts = []
    for quad in outgoing:
        obj = quad.object
        facts.append(
            Fact(
                predicate=quad.predicate.value,
                predicate_name=local_name(quad.predicate.value),
                object=to_term(obj),
                object_label=_label(store, obj, labels) if isinstance(obj, NamedNode) else "",
            )
        )
    facts.sort(key=_fact_order)
    if request.include_incoming and first_incoming is not None:
        room = max(request.limit + 1 - len(facts), 0)
        for quad in islice([first_incoming, *islice(incoming_quads, room)], room):
            facts.append(
                Fact(
                    predicate=quad.predicate.value,
                    predicate_name=local_name(quad.predicate.value),
                    object=to_term(quad.subject),
                    object_label=_label(store, quad.subject, labels) if isinstance(quad.subject, NamedNode) else "",
                    incoming=True,
                )
            )
    types = sorted(local_name(q.object.value) for q in outgoing if q.predicate == RDF_TYPE)
    return EntityFacts(
        iri=request.iri,
        label=_label(store, node, labels),
        types=types,
        facts=facts[: request.limit],
        truncated=len(facts) > request.limit,
    )


def serve_requests(conn: Connection, store_path: str) -> None:
    """The worker process's loop: open the store read-only, say ready, answer requests until EOF."""
    try:
        store = Store.read_only(store_path)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if isinstance(request, QueryRequest):
                reply: tuple[str, Any] = ("ok", _run_query(store, request))
            elif isinstance(request, EntityRequest):
                reply = ("ok", _entity(store, request))
            else:
                reply = ("error", f"unknown request {type(request).__name__}")
        except QuerySyntaxError as e:
            reply = ("syntax", str(e))
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)


def child_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run services.knowledge.worker_process with ``args``.

    A plain child interpreter, not multiprocessing's spawn: spawn re-imports the parent's __main__, which fails for
    ``python -c`` and stdin scripts and runs arbitrary top-level code of others.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "services.knowledge.worker_process", *args], env


class _Worker:
    """One worker process; construction starts it, ``wait_ready`` waits until it has opened the store."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        parent_socket, child_socket = socket.socketpair()
        command, env = child_command("serve", str(store_path), str(child_socket.fileno()), str(os.getpid()))
        try:
            self.process = subprocess.Popen(
                command, env=env, pass_fds=(child_socket.fileno(),), stdin=subprocess.DEVNULL
            )
        finally:
            child_socket.close()
        self.conn = Connection(parent_socket.detach())

    def wait_ready(self) -> None:
        """Raises RuntimeError (and kills the process) if the worker could not open the store."""
        if not self.conn.poll(READY_TIMEOUT_SECONDS):
            self.kill()
            raise RuntimeError(f"query worker did not open the store {self.store_path} within {READY_TIMEOUT_SECONDS}s")
        try:
            status, message = self.conn.recv()
        except (EOFError, OSError):
            status, message = "error", f"exited with code {self.process.poll()}"
        if status != "ready":
            self.kill()
            raise RuntimeError(f"query worker could not open the store {self.store_path}: {message}")

    def kill(self) -> None:
        self.process.kill()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            log.error("knowledge query worker pid %s did not exit after SIGKILL", self.process.pid)
        self.conn.close()


class QueryWorkerPool:
    """A fixed number of worker processes over one read-only store; ``run`` is thread-safe and blocking.

    A request waits for an idle worker until its deadline (then RESOURCE_EXHAUSTED: the service is busy), runs until
    its deadline (then the worker is killed and replaced, and DEADLINE_EXCEEDED is raised), and a worker that dies
    mid-request (e.g. out of memory) is replaced too.
    """

    def __init__(self, store_path: Path, size: int) -> None:
        if size < 1:
            raise ValueError(f"a query worker pool needs at least one worker, got {size}")
        self._store_path = store_path
        self.size = size
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Starts every worker (in parallel); raises RuntimeError if the store cannot be opened."""
        starting = [_Worker(self._store_path) for _ in range(self.size)]
        try:
            for worker in starting:
                worker.wait_ready()
                self._add(worker)
        except Exception:
            for worker in starting:
                worker.kill()
            raise

    def _add(self, worker: _Worker) -> None:
        with self._lock:
            if self._closed:
                worker.kill()
                return
            self._all.add(worker)
        self._idle.put(worker)

    @property
    def alive(self) -> int:
        with self._lock:
            return len(self._all)

    @property
    def idle(self) -> int:
        """Workers waiting for a request."""
        return self._idle.qsize()

    def pids(self) -> list[int]:
        """Process ids of the running workers (for operators and tests)."""
        with self._lock:
            return sorted(w.process.pid for w in self._all)

    def run(self, request: QueryRequest | EntityRequest, deadline: float, budget: float) -> Any:
        """Runs ``request`` on an idle worker before ``deadline`` (a time.monotonic() value); ``budget`` is the
        caller's total time budget in seconds, quoted in errors."""
        if self.alive == 0:
            raise UnavailableError("no knowledge query worker is running; see the knowledge service log")
        try:
            worker = self._idle.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise ResourceExhaustedError(
                f"all {self.size} knowledge query workers stayed busy for the whole {budget:g}s budget; "
                "retry later or with a longer timeout"
            ) from None
        try:
            worker.conn.send(request)
            if not worker.conn.poll(max(deadline - time.monotonic(), 0)):
                self._replace(worker, "it ran past its time budget")
                raise DeadlineExceededError(
                    f"the query did not finish within its {budget:g}s budget and was stopped; make it more selective "
                    "(bind more variables, add FILTERs, avoid cross products) or raise the timeout"
                )
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker, "it died")
            raise ResourceExhaustedError(
                "the query worker died while running the query (most likely out of memory); make the query "
                "more selective or lower its limit"
            ) from None
        self._idle.put(worker)
        if status == "ok":
            return payload
        if status == "syntax":
            raise QuerySyntaxError(payload)
        raise WorkerFailure(payload)

    def _replace(self, worker: _Worker, why: str) -> None:
        log.warning("killing knowledge query worker pid %s: %s", worker.process.pid, why)
        with self._lock:
            self._all.discard(worker)
        worker.kill()
        threading.Thread(target=self._respawn, name="knowledge-worker-respawn", daemon=True).start()

    def _respawn(self) -> None:
        for attempt in range(3):
            if self._closed:
                return
            try:
                worker = _Worker(self._store_path)
                worker.wait_ready()
                self._add(worker)
                return
            except Exception:
                log.exception("could not start a replacement knowledge query worker (attempt %d)", attempt + 1)
                time.sleep(1.0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()

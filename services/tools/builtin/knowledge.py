"""The knowledge service as the knowledge-graph tools see it: a client over the generated stub, and compact values."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import grpc

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common import create_channel
from services.common.tls import TlsIdentity
from services.tools.registry import ToolFailure

log = logging.getLogger(__name__)

XSD = "http://www.w3.org/2001/XMLSchema#"
_INTEGER_TYPES = {XSD + name for name in ("integer", "int", "long", "short", "nonNegativeInteger", "positiveInteger")}
_FLOAT_TYPES = {XSD + name for name in ("decimal", "double", "float")}
UNAVAILABLE_MESSAGE = "knowledge service unavailable"
# Lists longer than this are cut in tool results: a 135M-parameter model reads the first items and loses the rest.
MAX_LIST_ITEMS = 25
# When one name means several entities ("Georgia"), the one a question most likely means comes first.
TYPE_PREFERENCE = ("Country", "State", "Currency", "Region", "Subregion", "City")


class KnowledgeClient:
    """The knowledge service for the tools: an injected stub (tests), or a channel to ``target`` (mutual TLS as
    ``tls``, the tools service's identity, when given).

    The channel is opened by ``open()`` (the service's startup) or else by the first call, and closed by ``close()``.

    Every call raises ToolFailure with a message for the agent when the service refuses or cannot be reached.
    """

    def __init__(
        self,
        target: str | None = None,
        stub: knowledge_pb2_grpc.KnowledgeServiceStub | None = None,
        tls: TlsIdentity | None = None,
    ) -> None:
        if target is None and stub is None:
            raise ValueError("KnowledgeClient needs a target or a stub")
        self.target = target
        self._tls = tls
        self._stub = stub
        self._channel: grpc.aio.Channel | None = None
        self._closed = False

    async def open(self) -> None:
        """Opens the channel (idempotent; a no-op with an injected stub)."""
        self._closed = False
        self._connect()

    async def close(self) -> None:
        """Closes the channel; calls made afterwards fail as unavailable until ``open()``."""
        self._closed = True
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    def _connect(self) -> None:
        if self._stub is None and self.target is not None:
            self._channel = create_channel(self.target, tls=self._tls, server="knowledge")
            self._stub = knowledge_pb2_grpc.KnowledgeServiceStub(self._channel)

    def _require_stub(self) -> knowledge_pb2_grpc.KnowledgeServiceStub:
        if not self._closed:
            self._connect()
        if self._stub is None:
            raise ToolFailure(UNAVAILABLE_MESSAGE)
        return self._stub

    async def lookup(self, label: str, type_name: str = "", limit: int = 10) -> list[knowledge_pb2.EntityMatch]:
        request = knowledge_pb2.LookupEntitiesRequest(label=label, type=type_name, limit=limit)
        try:
            response = await self._require_stub().LookupEntities(request)
        except grpc.aio.AioRpcError as e:
            raise _failure(e) from e
        return list(response.matches)

    async def get_entity(self, iri: str, *, limit: int = 0, include_incoming: bool = False) -> knowledge_pb2.Entity:
        request = knowledge_pb2.GetEntityRequest(iri=iri, limit=limit, include_incoming=include_incoming)
        try:
            return await self._require_stub().GetEntity(request)
        except grpc.aio.AioRpcError as e:
            raise _failure(e) from e

    async def query(self, sparql: str, limit: int) -> knowledge_pb2.QueryResponse:
        try:
            return await self._require_stub().Query(knowledge_pb2.QueryRequest(sparql=sparql, limit=limit))
        except grpc.aio.AioRpcError as e:
            raise _failure(e) from e


def _failure(error: grpc.aio.AioRpcError) -> ToolFailure:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        log.warning("knowledge service unavailable: %s", details)
        return ToolFailure(UNAVAILABLE_MESSAGE)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ToolFailure(f"the knowledge service rejected the request: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ToolFailure(f"the knowledge service ran out of time: {details}; ask for less (a narrower query)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ToolFailure(f"the knowledge service is overloaded: {details}; try again later")
    return ToolFailure(f"the knowledge service failed ({code.name}): {details}")


def term_value(term: knowledge_pb2.Term, label: str = "") -> Any:
    """A term as a compact JSON value: an entity's label (else its IRI), a literal as number, bool or string."""
    if term.kind != knowledge_pb2.Term.KIND_LITERAL:
        return label or term.value
    try:
        if term.datatype in _INTEGER_TYPES:
            return int(term.value)
        if term.datatype in _FLOAT_TYPES:
            return float(term.value)
    except ValueError:
        return term.value
    if term.datatype == XSD + "boolean":
        return term.value in ("true", "1")
    return term.value


# Beside a list, its true length (the list itself may be capped): what a "how many" question is answered with. The
# planner's guided policy knows the suffix (services/planner/grounding.py).
COUNT_SUFFIX = "_count"


def capped(values: list[Any], limit: int = MAX_LIST_ITEMS) -> list[Any]:
    """``values`` cut to ``limit`` items, with a last item saying how many were left out."""
    return values if len(values) <= limit else [*values[:limit], f"... {len(values) - limit} more"]


def snake_case(name: str) -> str:
    """ "phoneCode" -> "phone_code": the keys a small model reads best."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


async def resolve_entity(
    client: KnowledgeClient, name: str, type_name: str = ""
) -> tuple[knowledge_pb2.EntityMatch, list[knowledge_pb2.EntityMatch]]:
    """The entity ``name`` most plausibly means, and the other exact matches (same name, other entities).

    Prefers an exact (normalised, any language) match, by TYPE_PREFERENCE among several, then a single partial match. Raises ToolFailure
    "no <type> named 'X' in the knowledge graph" with the closest names when nothing or too much matches.
    """
    kind = type_name.lower() or "entity"
    name = " ".join(name.split())
    if not name:
        raise ToolFailure(f"the {kind} name is empty; pass a name such as 'France'")
    matches = await client.lookup(name, type_name, limit=10)
    exact = sorted((m for m in matches if m.score >= 1.0), key=_type_rank)
    if exact:
        return exact[0], exact[1:]
    if len(matches) == 1:
        return matches[0], []
    if matches:
        suggestions = _unique(m.label for m in matches)[:5]
    else:
        # Nothing contains the name: look among names that share its first letters, so "Frnace" suggests France.
        near = await client.lookup(name[:2], type_name, limit=50) if len(name) >= 2 else []
        suggestions = difflib.get_close_matches(name, _unique(m.label for m in near), n=3, cutoff=0.6)
    hint = f"; close matches: {', '.join(suggestions)}" if suggestions else ""
    raise ToolFailure(f"no {kind} named {name!r} in the knowledge graph{hint}")


def _type_rank(match: knowledge_pb2.EntityMatch) -> int:
    ranks = [TYPE_PREFERENCE.index(t) for t in match.types if t in TYPE_PREFERENCE]
    return min(ranks, default=len(TYPE_PREFERENCE))


def _unique(labels: Any) -> list[str]:
    return list(dict.fromkeys(label for label in labels if label))

"""KnowledgeService over gRPC: converts protos to calls on a GraphStore and its results back."""

from __future__ import annotations

import grpc

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common.errors import InvalidArgumentError
from services.knowledge.model import EntityFacts, EntityMatch, Fact, QueryResult, RdfTerm, TermKind
from services.knowledge.store import GraphStore

_KINDS = {
    TermKind.IRI: knowledge_pb2.Term.KIND_IRI,
    TermKind.LITERAL: knowledge_pb2.Term.KIND_LITERAL,
    TermKind.BLANK_NODE: knowledge_pb2.Term.KIND_BLANK_NODE,
}


def term_to_proto(term: RdfTerm) -> knowledge_pb2.Term:
    return knowledge_pb2.Term(kind=_KINDS[term.kind], value=term.value, datatype=term.datatype, language=term.language)


def query_result_to_proto(result: QueryResult) -> knowledge_pb2.QueryResponse:
    response = knowledge_pb2.QueryResponse(variables=result.variables, truncated=result.truncated)
    for row in result.rows:
        response.rows.add(bindings={name: term_to_proto(term) for name, term in row.items()})
    for triple in result.triples:
        response.triples.add(
            subject=term_to_proto(triple.subject),
            predicate=term_to_proto(triple.predicate),
            object=term_to_proto(triple.object),
        )
    if result.boolean is not None:
        response.boolean = result.boolean
    return response


def match_to_proto(match: EntityMatch) -> knowledge_pb2.EntityMatch:
    return knowledge_pb2.EntityMatch(
        iri=match.iri, label=match.label, types=match.types, matched_label=match.matched_label, score=match.score
    )


def fact_to_proto(fact: Fact) -> knowledge_pb2.Fact:
    return knowledge_pb2.Fact(
        predicate=fact.predicate,
        predicate_name=fact.predicate_name,
        object=term_to_proto(fact.object),
        object_label=fact.object_label,
        incoming=fact.incoming,
    )


def entity_to_proto(entity: EntityFacts) -> knowledge_pb2.Entity:
    return knowledge_pb2.Entity(
        iri=entity.iri,
        label=entity.label,
        types=entity.types,
        facts=[fact_to_proto(f) for f in entity.facts],
        truncated=entity.truncated,
    )


def _limit(value: int) -> int | None:
    if value < 0:
        raise InvalidArgumentError(f"limit must be positive (or 0 for the default), got {value}")
    return value or None


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    """Query, LookupEntities and GetEntity over an injected GraphStore (errors are mapped by the shared interceptor)."""

    def __init__(self, store: GraphStore) -> None:
        self.store = store

    async def Query(
        self, request: knowledge_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.QueryResponse:
        # A zero Duration is what many clients send for "unset"; negative ones are refused by the store.
        # ToNanoseconds, not ToTimedelta: a Duration beyond timedelta's range (any int64 seconds on the wire) overflowed.
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 0.0
        result = await self.store.query(
            request.sparql, limit=_limit(request.limit), timeout=timeout or None, time_left=context.time_remaining()
        )
        return query_result_to_proto(result)

    async def LookupEntities(
        self, request: knowledge_pb2.LookupEntitiesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.LookupEntitiesResponse:
        matches = await self.store.lookup(request.label, type=request.type or None, limit=_limit(request.limit))
        return knowledge_pb2.LookupEntitiesResponse(matches=[match_to_proto(m) for m in matches])

    async def GetEntity(
        self, request: knowledge_pb2.GetEntityRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.Entity:
        entity = await self.store.get_entity(
            request.iri,
            limit=_limit(request.limit),
            include_incoming=request.include_incoming,
            time_left=context.time_remaining(),
        )
        return entity_to_proto(entity)

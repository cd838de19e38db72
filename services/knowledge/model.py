"""Plain result types of the knowledge graph, independent of pyoxigraph and of the protos (and picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class TermKind(StrEnum):
    IRI = "iri"
    LITERAL = "literal"
    BLANK_NODE = "blank_node"


@dataclass(frozen=True)
class RdfTerm:
    """An RDF term: an IRI, a literal (with datatype IRI and language tag) or a blank node id."""

    kind: TermKind
    value: str
    datatype: str = ""
    language: str = ""


@dataclass(frozen=True)
class RdfTriple:
    subject: RdfTerm
    predicate: RdfTerm
    object: RdfTerm


@dataclass
class QueryResult:
    """The answer to one SPARQL query: SELECT fills ``variables``/``rows``, ASK ``boolean``, CONSTRUCT/DESCRIBE
    ``triples``. ``truncated`` is true when more rows or triples existed than the limit allowed."""

    variables: list[str] = field(default_factory=list)
    rows: list[dict[str, RdfTerm]] = field(default_factory=list)
    boolean: bool | None = None
    triples: list[RdfTriple] = field(default_factory=list)
    truncated: bool = False


@dataclass(frozen=True)
class EntityMatch:
    """One lookup hit: the entity, its English label, its class local names, the label that matched and a score
    (1.0 exact normalised match, (0.5, 0.9] prefix, (0.1, 0.5) substring)."""

    iri: str
    label: str
    types: tuple[str, ...]
    matched_label: str
    score: float


@dataclass(frozen=True)
class Fact:
    """One edge of an entity. For an incoming edge ``object`` is the subject of the triple."""

    predicate: str
    predicate_name: str
    object: RdfTerm
    object_label: str = ""
    incoming: bool = False


@dataclass
class EntityFacts:
    iri: str
    label: str
    types: list[str]
    facts: list[Fact]
    truncated: bool = False


def local_name(iri: str) -> str:
    """The part of an IRI after its last '#' or '/', e.g. "capital" for mp:capital."""
    cut = max(iri.rfind("#"), iri.rfind("/"))
    return iri[cut + 1 :] if cut >= 0 else iri

"""The knowledge service: the countries RDF graph in an on-disk pyoxigraph store, SPARQL and entity lookup over gRPC."""

from services.knowledge.dataset import NAMESPACE, PREFIX, PREFIXES, DatasetSpec
from services.knowledge.model import EntityFacts, EntityMatch, Fact, QueryResult, RdfTerm, RdfTriple, TermKind
from services.knowledge.server import create_server, main
from services.knowledge.servicer import KnowledgeServicer
from services.knowledge.store import GraphStore, LoadReport, OxigraphStore

__all__ = [
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
]

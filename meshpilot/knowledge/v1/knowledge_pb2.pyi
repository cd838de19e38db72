import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Term(_message.Message):
    __slots__ = ("kind", "value", "datatype", "language")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Term.Kind]
        KIND_IRI: _ClassVar[Term.Kind]
        KIND_LITERAL: _ClassVar[Term.Kind]
        KIND_BLANK_NODE: _ClassVar[Term.Kind]
    KIND_UNSPECIFIED: Term.Kind
    KIND_IRI: Term.Kind
    KIND_LITERAL: Term.Kind
    KIND_BLANK_NODE: Term.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    kind: Term.Kind
    value: str
    datatype: str
    language: str
    def __init__(self, kind: _Optional[_Union[Term.Kind, str]] = ..., value: _Optional[str] = ..., datatype: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("sparql", "limit", "timeout")
    SPARQL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    sparql: str
    limit: int
    timeout: _duration_pb2.Duration
    def __init__(self, sparql: _Optional[str] = ..., limit: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("bindings",)
    class BindingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Term
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Term, _Mapping]] = ...) -> None: ...
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    bindings: _containers.MessageMap[str, Term]
    def __init__(self, bindings: _Optional[_Mapping[str, Term]] = ...) -> None: ...

class Triple(_message.Message):
    __slots__ = ("subject", "predicate", "object")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    subject: Term
    predicate: Term
    object: Term
    def __init__(self, subject: _Optional[_Union[Term, _Mapping]] = ..., predicate: _Optional[_Union[Term, _Mapping]] = ..., object: _Optional[_Union[Term, _Mapping]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("variables", "rows", "boolean", "triples", "truncated")
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    TRIPLES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    boolean: bool
    triples: _containers.RepeatedCompositeFieldContainer[Triple]
    truncated: bool
    def __init__(self, variables: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., boolean: _Optional[bool] = ..., triples: _Optional[_Iterable[_Union[Triple, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class LookupEntitiesRequest(_message.Message):
    __slots__ = ("label", "type", "limit")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    label: str
    type: str
    limit: int
    def __init__(self, label: _Optional[str] = ..., type: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class EntityMatch(_message.Message):
    __slots__ = ("iri", "label", "types", "matched_label", "score")
    IRI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    iri: str
    label: str
    types: _containers.RepeatedScalarFieldContainer[str]
    matched_label: str
    score: float
    def __init__(self, iri: _Optional[str] = ..., label: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., matched_label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class LookupEntitiesResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[EntityMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[EntityMatch, _Mapping]]] = ...) -> None: ...

class GetEntityRequest(_message.Message):
    __slots__ = ("iri", "limit", "include_incoming")
    IRI_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INCOMING_FIELD_NUMBER: _ClassVar[int]
    iri: str
    limit: int
    include_incoming: bool
    def __init__(self, iri: _Optional[str] = ..., limit: _Optional[int] = ..., include_incoming: _Optional[bool] = ...) -> None: ...

class Fact(_message.Message):
    __slots__ = ("predicate", "predicate_name", "object", "object_label", "incoming")
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_NAME_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    OBJECT_LABEL_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    predicate: str
    predicate_name: str
    object: Term
    object_label: str
    incoming: bool
    def __init__(self, predicate: _Optional[str] = ..., predicate_name: _Optional[str] = ..., object: _Optional[_Union[Term, _Mapping]] = ..., object_label: _Optional[str] = ..., incoming: _Optional[bool] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("iri", "label", "types", "facts", "truncated")
    IRI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    iri: str
    label: str
    types: _containers.RepeatedScalarFieldContainer[str]
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    truncated: bool
    def __init__(self, iri: _Optional[str] = ..., label: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

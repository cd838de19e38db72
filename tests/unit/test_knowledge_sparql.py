"""The checks on SPARQL text: read-only, no federation, readable syntax errors."""

from __future__ import annotations

import pytest
from pyoxigraph import Store

from services.common.errors import InvalidArgumentError
from services.knowledge.sparql import check_read_only_query, syntax_error_message


@pytest.mark.parametrize(
    ("sparql", "keyword"),
    [
        ("INSERT DATA { <a> <b> <c> }", "INSERT"),
        ("delete where { ?s ?p ?o }", "DELETE"),
        (
            "PREFIX ex: <http://example.com/#>\n# a comment with SELECT\nDELETE { ?s ?p ?o } WHERE { ?s ?p ?o }",
            "DELETE",
        ),
        ("BASE <http://example.com/> LOAD <http://example.com/data.ttl>", "LOAD"),
        ("CLEAR ALL", "CLEAR"),
        ("DROP GRAPH <http://example.com/g>", "DROP"),
        ("WITH <http://example.com/g> DELETE { ?s ?p ?o } WHERE { ?s ?p ?o }", "WITH"),
    ],
)
def test_updates_are_refused(sparql: str, keyword: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"read-only: {keyword} is a SPARQL update; send a SELECT"):
        check_read_only_query(sparql)


def test_service_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"SERVICE .* not allowed.*remove the SERVICE clause"):
        check_read_only_query("SELECT * WHERE { SERVICE <http://127.0.0.1:8080/sparql> { ?s ?p ?o } }")


@pytest.mark.parametrize(
    "sparql",
    [
        "SELECT * WHERE { ?s ?p ?o }",
        'SELECT ?service WHERE { ?service mp:label "INSERT SERVICE" } # SERVICE',
        "PREFIX service: <http://example.com/#> ASK { service:x ?p ?o }",
        "CONSTRUCT { ?s ?p ?o } WHERE { ?s <http://example.com/delete#SERVICE> ?o }",
        "DESCRIBE <http://example.com/x>",
    ],
)
def test_queries_pass_even_with_keywords_in_names_strings_and_comments(sparql: str) -> None:
    check_read_only_query(sparql)


def test_empty_query_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="sparql is empty; send a SELECT"):
        check_read_only_query(" \n ")


def _parser_message(sparql: str) -> str:
    with pytest.raises(SyntaxError) as caught:
        Store().query(sparql)
    return str(caught.value)


def test_syntax_error_quotes_the_parser_position_and_line() -> None:
    sparql = "SELECT ?x WHERE {\n  ?x ?y\n  FILTER(?x)\n}"
    message = syntax_error_message(sparql, _parser_message(sparql))
    assert message.startswith('invalid SPARQL: error at 3:9: expected one of ".", ":"')
    assert "(line 3: 'FILTER(?x)')" in message
    assert message.endswith("fix the query and send it again")


def test_syntax_error_at_the_end_says_so() -> None:
    sparql = "ASK { ?s ?p }"
    message = syntax_error_message(sparql, _parser_message(sparql))
    assert message.startswith("invalid SPARQL: error at 1:14: expected")
    assert "(at the end of the query)" in message


def test_syntax_error_drops_character_class_noise() -> None:
    sparql = "SELECT * WHERE { ?s ?p ?o } GROUP BY ?s"
    message = syntax_error_message(sparql, _parser_message(sparql))
    assert "SELECT * is not authorized with GROUP BY" in message
    assert "..=" not in message

"""Checks on SPARQL text before it reaches the store: read-only, no federation, readable syntax errors."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgumentError

# One left-to-right scan, so a '#' inside an IRI or a keyword inside a string is never taken for a comment or keyword.
_OPAQUE = re.compile(
    r'"""(?:[^"\\]|\\.|"(?!""))*"""'
    r"|'''(?:[^'\\]|\\.|'(?!''))*'''"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'(?:[^'\\\n]|\\.)*'"
    r'|<[^<>"{}|^`\\\s]*>'
    r"|#[^\n]*",
    re.DOTALL,
)
_PROLOGUE = re.compile(r"\s*(?:(?:PREFIX\s+[^\s:]*:\s*|BASE\s*)<>\s*)*", re.IGNORECASE)
_UPDATE_KEYWORDS = ("INSERT", "DELETE", "LOAD", "CLEAR", "CREATE", "DROP", "COPY", "MOVE", "ADD", "WITH")
_FIRST_WORD = re.compile(r"[A-Za-z]+")
# A keyword, not a variable (?service), a prefixed name (x:service, service:x) or part of a longer name.
_SERVICE = re.compile(r"(?<![?$:\w-])SERVICE(?![\w:-])", re.IGNORECASE)
_POSITION = re.compile(r"error at (\d+):(\d+)")
_MAX_PARSER_MESSAGE = 300
# Ten times the longest query an agent has written here; the checks below scan the text on the event loop.
MAX_SPARQL_CHARS = 100_000
# The line an error points at is shown at most this wide, around the column.
_MAX_SHOWN_LINE = 120
# The parser lists expected character ranges such as ['A' ..= 'Z' | ...]; they tell a caller nothing.
_CHAR_CLASS = re.compile(r"\['[^\]]*\]")


def _blank_opaque(sparql: str) -> str:
    """The query with strings, IRIs and comments reduced to placeholders ('<>' for IRIs, '""' for strings)."""

    def placeholder(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.startswith("<"):
            return "<>"
        return " " if token.startswith("#") else '""'

    return _OPAQUE.sub(placeholder, sparql)


def check_read_only_query(sparql: str) -> None:
    """Raises InvalidArgumentError for an empty text, a SPARQL update, or a query with SERVICE (federation would let
    callers make this service fetch arbitrary URLs). Syntax is left to the parser."""
    if not sparql.strip():
        raise InvalidArgumentError("sparql is empty; send a SELECT, ASK, CONSTRUCT or DESCRIBE query")
    if len(sparql) > MAX_SPARQL_CHARS:
        raise InvalidArgumentError(
            f"sparql has {len(sparql)} characters; send a query of at most {MAX_SPARQL_CHARS} (bind values with "
            "FILTER or VALUES on fewer terms, or split it)"
        )
    skeleton = _blank_opaque(sparql)
    body = skeleton[_PROLOGUE.match(skeleton).end() :]  # type: ignore[union-attr]
    first = _FIRST_WORD.match(body)
    if first and first.group(0).upper() in _UPDATE_KEYWORDS:
        raise InvalidArgumentError(
            f"the knowledge service is read-only: {first.group(0).upper()} is a SPARQL update; "
            "send a SELECT, ASK, CONSTRUCT or DESCRIBE query"
        )
    if _SERVICE.search(skeleton):
        raise InvalidArgumentError(
            "SERVICE (federated query) is not allowed: the knowledge service answers from its own store only; "
            "remove the SERVICE clause"
        )


def syntax_error_message(sparql: str, parser_message: str) -> str:
    """The parser's message (with its line:column) without its character-class noise, then the line it points at."""
    message = _CHAR_CLASS.sub("", " ".join(parser_message.split()))
    message = re.sub(r"(,\s*)+(?=,|$)", "", message).strip()
    if len(message) > _MAX_PARSER_MESSAGE:
        message = message[:_MAX_PARSER_MESSAGE] + "..."
    text = f"invalid SPARQL: {message}"
    position = _POSITION.search(parser_message)
    if position:
        line_no, column = int(position.group(1)), int(position.group(2))
        lines = sparql.rstrip().splitlines()
        if line_no > len(lines) or (line_no == len(lines) and column > len(lines[-1])):
            text += " (at the end of the query)"
        elif line_no >= 1:
            text += f" (line {line_no}: {_excerpt(lines[line_no - 1], column)!r})"
    return text + "; fix the query and send it again"


def _excerpt(line: str, column: int) -> str:
    """The line stripped, or the _MAX_SHOWN_LINE characters around ``column`` (1-based) of a longer one."""
    if len(line.strip()) <= _MAX_SHOWN_LINE:
        return line.strip()
    start = max(min(column - 1 - _MAX_SHOWN_LINE // 2, len(line) - _MAX_SHOWN_LINE), 0)
    end = start + _MAX_SHOWN_LINE
    return ("..." if start else "") + line[start:end] + ("..." if end < len(line) else "")

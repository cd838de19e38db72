"""A real PostgreSQL for tests: the machine's (127.0.0.1:5432, database test, trust auth; CI has the same), one
fresh schema per test so tests never see each other's rows. Set MESHPILOT_TEST_POSTGRES to use another server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import psycopg
import pytest

POSTGRES_DSN = os.environ.get("MESHPILOT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _unreachable() -> str | None:
    try:
        with psycopg.connect(POSTGRES_DSN, connect_timeout=3):
            return None
    except psycopg.Error as e:
        return f"no PostgreSQL at {POSTGRES_DSN} ({str(e).strip().splitlines()[0]})"


UNREACHABLE = _unreachable()
needs_postgres = pytest.mark.skipif(UNREACHABLE is not None, reason=UNREACHABLE or "")


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A DSN whose connections work in a new, empty schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_DSN else "?"
    try:
        yield f"{POSTGRES_DSN}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

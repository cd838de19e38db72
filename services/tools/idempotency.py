"""Outcomes kept under idempotency keys, so a repeated ExecuteTool returns the first outcome instead of running again.

What a call with an idempotency key does (``ToolExecutor`` applies it; this module stores it):

* The first call with a key writes a ``started`` row (key, tool, digest of the validated arguments) and commits it
  to disk *before* the tool runs, then runs the tool and stores its outcome (result or error observation, duration).
* A later call with the same key, tool and arguments gets the stored outcome with ``replayed`` set; the tool does
  not run. The same key with another tool or other arguments is FAILED_PRECONDITION.
* A call that arrives while the first is still running waits for the first's outcome: in this process (SQLite, one
  replica), or on any replica sharing the PostgreSQL database (``services.tools.pg_stores``).
* The tool's run does not depend on its caller: if the caller disconnects or is cancelled (a planner SIGKILLed
  mid-call), the run still finishes and its outcome is stored for the caller's retry.
* A row left ``started`` without an outcome means the tools service itself died during the run, so nobody knows
  whether the tool took effect. Such a call is **not run again** (at most once): every later call with the key
  gets a KIND_FAILED error observation saying the earlier attempt was interrupted and its effect is unknown. A
  caller that knows better (it checked the effect) retries under a new key.
* Validation failures (unknown tool, arguments that break the schema, a bad timeout, a missing approval) are
  raised before anything is stored, so a corrected call may reuse the key.

Rows are kept indefinitely: keys are cheap (one row per call) and a key must not be forgotten while a caller may
still retry with it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.common.sqlite import SqliteThread
from services.tools.registry import ToolCallError, ToolErrorKind, ToolOutcome

T = TypeVar("T")

MAX_KEY_CHARS = 128

SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    key TEXT PRIMARY KEY,
    tool TEXT NOT NULL,
    arguments_digest TEXT NOT NULL,
    outcome TEXT,
    start_time REAL NOT NULL,
    end_time REAL
);
"""


@dataclass(frozen=True)
class StoredCall:
    """The call recorded under a key; ``outcome`` is None while it runs, or for ever if its run was interrupted."""

    key: str
    tool: str
    arguments_digest: str
    outcome: ToolOutcome | None


def encode_outcome(outcome: ToolOutcome) -> str:
    """The outcome as JSON text (the result is JSON already; the error keeps its kind and message)."""
    data: dict[str, Any] = {"name": outcome.name, "duration_seconds": outcome.duration_seconds}
    if outcome.error is not None:
        data["error"] = {"kind": outcome.error.kind.value, "message": outcome.error.message}
    else:
        data["result"] = outcome.result
    return json.dumps(data, ensure_ascii=False, allow_nan=False)


def decode_outcome(text: str) -> ToolOutcome:
    """The inverse of ``encode_outcome``."""
    data = json.loads(text)
    error = data.get("error")
    return ToolOutcome(
        name=data["name"],
        duration_seconds=data["duration_seconds"],
        result=data.get("result"),
        error=ToolCallError(ToolErrorKind(error["kind"]), error["message"]) if error is not None else None,
    )


class IdempotencyStore(Protocol):
    """Where calls with an idempotency key are claimed and their outcomes kept; every replica of the tools service
    that may receive a key must share one (``OutcomeStore``: one process; ``PostgresOutcomeStore``: any number).

    * ``claim`` returns None to exactly one caller of a new key, which then runs the call and ``record``s its outcome.
      Any other caller gets the StoredCall under the key: at once when its outcome is recorded; after waiting for the
      outcome while the claimer is still alive; with ``outcome`` None when the claimer died before recording (its
      effect is unknown). A store may raise UnavailableError when an outcome takes longer than any run may.
    * ``record`` raises ValueError when nothing was claimed under the key, or its outcome is recorded already.
    * ``open`` connects (ConfigError naming the setting when it cannot); after ``close`` every method raises
      RuntimeError.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, key: str, tool: str, arguments_digest: str) -> StoredCall | None: ...

    async def record(self, key: str, outcome: ToolOutcome) -> None: ...

    async def get(self, key: str) -> StoredCall | None: ...


class OutcomeStore:
    """Calls and their outcomes by idempotency key in one SQLite file, created with its parent directory on first use;
    an ``IdempotencyStore`` for one process (the file's only user).

    Every method is a coroutine that runs its SQL on one dedicated thread, so the event loop never blocks on disk and
    the connection is only used by the thread that opened it. Commits are fsynced (synchronous=FULL): a ``started``
    row must survive a crash of the machine, not only of the process, or a tool could run twice. A started row this
    process did not claim was left by an earlier process, which died before recording its outcome.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = SqliteThread(path, lambda conn: conn.executescript(SCHEMA), name="tools-outcomes")
        # Keys this process is claiming or has claimed and not recorded yet: their other claimers wait here.
        self._claimed: dict[str, asyncio.Future[None]] = {}

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._db.call(fn)

    async def open(self) -> None:
        """Nothing to connect: the file is created on first use."""

    async def close(self) -> None:
        """Closes the connection; the store must not be used afterwards (claims still waiting raise RuntimeError)."""
        await self._db.close()
        for key in list(self._claimed):
            self._release(key)

    def _release(self, key: str) -> None:
        claimed = self._claimed.pop(key, None)
        if claimed is not None and not claimed.done():
            claimed.set_result(None)

    async def claim(self, key: str, tool: str, arguments_digest: str) -> StoredCall | None:
        """None when ``key`` was new and is now recorded as started (the caller runs the call); else what it holds,
        once the claimer in this process has recorded its outcome."""
        while (claimed := self._claimed.get(key)) is not None:
            await asyncio.shield(claimed)  # a cancelled waiter must not resolve the future for everyone
        # Taken before the INSERT, so a second claim in this process waits instead of reading the started row.
        self._claimed[key] = asyncio.get_running_loop().create_future()

        def claim(c: sqlite3.Connection) -> StoredCall | None:
            inserted = c.execute(
                "INSERT INTO outcomes (key, tool, arguments_digest, start_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, tool, arguments_digest, time.time()),
            ).rowcount
            return None if inserted else _get(c, key)

        try:
            stored = await self._call(claim)
        except BaseException:
            self._release(key)
            raise
        if stored is not None:
            self._release(key)
        return stored

    async def record(self, key: str, outcome: ToolOutcome) -> None:
        """Stores the outcome of the call ``claim`` recorded as started under ``key``; ValueError if there is none."""

        def record(c: sqlite3.Connection) -> None:
            updated = c.execute(
                "UPDATE outcomes SET outcome = ?, end_time = ? WHERE key = ? AND outcome IS NULL",
                (encode_outcome(outcome), time.time(), key),
            ).rowcount
            if not updated:
                raise ValueError(f"no started call under idempotency key {key!r} to record an outcome for")

        try:
            await self._call(record)
        finally:
            self._release(key)

    async def get(self, key: str) -> StoredCall | None:
        """The call recorded under ``key``, or None."""
        return await self._call(lambda c: _get(c, key))


def _get(c: sqlite3.Connection, key: str) -> StoredCall | None:
    row = c.execute("SELECT tool, arguments_digest, outcome FROM outcomes WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    tool, digest, outcome = row
    return StoredCall(key, tool, digest, decode_outcome(outcome) if outcome is not None else None)

"""The durable journal of the planner: sessions, runs and every event of every run, in SQLite."""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from services.common import NotFoundError
from services.planner.types import Turn, Usage

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    end_time REAL
);
CREATE INDEX IF NOT EXISTS runs_by_session ON runs(session_id, create_time);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    sequence INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, sequence)
);
"""


class RunState(enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class SessionRecord:
    """A session and its finished turns (succeeded runs), oldest first."""

    session_id: str
    create_time: float
    turns: list[Turn] = field(default_factory=list)


@dataclass(frozen=True)
class RunRecord:
    """A run as stored; ``events`` holds the serialized events in sequence order when asked for."""

    run_id: str
    session_id: str
    task: str
    state: RunState
    answer: str
    usage: Usage
    create_time: float
    end_time: float | None
    events: list[bytes] = field(default_factory=list)


class RunStore:
    """Sessions, runs and their event journal in one SQLite file (WAL), created with its parent directory on first use.

    Every method is a coroutine that runs its SQL on one dedicated thread, so the event loop never blocks on disk and
    the connection is only ever used by the thread that opened it. Unknown ids raise NotFoundError.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner-store")
        self._local = threading.local()
        self._closed = False

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the run store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._in_thread, fn)

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(SCHEMA)
            self._local.conn = conn
        with conn:  # one transaction per call: committed on return, rolled back on an exception
            return fn(conn)

    def _close_in_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    async def close(self) -> None:
        """Closes the connection; the store must not be used afterwards."""
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_in_thread)
            self._executor.shutdown(wait=True)

    async def create_session(self) -> SessionRecord:
        session = SessionRecord(session_id=uuid.uuid4().hex, create_time=time.time())
        await self._call(
            lambda c: c.execute("INSERT INTO sessions VALUES (?, ?)", (session.session_id, session.create_time))
        )
        return session

    async def get_session(self, session_id: str, *, last_turns: int | None = None) -> SessionRecord:
        """The session with its succeeded runs as turns, oldest first (only the last ``last_turns`` if given)."""

        def get(c: sqlite3.Connection) -> SessionRecord:
            row = c.execute("SELECT create_time FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"session {session_id!r} does not exist; create one or leave session_id empty")
            rows = c.execute(
                "SELECT run_id, task, answer FROM runs WHERE session_id = ? AND state = ? "
                "ORDER BY create_time DESC, rowid DESC LIMIT ?",
                (session_id, RunState.SUCCEEDED.value, -1 if last_turns is None else last_turns),
            ).fetchall()
            turns = [Turn(task=task, answer=answer, run_id=run_id) for run_id, task, answer in reversed(rows)]
            return SessionRecord(session_id, row[0], turns)

        return await self._call(get)

    async def create_run(self, session_id: str, task: str) -> RunRecord:
        run = RunRecord(uuid.uuid4().hex, session_id, task, RunState.RUNNING, "", Usage(), time.time(), None)
        await self._call(
            lambda c: c.execute(
                "INSERT INTO runs (run_id, session_id, task, state, create_time) VALUES (?, ?, ?, ?, ?)",
                (run.run_id, session_id, task, run.state.value, run.create_time),
            )
        )
        return run

    async def append_event(self, run_id: str, sequence: int, data: bytes) -> None:
        """Journals one serialized event; sequences are unique within a run."""
        await self._call(lambda c: c.execute("INSERT INTO events VALUES (?, ?, ?)", (run_id, sequence, data)))

    async def finish_run(self, run_id: str, state: RunState, answer: str, usage: Usage) -> None:
        """Records how the run ended."""
        await self._call(
            lambda c: c.execute(
                "UPDATE runs SET state = ?, answer = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?, "
                "cached_prompt_tokens = ?, end_time = ? WHERE run_id = ?",
                (
                    state.value,
                    answer,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.total_tokens,
                    usage.cached_prompt_tokens,
                    time.time(),
                    run_id,
                ),
            )
        )

    async def get_run(self, run_id: str, *, with_events: bool = True) -> RunRecord:
        def get(c: sqlite3.Connection) -> RunRecord:
            row = c.execute(
                "SELECT run_id, session_id, task, state, answer, prompt_tokens, completion_tokens, total_tokens, "
                "cached_prompt_tokens, create_time, end_time FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"run {run_id!r} does not exist; use the run_id from a Run event")
            events = []
            if with_events:
                events = [
                    data
                    for (data,) in c.execute("SELECT data FROM events WHERE run_id = ? ORDER BY sequence", (run_id,))
                ]
            return RunRecord(
                row[0], row[1], row[2], RunState(row[3]), row[4], Usage(*row[5:9]), row[9], row[10], events
            )

        return await self._call(get)

    async def unfinished_runs(self) -> list[tuple[str, int]]:
        """Runs still marked RUNNING (a planner stopped under them) with their last event's sequence number."""
        return await self._call(
            lambda c: c.execute(
                "SELECT r.run_id, COALESCE(MAX(e.sequence), 0) FROM runs r LEFT JOIN events e ON e.run_id = r.run_id "
                "WHERE r.state = ? GROUP BY r.run_id",
                (RunState.RUNNING.value,),
            ).fetchall()
        )

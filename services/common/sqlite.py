"""SQLite for asyncio services: one connection on one dedicated thread, one transaction per call."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteThread:
    """Runs functions of a connection on one thread, so the event loop never blocks on disk and the connection is
    only used by the thread that opened it. The file and its parent directory are created on first use, in WAL mode
    with synchronous=FULL (a committed row survives the machine losing power, not only the process dying);
    ``prepare(connection)`` then sets the schema up. Each ``call`` is one transaction: committed when ``fn`` returns,
    rolled back when it raises."""

    def __init__(self, path: Path | str, prepare: Callable[[sqlite3.Connection], object], *, name: str) -> None:
        self.path = Path(path)
        self._prepare = prepare
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._local = threading.local()
        self._closed = False

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError(f"the {self._name} database is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_thread, fn)

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._prepare(conn)
            self._local.conn = conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _close_in_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    async def close(self) -> None:
        """Closes the connection; ``call`` raises afterwards."""
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_in_thread)
            self._executor.shutdown(wait=True)


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...]) -> None:
    """Brings the schema to ``len(migrations)`` (PRAGMA user_version): entry i moves version i to i + 1, each in its
    own transaction, so a database made by an older release is upgraded on open and an empty one runs them all."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(migrations[version:], start=version):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

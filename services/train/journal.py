"""The planner's journal as the trainer reads it: the same store the planner's config names."""

from __future__ import annotations

from services.common import MeshConfig
from services.planner.pg_store import PostgresRunStore
from services.planner.store import JournalStore, RunStore


def open_journal(config: MeshConfig) -> JournalStore:
    """The planner's journal: its PostgreSQL database when ``planner.database_url`` is set, else its SQLite file."""
    planner = config.planner
    if planner.database_url:
        return PostgresRunStore(planner.database_url, lease_seconds=planner.lease_seconds)
    return RunStore(planner.db_path or config.data_dir / "planner.db")

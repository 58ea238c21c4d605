"""Relay state: the Store interface, its implementations, and the domain model."""

from __future__ import annotations

from pathlib import Path

from state.store import CursorMoved, Store
from state.target import StateUnavailable, is_postgres_url


def open_store(target: str | Path) -> Store:
    """The store a config's ``state`` names: a ``postgresql://`` (or ``postgres://``) URL
    opens a PostgresStore (``pip install profile-relay[postgres]``), anything else the
    SQLite file, the embedded default. Raises StateUnavailable, one line naming ``state``
    with no password in it, when the store cannot be opened."""
    if is_postgres_url(target):
        from state.postgres_store import PostgresStore

        return PostgresStore(str(target))
    from state.sqlite_store import SqliteStore

    return SqliteStore(target)


__all__ = ["CursorMoved", "StateUnavailable", "Store", "open_store"]

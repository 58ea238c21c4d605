"""Relay state: the Store interface, its implementations, and the domain model."""

from __future__ import annotations

from pathlib import Path

from state.store import CursorMoved, Store


def open_store(target: str | Path) -> Store:
    """The store a config's ``state`` names (a SQLite file, the embedded default)."""
    from state.sqlite_store import SqliteStore

    return SqliteStore(target)


__all__ = ["CursorMoved", "Store", "open_store"]

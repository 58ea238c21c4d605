"""Opening the SQLite store: WAL, busy timeouts, migrations, and write transactions.

Every other module reaches the database through ``state``; no SQL lives elsewhere.
"""

from __future__ import annotations

import sqlite3
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from state.model import SHARD_COUNT as SHARDS
from state.schema import MIGRATIONS

BUSY_TIMEOUT_MS = 60_000


def shard_of(profile_id: str) -> int:
    """Stable shard of a profile (crc32, not Python's salted ``hash()``)."""
    return zlib.crc32(profile_id.encode()) % SHARDS


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the store at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)
    configure(conn)
    db = sqlite_utils.Database(conn)
    migrate(db)
    return db


def configure(conn: sqlite3.Connection) -> None:
    """The pragmas and functions of every connection to a store (also used by the
    benchmarks' bare-SQL baselines, so both sides run with the same settings)."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    # 16 MiB a connection (SQLite's default is 2): a bigger cache kept filling for 20 minutes
    # of a soak as the store grew (resident memory +25 %), and a 256 MiB one saved 2 % of
    # ingest CPU; the OS page cache holds the rest of the file anyway
    conn.execute("PRAGMA cache_size = -16384")
    # Deleted rows are zeroed where they lay in a page (FAST: no extra I/O, within noise in
    # the ingest and dispatch benchmarks), so a forgotten profile leaves no stale copy in a
    # page still in use; a forget zeroes the free pages too (``state.erase``).
    conn.execute("PRAGMA secure_delete = FAST")
    # Checkpoints run inside COMMIT; at the default 1,000 pages they came every few rounds
    # of the dispatcher and doubled the cost of recording outcomes (bench/dispatch.py).
    conn.execute("PRAGMA wal_autocheckpoint = 10000")
    conn.create_function("relay_shard", 1, shard_of, deterministic=True)


@contextmanager
def write_txn(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken with BEGIN IMMEDIATE so concurrent writers queue on the
    busy timeout instead of failing with 'database is locked' on a read-to-write upgrade."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def migrate(db: sqlite_utils.Database) -> int:
    """Apply the migrations this database has not seen yet; returns the schema version."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current >= len(MIGRATIONS):
        return current
    with write_txn(db):
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    return len(MIGRATIONS)


def statements(script: str) -> Iterator[str]:
    """The statements of a migration script, split at the semicolons that end one (not those
    inside a trigger's body or a string)."""
    pending = ""
    for piece in script.split(";"):
        pending = f"{pending};{piece}" if pending else piece
        if sqlite3.complete_statement(pending + ";"):
            if pending.strip():
                yield pending
            pending = ""
    if pending.strip():
        yield pending

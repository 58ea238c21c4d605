"""Erasing state: forgetting profiles (every trace, overwritten on disk) and dropping the
state of a dataflow that left the config.

A deleted row's bytes stay in the file until SQLite reuses the space, so ``forget``
overwrites them: the connection zeroes what it deletes inside pages (``secure_delete``,
FAST for every connection, ON for the forget's transaction, which also zeroes pages it
frees), then fills every free page with zeros, and checkpoints the WAL into the file and
truncates it. A store created by an earlier version, whose deletes were not zeroed, is
rewritten once (VACUUM) by its first forget.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import sqlite_utils

from state.db import now_ms, write_txn
from state.model import Forgotten

SCRUB_PAGES_PER_ROW = 16_384

# (what a user reads, table): the order ``forget`` reports them in. Memberships live in the
# profile row (state/schema.py, migration 6): they are counted from it, and go with it.
FORGET_KINDS = (
    ("profiles", "profiles"),
    ("memberships", None),
    ("change log rows", "changes"),
    ("queued exports", "outbox"),
    ("dataflow snapshots", "dataflow_profiles"),
    ("failed requests", "failed_requests"),
    ("delivery records", "deliveries"),
)
DROP_KINDS = (
    ("dataflow", "dataflows", "name"),
    ("mapped segments", "dataflow_segments", "dataflow"),
    ("unmapped segments", "dataflow_unmapped_segments", "dataflow"),
    ("profile snapshots", "dataflow_profiles", "dataflow"),
    ("backfills", "backfills", "dataflow"),
    ("queued exports", "outbox", "dataflow"),
    ("failed requests", "failed_requests", "dataflow"),
    ("delivery records", "deliveries", "dataflow"),
    ("skip counts", "skipped_exports", "dataflow"),
    ("leases", "leases", "dataflow"),
    ("circuit breaker", "breakers", "dataflow"),
)


def forget(db: sqlite_utils.Database, profile_ids: Sequence[str]) -> Forgotten:
    """Erase every row about these profiles in one transaction, then overwrite the space
    they used (see the module's docstring)."""
    conn = db.conn
    ids = orjson.dumps(sorted(set(profile_ids))).decode()
    result = Forgotten()
    conn.execute("PRAGMA secure_delete = ON")
    try:
        with write_txn(db) as txn:
            memberships = txn.execute(
                "SELECT count(*) FROM profiles p, json_each(CAST(p.segments AS TEXT)) "
                "WHERE p.profile_id IN (SELECT value FROM json_each(?))", (ids,)).fetchone()[0]
            for kind, table in FORGET_KINDS:
                result.counts[kind] = memberships if table is None else txn.execute(
                    f"DELETE FROM {table} WHERE profile_id IN (SELECT value FROM json_each(?))",
                    (ids,)).rowcount
            # a decision read before this forget may still name these profiles: the queueing
            # transaction checks for them when a forget happened since (``queue_exports``)
            txn.execute("INSERT INTO store_flags (name, value) VALUES ('last_forget_at', ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (now_ms(),))
            # A backfill's resume point names the last profile of its last chunk: step back
            # to the profile before it, which resumes at the same place.
            txn.execute(
                "UPDATE backfills SET after_profile = coalesce((SELECT max(profile_id) FROM profiles "
                "WHERE profile_id < backfills.after_profile), '') "
                "WHERE after_profile IN (SELECT value FROM json_each(?))", (ids,))
        result.free_pages_zeroed = _zero_free_pages(db)
        clean = conn.execute("SELECT value FROM store_flags WHERE name = 'deletes_zeroed'").fetchone()
        if not (clean and clean[0]):
            conn.execute("VACUUM")
            with write_txn(db) as txn:
                txn.execute("UPDATE store_flags SET value = 1 WHERE name = 'deletes_zeroed'")
            result.rewritten = True
    finally:
        conn.execute("PRAGMA secure_delete = FAST")
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    result.wal_truncated = busy == 0
    return result


def _zero_free_pages(db: sqlite_utils.Database) -> int:
    """Overwrite every page on the free list with zeros: one zero-filled blob takes them
    all (SQLite allocates from the free list first), and deleting it with secure_delete on
    gives them back zeroed. Returns the number of free pages."""
    conn = db.conn
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if not free:
        return 0
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    with write_txn(db) as txn:
        for start in range(0, free, SCRUB_PAGES_PER_ROW):  # blobs stay well under SQLite's 1 GB
            pages = min(SCRUB_PAGES_PER_ROW, free - start)
            txn.execute("INSERT INTO free_page_scrub (zeros) VALUES (zeroblob(?))",
                        (pages * (page - 4),))
        txn.execute("DELETE FROM free_page_scrub")
    return free


def drop_dataflow(db: sqlite_utils.Database, name: str) -> dict[str, int]:
    """Erase every row of a dataflow's state in one transaction; rows per kind."""
    with write_txn(db) as txn:
        return {kind: txn.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,)).rowcount
                for kind, table, column in DROP_KINDS}


__all__ = ["DROP_KINDS", "FORGET_KINDS", "drop_dataflow", "forget"]

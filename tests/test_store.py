"""The store's migrations: a database made by an older release is brought up to date in
place, its data kept; opening an up-to-date one changes nothing."""

from __future__ import annotations

import sqlite3

from state.db import open_db
from state.schema import MIGRATIONS


def test_old_database_is_migrated_with_its_data(tmp_path):
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + ";\nCREATE TABLE schema_version (version INTEGER NOT NULL);"
                       "INSERT INTO schema_version VALUES (1);"
                       "INSERT INTO profile_segments VALUES ('p-1', 'seg-a', 'realized', NULL);"
                       "INSERT INTO outbox (dataflow, profile_id, shard, seq, idempotency_key, body,"
                       " reason, change_at, enqueued_at) VALUES ('f', 'p-1', 1, 7, 'k', x'7b7d',"
                       " 'attribute', 1, 2);")
    conn.close()
    db = open_db(path)
    assert db.conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    # memberships moved into the profile row (migration 6), their table and its by-segment
    # index with them; the long form stays readable as a view
    assert db.conn.execute("SELECT count(*) FROM sqlite_master WHERE name = "
                           "'profile_segments_by_segment'").fetchone()[0] == 0
    assert db.conn.execute("SELECT status FROM profile_segments").fetchone()[0] == "realized"
    assert db.conn.execute("SELECT qualified FROM profiles WHERE profile_id = 'p-1'"
                           ).fetchone()[0] == "\nseg-a\n"
    # the outbox moved to a rowid table of references with its waiting export intact
    assert db.conn.execute("SELECT profile_id, seq, reason, attempts FROM outbox").fetchall() == [
        ("p-1", 7, "attribute", 0)]
    outbox_sql = db.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
    assert "WITHOUT ROWID" not in outbox_sql and "UNIQUE (dataflow, profile_id)" in outbox_sql
    assert "body" not in outbox_sql and "idempotency_key" not in outbox_sql


def test_reopening_is_a_no_op(tmp_path):
    open_db(tmp_path / "relay.db")
    db = open_db(tmp_path / "relay.db")
    versions = [v for (v,) in db.conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_lease_of_a_process_that_died_on_this_host_is_taken_at_once(tmp_path):
    """The embedded store lives on one machine: after a crash, the restarted owner need not
    wait for the lease to run out."""
    import subprocess

    from state import open_store
    from state.leases import owner_id

    store = open_store(tmp_path / "relay.db")
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = owner_id("run-1").split(":")
    crashed[1] = str(dead.pid)
    epoch = store.acquire_lease("f", 0, ":".join(crashed), ttl_ms=60_000)
    assert store.acquire_lease("f", 0, owner_id("run-2"), ttl_ms=60_000) == epoch + 1
    # a live owner keeps its lease until it runs out, whoever asks
    assert store.acquire_lease("f", 0, owner_id("run-3"), ttl_ms=60_000) is None
    assert store.acquire_lease("f", 0, "other-host:1:run-x", ttl_ms=60_000) is None

"""Per-dataflow state: registration, segment mappings, cursors, snapshots, backfill jobs,
and the one transaction that queues exports into the outbox."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import sqlite_utils

from state.db import now_ms, shard_of, write_txn
from state.model import (
    REMAP_BACKFILL,
    Backfill,
    CursorMoved,
    Export,
    StoredDataflow,
    SyncResult,
)

FORGET_CHECK_MARGIN_MS = 60_000  # clocks of two processes on one host, and a little more


def max_seq(db: sqlite_utils.Database) -> int:
    return db.conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]


def sync_dataflow(db: sqlite_utils.Database, name: str, destination: str,
                  segments: Sequence[str], mapping_hash: str,
                  endpoint: str | None = None) -> SyncResult:
    """Bring the stored mapping in line with the config, recording mapping times and
    queueing backfills for a new dataflow or newly mapped segments. A segment unmapped is
    remembered (``unmapped_segments``), so mapping it again is known as a remap. Also
    clears the mark of a dataflow that was removed from the config (``resumed``) and
    records a change of destination or endpoint (``moved_from``)."""
    wanted_set = set(segments)
    row = db.conn.execute("SELECT mapping_hash, endpoint, removed_at FROM dataflows "
                          "WHERE name = ?", (name,)).fetchone()
    if (row is not None and row[0] == mapping_hash and row[2] is None
            and (endpoint is None or row[1] == endpoint)
            and wanted_set == {s for (s,) in db.conn.execute(
                "SELECT segment_id FROM dataflow_segments WHERE dataflow = ?", (name,))}):
        return SyncResult(False, (), ())  # the usual case: a read, no write transaction
    now = now_ms()
    with write_txn(db) as conn:
        row = conn.execute("SELECT mapping_hash, destination, endpoint, removed_at FROM dataflows "
                           "WHERE name = ?", (name,)).fetchone()
        stored = {s for (s,) in conn.execute(
            "SELECT segment_id FROM dataflow_segments WHERE dataflow = ?", (name,))}
        wanted = list(dict.fromkeys(segments))
        new = [s for s in wanted if s not in stored]
        removed = sorted(stored - set(wanted))
        moved_from = None
        if row is None:
            conn.execute("INSERT INTO dataflows (name, destination, mapping_hash, created_at, cursor, "
                         "endpoint) VALUES (?, ?, ?, ?, (SELECT coalesce(max(seq), 0) FROM changes), ?)",
                         (name, destination, mapping_hash, now, endpoint))
        else:
            if row[0] != mapping_hash:
                conn.execute("UPDATE dataflows SET mapping_hash = ?, destination = ? WHERE name = ?",
                             (mapping_hash, destination, name))
                conn.execute("UPDATE dataflow_segments SET mapping_updated_at = ? WHERE dataflow = ?",
                             (now, name))
            if endpoint is not None and row[2] != endpoint:
                conn.execute("UPDATE dataflows SET endpoint = ? WHERE name = ?", (endpoint, name))
            # an endpoint stored before this was recorded is set silently
            if row[1] != destination or (endpoint is not None and row[2] is not None
                                         and row[2] != endpoint):
                moved_from = (row[1], row[2])
                conn.execute("UPDATE dataflows SET destination = ? WHERE name = ?",
                             (destination, name))
            if row[3] is not None:
                conn.execute("UPDATE dataflows SET removed_at = NULL WHERE name = ?", (name,))
        conn.executemany("DELETE FROM dataflow_segments WHERE dataflow = ? AND segment_id = ?",
                         [(name, s) for s in removed])
        conn.executemany("INSERT INTO dataflow_unmapped_segments (dataflow, segment_id, unmapped_at) "
                         "VALUES (?, ?, ?) ON CONFLICT (dataflow, segment_id) DO UPDATE SET "
                         "unmapped_at = excluded.unmapped_at", [(name, s, now) for s in removed])
        remapped = [s for (s,) in conn.execute(
            "SELECT segment_id FROM dataflow_unmapped_segments WHERE dataflow = ? "
            "AND segment_id IN (SELECT value FROM json_each(?))",
            (name, orjson.dumps(new).decode()))] if new and row is not None else []
        conn.executemany("DELETE FROM dataflow_unmapped_segments WHERE dataflow = ? AND segment_id = ?",
                         [(name, s) for s in remapped])
        conn.executemany("INSERT INTO dataflow_segments VALUES (?, ?, ?, ?)",
                         [(name, s, now, now) for s in new])
        if row is None:
            conn.execute("INSERT INTO backfills (dataflow, segment_id, reason, created_at) "
                         "VALUES (?, NULL, 'new dataflow', ?)", (name, now))
        else:
            conn.executemany(
                "INSERT INTO backfills (dataflow, segment_id, reason, created_at) VALUES (?, ?, ?, ?)",
                [(name, s, REMAP_BACKFILL if s in remapped else "segment newly mapped", now)
                 for s in new])
    remapped_set = set(remapped)
    return SyncResult(row is None, tuple(new), tuple(removed),
                      tuple(s for s in new if s in remapped_set),
                      row is not None and row[3] is not None, moved_from)


def unmapped_segments(db: sqlite_utils.Database, dataflow: str) -> list[str]:
    """Segments the dataflow mapped once and no longer maps."""
    return [s for (s,) in db.conn.execute(
        "SELECT segment_id FROM dataflow_unmapped_segments WHERE dataflow = ? ORDER BY segment_id",
        (dataflow,))]


def stale_qualified(db: sqlite_utils.Database, dataflow: str, segments: Sequence[str],
                    after: str, limit: int) -> list[str]:
    """The next ``limit`` profiles (in profile order, after ``after``) that the dataflow
    last saw qualified for one of ``segments`` and that are not qualified for it now."""
    return [pid for (pid,) in db.conn.execute(
        "SELECT d.profile_id FROM dataflow_profiles d WHERE d.dataflow = ?1 "
        "AND d.profile_id > ?3 AND d.qualified != '' AND EXISTS (SELECT 1 FROM json_each(?2) s "
        "WHERE instr(char(10) || d.qualified || char(10), char(10) || s.value || char(10)) > 0 "
        "AND NOT EXISTS (SELECT 1 FROM profiles p WHERE p.profile_id = d.profile_id "
        "AND instr(p.qualified, char(10) || s.value || char(10)) > 0)) "
        "ORDER BY d.profile_id LIMIT ?4",
        (dataflow, orjson.dumps(list(segments)).decode(), after, limit))]


def stored_dataflows(db: sqlite_utils.Database) -> list[StoredDataflow]:
    return [StoredDataflow(*row) for row in db.conn.execute(
        "SELECT name, destination, endpoint, created_at, cursor, removed_at FROM dataflows "
        "ORDER BY name")]


def mark_removed(db: sqlite_utils.Database, keep: Sequence[str]) -> list[str]:
    """Mark the stored dataflows not in ``keep`` (the config's) as removed; returns those
    newly marked. A read when nothing changed."""
    keep_json = orjson.dumps(list(keep)).decode()
    gone_sql = ("SELECT name FROM dataflows WHERE removed_at IS NULL "
                "AND name NOT IN (SELECT value FROM json_each(?)) ORDER BY name")
    if not db.conn.execute(gone_sql, (keep_json,)).fetchone():
        return []
    with write_txn(db) as conn:
        gone = [n for (n,) in conn.execute(gone_sql, (keep_json,))]
        conn.executemany("UPDATE dataflows SET removed_at = ? WHERE name = ?",
                         [(now_ms(), n) for n in gone])
    return gone


def cursor(db: sqlite_utils.Database, dataflow: str) -> int:
    row = db.conn.execute("SELECT cursor FROM dataflows WHERE name = ?", (dataflow,)).fetchone()
    if row is None:
        raise KeyError(f"dataflow {dataflow!r} has not run yet")
    return row[0]


def mapping_times(db: sqlite_utils.Database, dataflow: str) -> dict[str, tuple[int, int]]:
    return {seg: (created, updated) for seg, created, updated in db.conn.execute(
        "SELECT segment_id, mapping_created_at, mapping_updated_at FROM dataflow_segments "
        "WHERE dataflow = ?", (dataflow,))}


def read_changes(db: sqlite_utils.Database, after: int, limit: int) -> list[tuple]:
    """Change-log rows after ``after``: (seq, profile_id, committed_at, attr_paths,
    identity_changed, segments)."""
    return db.conn.execute(
        "SELECT seq, profile_id, committed_at, attr_paths, identity_changed, segments FROM changes "
        "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()


def memberships(db: sqlite_utils.Database, profile_ids: Sequence[str],
                segments: Sequence[str]) -> list[tuple[str, str, str]]:
    """(profile, segment, status) of these profiles in these segments."""
    return db.conn.execute(
        "SELECT p.profile_id, j.key, j.value ->> 0 FROM profiles p, json_each(CAST(p.segments AS TEXT)) j "
        "WHERE p.profile_id IN (SELECT value FROM json_each(?)) "
        "AND j.key IN (SELECT value FROM json_each(?))",
        (orjson.dumps(list(profile_ids)).decode(), orjson.dumps(list(segments)).decode()),
    ).fetchall()


def snapshots(db: sqlite_utils.Database, dataflow: str,
              profile_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """What the dataflow last saw of each profile, in one read: its qualified mapped
    segments, and the newest change seq already queued for it (by streaming or a backfill)."""
    return {pid: (qualified, exported) for pid, qualified, exported in db.conn.execute(
        "SELECT profile_id, qualified, exported_seq FROM dataflow_profiles WHERE dataflow = ? "
        "AND profile_id IN (SELECT value FROM json_each(?))",
        (dataflow, orjson.dumps(list(profile_ids)).decode()))}


def _tracked(qualified: str, keep: frozenset[str]) -> str:
    """Of a ``profiles.qualified`` value, the segments in ``keep``, sorted, newline
    separated (the snapshot's form)."""
    if not qualified:
        return ""
    return "\n".join(seg for seg in qualified[1:-1].split("\n") if seg in keep)


def backfill_rows(db: sqlite_utils.Database, profile_ids: Sequence[str],
                  mapped_segments: Sequence[str]) -> list[tuple[str, int, str]]:
    """For the stored profiles among ``profile_ids``, in profile order: (profile, last
    change seq, the mapped segments it is qualified for, sorted and newline separated)."""
    if not profile_ids:
        return []
    keep = frozenset(mapped_segments)
    return [(pid, last_seq, _tracked(qualified, keep)) for pid, last_seq, qualified in db.conn.execute(
        "SELECT profile_id, last_seq, qualified FROM profiles "
        "WHERE profile_id IN (SELECT value FROM json_each(?)) ORDER BY profile_id",
        (orjson.dumps(list(profile_ids)).decode(),))]


def queue_exports(db: sqlite_utils.Database, dataflow: str, exports: Sequence[Export],
                  snapshot_updates: Sequence[tuple[str, str]] = (),
                  cursor_from: int | None = None, cursor_to: int | None = None,
                  backfill: tuple[int, str, int] | None = None,
                  read_at: int | None = None) -> None:
    """In one transaction: the exports into the outbox (a newer one replaces an older one
    still waiting), the dataflow's snapshots, and its cursor or backfill progress.
    Exports and snapshots of profiles no longer in the store (forgotten since the caller
    read them) are dropped; ``read_at`` (epoch ms, when the caller read what it decides
    on): that check is only made when a forget happened since."""
    now = now_ms()
    with write_txn(db) as conn:
        if cursor_to is not None:
            moved = conn.execute("UPDATE dataflows SET cursor = ? WHERE name = ? AND cursor = ?",
                                 (cursor_to, dataflow, cursor_from)).rowcount
            if moved != 1:
                raise CursorMoved(dataflow)
        forgot = conn.execute("SELECT value FROM store_flags WHERE name = 'last_forget_at'"
                              ).fetchone() if read_at is not None else None
        if (exports or snapshot_updates) and (
                read_at is None or (forgot is not None
                                    and forgot[0] >= read_at - FORGET_CHECK_MARGIN_MS)):
            gone = {pid for (pid,) in conn.execute(
                "SELECT value FROM json_each(?) WHERE NOT EXISTS "
                "(SELECT 1 FROM profiles WHERE profile_id = value)",
                (orjson.dumps([e.profile_id for e in exports]
                              + [pid for pid, _ in snapshot_updates]).decode(),))}
            if gone:
                exports = [e for e in exports if e.profile_id not in gone]
                snapshot_updates = [u for u in snapshot_updates if u[0] not in gone]
        conn.executemany(
            "INSERT INTO outbox (dataflow, profile_id, shard, seq, reason, change_at, enqueued_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (dataflow, profile_id) DO UPDATE SET seq = excluded.seq, "
            "reason = excluded.reason, change_at = excluded.change_at, "
            "enqueued_at = excluded.enqueued_at, attempts = 0, next_attempt_at = 0, "
            "first_attempt_at = NULL, last_attempt_at = NULL, last_status = NULL, last_error = NULL "
            "WHERE excluded.seq >= outbox.seq",
            [(dataflow, e.profile_id, shard_of(e.profile_id), e.seq, e.reason, e.change_at, now)
             for e in exports])
        rows = [(dataflow, e.profile_id, e.qualified, e.seq) for e in exports]
        rows += [(dataflow, pid, q, 0) for pid, q in snapshot_updates]
        conn.executemany(
            "INSERT INTO dataflow_profiles (dataflow, profile_id, qualified, exported_seq) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (dataflow, profile_id) DO UPDATE SET "
            "qualified = excluded.qualified, "
            "exported_seq = max(dataflow_profiles.exported_seq, excluded.exported_seq)", rows)
        if backfill is not None:
            job, after, done = backfill
            conn.execute("UPDATE backfills SET after_profile = ?, done = done + ? WHERE id = ?",
                         (after, done, job))


def start_backfill(db: sqlite_utils.Database, dataflow: str, segment: str | None,
                   reason: str) -> int:
    with write_txn(db) as conn:
        return conn.execute("INSERT INTO backfills (dataflow, segment_id, reason, created_at) "
                            "VALUES (?, ?, ?, ?)", (dataflow, segment, reason, now_ms())).lastrowid


def open_backfills(db: sqlite_utils.Database, dataflow: str) -> list[Backfill]:
    return [Backfill(*row) for row in db.conn.execute(
        "SELECT id, dataflow, segment_id, reason, total, done, after_profile FROM backfills "
        "WHERE dataflow = ? AND finished_at IS NULL ORDER BY id", (dataflow,))]


def _member_of_any(segments: Sequence[str]) -> tuple[str, list[str]]:
    """SQL true when a ``profiles.qualified`` value names one of ``segments`` (one instr()
    per segment, on bound parameters), and its parameters."""
    if not segments:
        return "0", []
    needles = [f"\n{seg}\n" for seg in dict.fromkeys(segments)]
    return "(" + " OR ".join("instr(qualified, ?) > 0" for _ in needles) + ")", needles


def count_qualified(db: sqlite_utils.Database, segments: Sequence[str]) -> int:
    member, params = _member_of_any(segments)
    # one pass over the table in storage order (no index to walk, no row fetched twice)
    return db.conn.execute(f"SELECT count(*) FROM profiles NOT INDEXED WHERE qualified != '' "
                           f"AND {member}", params).fetchone()[0]


def qualified_after(db: sqlite_utils.Database, segments: Sequence[str], after: str,
                    limit: int) -> list[str]:
    """The next ``limit`` profiles qualified for any of ``segments``, in profile order."""
    member, params = _member_of_any(segments)
    return [pid for (pid,) in db.conn.execute(
        f"SELECT profile_id FROM profiles WHERE profile_id > ? AND qualified != '' AND {member} "
        "ORDER BY profile_id LIMIT ?", [after, *params, limit])]


# A backfill of at most this many chunks reads each chunk with one pass over the table in
# storage order and a sort; a bigger one walks the profiles in key order, which reads every
# profile once over the whole backfill but at random places (several times slower per
# profile than the pass: 3.3 s against 0.6 s for 1,000,000 profiles in random storage
# order), so a segment with few members does not cost a walk of the whole store.
SCAN_CHUNKS = 4


def queue_backfill(db: sqlite_utils.Database, dataflow: str, job: int,
                   segments: Sequence[str], tracked: Sequence[str], after: str,
                   limit: int) -> tuple[str, int] | None:
    """One chunk of a backfill, set-based in one transaction: the next ``limit`` profiles
    (in profile order, after ``after``) qualified for one of ``segments`` are read into a
    temporary table, queued from it with one INSERT ... SELECT into the outbox (their
    current seq, reason ``backfill``; a waiting export is replaced unless newer) and one
    into the dataflow's snapshots (the ``tracked`` segments they are qualified for now,
    sorted), and the job's progress moves to the chunk's last profile. Profiles forgotten
    before this transaction are not in the table, so never queued. Returns (last profile,
    profiles queued), or None when none are left (the progress is then left alone)."""
    member, params = _member_of_any(segments)
    keep = sorted(dict.fromkeys(tracked))
    snapshot = " || ".join("iif(instr(c.qualified, ?) > 0, ?, '')" for _ in keep) or "''"
    snapshot_params = [p for seg in keep for p in (f"\n{seg}\n", f"{seg}\n")]
    now = now_ms()
    with write_txn(db) as conn:
        row = conn.execute("SELECT total FROM backfills WHERE id = ?", (job,)).fetchone()
        scan = row is not None and row[0] is not None and row[0] <= SCAN_CHUNKS * limit
        conn.execute("DROP TABLE IF EXISTS temp.backfill_chunk")
        conn.execute(
            "CREATE TEMP TABLE backfill_chunk AS SELECT profile_id, shard, last_seq, qualified "
            f"FROM profiles{' NOT INDEXED' if scan else ''} WHERE profile_id > ? "
            f"AND qualified != '' AND {member} ORDER BY profile_id LIMIT ?",
            [after, *params, limit])
        last, count = conn.execute("SELECT max(profile_id), count(*) FROM backfill_chunk").fetchone()
        if count:
            conn.execute(
                "INSERT INTO outbox (dataflow, profile_id, shard, seq, reason, change_at, "
                "enqueued_at) SELECT ?1, profile_id, shard, last_seq, 'backfill', ?2, ?2 "
                "FROM backfill_chunk WHERE true ORDER BY profile_id "
                "ON CONFLICT (dataflow, profile_id) DO UPDATE SET seq = excluded.seq, "
                "reason = excluded.reason, change_at = excluded.change_at, "
                "enqueued_at = excluded.enqueued_at, attempts = 0, next_attempt_at = 0, "
                "first_attempt_at = NULL, last_attempt_at = NULL, last_status = NULL, "
                "last_error = NULL WHERE excluded.seq >= outbox.seq", (dataflow, now))
            conn.execute(
                "INSERT INTO dataflow_profiles (dataflow, profile_id, qualified, exported_seq) "
                f"SELECT ?, c.profile_id, rtrim({snapshot}, char(10)), c.last_seq "
                "FROM backfill_chunk c WHERE true ORDER BY c.profile_id "
                "ON CONFLICT (dataflow, profile_id) DO UPDATE SET "
                "qualified = excluded.qualified, "
                "exported_seq = max(dataflow_profiles.exported_seq, excluded.exported_seq)",
                [dataflow, *snapshot_params])
            conn.execute("UPDATE backfills SET after_profile = ?, done = done + ? WHERE id = ?",
                         (last, count, job))
        conn.execute("DROP TABLE temp.backfill_chunk")
    return (last, count) if count else None


def set_backfill_total(db: sqlite_utils.Database, job: int, total: int) -> None:
    with write_txn(db) as conn:
        conn.execute("UPDATE backfills SET total = ? WHERE id = ? AND total IS NULL", (total, job))


def finish_backfill(db: sqlite_utils.Database, job: int) -> None:
    with write_txn(db) as conn:
        conn.execute("UPDATE backfills SET finished_at = ? WHERE id = ?", (now_ms(), job))


def prune_changes(db: sqlite_utils.Database, older_than_ms: int, limit: int) -> int:
    """Delete up to ``limit`` change-log rows committed before ``older_than_ms`` that every
    stored dataflow has read (seq at or below the lowest cursor), oldest first, in one
    short transaction; returns how many. The newest row always stays (it holds the head).
    Reads the ``limit`` oldest rows only, so a poll with nothing old to prune is cheap."""
    with write_txn(db) as conn:
        return conn.execute(
            "DELETE FROM changes WHERE seq IN (SELECT seq FROM (SELECT seq, committed_at "
            "FROM changes WHERE seq <= coalesce((SELECT min(cursor) FROM dataflows), "
            "(SELECT max(seq) FROM changes)) AND seq < (SELECT max(seq) FROM changes) "
            "ORDER BY seq LIMIT ?) WHERE committed_at < ?)", (limit, older_than_ms)).rowcount

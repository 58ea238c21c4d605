"""The delivery side of the store: the outbox as the dispatcher sees it, the delivery log,
and the failed-request store with its replay bookkeeping."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from operator import itemgetter

import orjson
import sqlite_utils

from state.db import now_ms, shard_of, write_txn
from state.model import (
    SKIP_DELIVERED,
    Attempt,
    BreakerState,
    DeliveryRecord,
    FailedEntry,
    Pending,
    newest_per_profile,
)


def due(db: sqlite_utils.Database, dataflow: str, now: int, limit: int,
        shards: tuple[int, int] | None = None, tried_before: int | None = None,
        after_seq: int | None = None) -> list[Pending]:
    """Exports waiting in the outbox whose next attempt is due, oldest change first.
    ``shards``: (index, count) to take only this worker's share of the profiles;
    ``tried_before``: skip exports attempted at or after this time (one try per drain);
    ``after_seq``: never-tried exports only after this seq (the last chunk claimed).

    Read in two parts, merged by seq: exports never tried (``next_attempt_at`` is 0 until
    a retryable failure sets it to a time) and exports whose retry time has come. With an
    index on ``(dataflow, next_attempt_at, seq)`` the first part is read in seq order and
    stops at ``limit`` instead of sorting the whole backlog on every call."""
    if now < 0:
        return []
    where = ""
    extra: list = []
    if tried_before is not None:
        where += " AND (last_attempt_at IS NULL OR last_attempt_at < ?)"
        extra.append(tried_before)
    if shards is not None:
        where += " AND shard % ? = ?"
        extra += [shards[1], shards[0]]
    columns = ("SELECT profile_id, seq, reason, change_at, attempts, first_attempt_at, "
               "coalesce((SELECT delivered_seq FROM dataflow_profiles d WHERE d.dataflow = "
               "outbox.dataflow AND d.profile_id = outbox.profile_id), 0), "
               "redelivery, first_failed_at FROM outbox WHERE dataflow = ? ")
    conn = db.conn
    after = "" if after_seq is None else f" AND seq > {int(after_seq)}"
    fresh = conn.execute(f"{columns}AND next_attempt_at = 0{after}{where} ORDER BY seq LIMIT ?",
                         [dataflow, *extra, limit]).fetchall()
    retries = conn.execute(f"{columns}AND next_attempt_at > 0 AND next_attempt_at <= ?{where} "
                           "ORDER BY seq LIMIT ?", [dataflow, now, *extra, limit]).fetchall()
    if retries:
        fresh = list(heapq.merge(fresh, retries, key=itemgetter(1)))[:limit]
    return [Pending(*row) for row in fresh]


def pending_count(db: sqlite_utils.Database, dataflow: str) -> int:
    return db.conn.execute("SELECT count(*) FROM outbox WHERE dataflow = ?",
                           (dataflow,)).fetchone()[0]


def next_due(db: sqlite_utils.Database, dataflow: str) -> int | None:
    return db.conn.execute("SELECT min(next_attempt_at) FROM outbox WHERE dataflow = ?",
                           (dataflow,)).fetchone()[0]


def record(db: sqlite_utils.Database, dataflow: str, delivered: Sequence[Attempt],
           retrying: Sequence[Attempt], failed: Sequence[Attempt],
           skipped: Sequence[Pending] = (), skip_reason: str = SKIP_DELIVERED) -> None:
    """Write a group of attempts in one transaction, one statement per kind over the whole
    group (``executemany``: measured faster here than binding the group as one JSON array
    read back with ``json_each``). Each row is only touched if the outbox still holds that
    very export (a newer one may have replaced it meanwhile). ``skipped``: exports closed
    unsent (for ``skip_reason``), counted per reason."""
    with write_txn(db) as conn:
        conn.executemany(
            "DELETE FROM outbox WHERE dataflow = ? AND profile_id = ? AND seq = ?",
            [(dataflow, a.item.profile_id, a.item.seq) for a in (*delivered, *failed)]
            + [(dataflow, p.profile_id, p.seq) for p in skipped])
        if skipped:
            conn.execute(
                "INSERT INTO skipped_exports (dataflow, reason, count, last_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (dataflow, reason) DO UPDATE SET count = count + excluded.count, "
                "last_at = excluded.last_at", (dataflow, skip_reason, len(skipped), now_ms()))
        conn.executemany(
            "INSERT INTO deliveries (dataflow, profile_id, seq, idempotency_key, status, attempts, "
            "latency_ms, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(dataflow, a.item.profile_id, a.sent_seq, a.key, a.status, a.item.attempts + 1,
              max(0, a.at - a.item.change_at), a.at) for a in delivered])
        conn.executemany(
            "INSERT INTO dataflow_profiles (dataflow, profile_id, qualified, delivered_seq) "
            "VALUES (?, ?, '', ?) ON CONFLICT (dataflow, profile_id) DO UPDATE SET "
            "delivered_seq = max(delivered_seq, excluded.delivered_seq)",
            [(dataflow, a.item.profile_id, a.sent_seq) for a in delivered])
        conn.executemany(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?, "
            "last_error = ?, first_attempt_at = coalesce(first_attempt_at, ?), last_attempt_at = ? "
            "WHERE dataflow = ? AND profile_id = ? AND seq = ?",
            [(a.next_attempt_at, a.status, a.error, a.at, a.at, dataflow, a.item.profile_id,
              a.item.seq) for a in retrying])
        conn.executemany(
            "INSERT INTO failed_requests (dataflow, profile_id, shard, seq, idempotency_key, reason, "
            "attempts, last_status, last_error, first_attempt_at, last_attempt_at, redelivery, "
            "first_failed_at, next_redelivery_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(dataflow, a.item.profile_id, shard_of(a.item.profile_id), a.sent_seq, a.key,
              a.item.reason, a.item.attempts + 1, a.status, a.error,
              a.item.first_attempt_at or a.at, a.at, a.item.redelivery,
              a.item.first_failed_at or a.at, a.next_attempt_at or None) for a in failed])


_FAILED_COLUMNS = ("SELECT id, profile_id, seq, idempotency_key, reason, attempts, last_status, "
                   "last_error, redelivery, first_failed_at, last_attempt_at, next_redelivery_at "
                   "FROM failed_requests ")


def open_failures(db: sqlite_utils.Database, dataflow: str, since: int | None = None,
                  profiles: Sequence[str] | None = None) -> list[FailedEntry]:
    """The failed store, oldest first; ``since``: entries that failed at or after it
    (epoch ms); ``profiles``: only these profiles'."""
    where, args = "WHERE dataflow = ? AND state = 'failed'", [dataflow]
    if since is not None:
        where += " AND last_attempt_at >= ?"
        args.append(since)
    if profiles is not None:
        where += " AND profile_id IN (SELECT value FROM json_each(?))"
        args.append(orjson.dumps(list(profiles)).decode())
    return [FailedEntry(*row) for row in db.conn.execute(
        f"{_FAILED_COLUMNS}{where} ORDER BY id", args)]


def due_redeliveries(db: sqlite_utils.Database, dataflow: str, now: int,
                     limit: int) -> list[FailedEntry]:
    """Failed-store entries whose automatic redelivery is due, oldest due first."""
    return [FailedEntry(*row) for row in db.conn.execute(
        f"{_FAILED_COLUMNS}WHERE dataflow = ? AND state = 'failed' AND next_redelivery_at "
        "IS NOT NULL AND next_redelivery_at <= ? ORDER BY next_redelivery_at LIMIT ?",
        (dataflow, now, limit))]


def delivery_history(db: sqlite_utils.Database, dataflow: str, profile_id: str,
                     limit: int) -> list[DeliveryRecord]:
    """One profile's deliveries and failures for good, newest first."""
    rows = db.conn.execute(
        "SELECT * FROM (SELECT delivered_at, seq, 'delivered', status, attempts, "
        "idempotency_key, NULL FROM deliveries WHERE dataflow = ?1 AND profile_id = ?2 "
        "UNION ALL SELECT last_attempt_at, seq, 'failed', last_status, attempts, "
        "idempotency_key, last_error FROM failed_requests WHERE dataflow = ?1 "
        "AND profile_id = ?2) ORDER BY 1 DESC LIMIT ?3", (dataflow, profile_id, limit))
    return [DeliveryRecord(*row) for row in rows]


def breaker(db: sqlite_utils.Database, dataflow: str) -> BreakerState:
    row = db.conn.execute("SELECT failures_in_row, paused_at, next_probe_at FROM breakers "
                          "WHERE dataflow = ?", (dataflow,)).fetchone()
    return BreakerState(*row) if row else BreakerState()


def save_breaker(db: sqlite_utils.Database, dataflow: str, state: BreakerState) -> None:
    with write_txn(db) as conn:
        conn.execute("INSERT INTO breakers VALUES (?, ?, ?, ?) ON CONFLICT (dataflow) DO UPDATE "
                     "SET failures_in_row = excluded.failures_in_row, paused_at = "
                     "excluded.paused_at, next_probe_at = excluded.next_probe_at",
                     (dataflow, state.failures_in_row, state.paused_at, state.next_probe_at))


def prune_deliveries(db: sqlite_utils.Database, older_than_ms: int,
                     limit: int | None = None) -> int:
    """Drop delivery-log rows older than ``older_than_ms`` (epoch ms); returns how many.
    The log feeds status and latency figures; left alone it grows with every request.
    ``limit``: at most that many, the oldest, in one short transaction (reading only the
    ``limit`` oldest rows)."""
    with write_txn(db) as conn:
        if limit is None:
            return conn.execute("DELETE FROM deliveries WHERE delivered_at < ?",
                                (older_than_ms,)).rowcount
        return conn.execute(
            "DELETE FROM deliveries WHERE id IN (SELECT id FROM (SELECT id, delivered_at "
            "FROM deliveries ORDER BY id LIMIT ?) WHERE delivered_at < ?)",
            (limit, older_than_ms)).rowcount


def prune_resolved_failures(db: sqlite_utils.Database, older_than_ms: int, limit: int) -> int:
    """Drop up to ``limit`` failed-store entries resolved (re-queued or superseded by a
    replay) before ``older_than_ms``; entries still failed are kept until replayed."""
    with write_txn(db) as conn:
        return conn.execute(
            "DELETE FROM failed_requests WHERE id IN (SELECT id FROM failed_requests "
            "WHERE state != 'failed' AND resolved_at < ? ORDER BY id LIMIT ?)",
            (older_than_ms, limit)).rowcount


def skipped_counts(db: sqlite_utils.Database, dataflow: str) -> dict[str, int]:
    """Exports closed without a request, by reason."""
    return dict(db.conn.execute(
        "SELECT reason, count FROM skipped_exports WHERE dataflow = ? ORDER BY reason",
        (dataflow,)).fetchall())


def requeue(db: sqlite_utils.Database, dataflow: str, entries: Sequence[FailedEntry],
            redelivery: bool = False) -> tuple[list[FailedEntry], list[FailedEntry]]:
    """Replay bookkeeping in one transaction: each profile's newest failed entry goes back
    to the outbox as a reference (sent with the profile's state at send time), and every
    other entry closes as superseded. An entry is superseded too when its profile is gone,
    when an export of it already waits in the outbox (that one sends the current state), or
    when the state the profile is in now was delivered already. All of this is read inside
    the transaction, so a stream run that delivered meanwhile is seen. ``redelivery``: an
    automatic redelivery (the export keeps its count of redeliveries and when it first
    failed), else a replay by hand (the schedule starts again). Returns (re-queued,
    superseded)."""
    now = now_ms()
    newest = newest_per_profile(entries)
    with write_txn(db) as conn:
        pids = orjson.dumps(list(newest)).decode()
        state = dict(conn.execute(
            "SELECT profile_id, last_seq FROM profiles "
            "WHERE profile_id IN (SELECT value FROM json_each(?))", (pids,)).fetchall())
        delivered = dict(conn.execute(
            "SELECT profile_id, delivered_seq FROM dataflow_profiles WHERE dataflow = ? "
            "AND profile_id IN (SELECT value FROM json_each(?))", (dataflow, pids)).fetchall())
        queued = {pid for (pid,) in conn.execute(
            "SELECT profile_id FROM outbox WHERE dataflow = ? "
            "AND profile_id IN (SELECT value FROM json_each(?))", (dataflow, pids))}
        keep = [e for pid, e in newest.items() if pid in state and pid not in queued
                and delivered.get(pid, 0) < state[pid]]
        kept = {e.id for e in keep}
        superseded = [e for e in entries if e.id not in kept]
        conn.executemany(
            "INSERT INTO outbox (dataflow, profile_id, shard, seq, reason, change_at, enqueued_at, "
            "redelivery, first_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (dataflow, profile_id) DO NOTHING",
            [(dataflow, e.profile_id, shard_of(e.profile_id), state[e.profile_id],
              "redelivery" if redelivery else "replay", now, now,
              e.redeliveries + 1 if redelivery else 0,
              e.first_failed_at if redelivery else None) for e in keep])
        done = "redelivered" if redelivery else "requeued"
        conn.executemany("UPDATE failed_requests SET state = ?, resolved_at = ? WHERE id = ?",
                         [(done, now, e.id) for e in keep]
                         + [("superseded", now, e.id) for e in superseded])
    return keep, superseded


class SendLock:
    """Held by the one process sending a dataflow's outbox; see :func:`try_lock_sending`."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import os

            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def try_lock_sending(db: sqlite_utils.Database, dataflow: str) -> SendLock | None:
    """Take the right to send ``dataflow``'s outbox, or None when
    another process has it. A sender works from a round of exports read up front, so a
    second sender could deliver a profile's newer state and then see the first deliver the
    older one (deliveries are in order per profile). An flock on a file beside the store
    keeps one sender at a time, e.g. a stream run and a replay; the kernel drops it when
    the holder dies, so a killed process never leaves it held."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one process at a time is the user's job
        return SendLock(None)
    import hashlib
    import os

    path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:  # an in-memory store has one process by construction
        return SendLock(None)
    name = hashlib.sha256(f"{dataflow}\0None".encode()).hexdigest()[:16]
    fd = os.open(f"{path}-send-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return SendLock(fd)

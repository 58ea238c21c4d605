"""The delivery side of the store: the outbox as the dispatcher sees it, the delivery log,
and the failed-request store with its replay bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import sqlite_utils

from state.db import now_ms, shard_of, write_txn


@dataclass(frozen=True, slots=True)
class Pending:
    profile_id: str
    seq: int
    idempotency_key: str
    body: bytes
    reason: str
    change_at: int
    attempts: int
    first_attempt_at: int | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of sending one pending export once."""

    item: Pending
    status: int | None
    error: str | None
    at: int
    next_attempt_at: int = 0


@dataclass(frozen=True, slots=True)
class FailedEntry:
    id: int
    profile_id: str
    seq: int
    idempotency_key: str
    reason: str
    attempts: int
    last_status: int | None
    last_error: str | None


def due(db: sqlite_utils.Database, dataflow: str, now: int, limit: int,
        shards: tuple[int, int] | None = None, tried_before: int | None = None) -> list[Pending]:
    """Exports waiting in the outbox whose next attempt is due, oldest change first.
    ``shards``: (index, count) to take only this worker's share of the profiles;
    ``tried_before``: skip exports attempted at or after this time (one try per drain)."""
    sql = ("SELECT profile_id, seq, idempotency_key, body, reason, change_at, attempts, "
           "first_attempt_at FROM outbox WHERE dataflow = ? AND next_attempt_at <= ?")
    args: list = [dataflow, now]
    if tried_before is not None:
        sql += " AND (last_attempt_at IS NULL OR last_attempt_at < ?)"
        args.append(tried_before)
    if shards is not None:
        sql += " AND shard % ? = ?"
        args += [shards[1], shards[0]]
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return [Pending(*row) for row in db.conn.execute(sql, args)]


def pending_count(db: sqlite_utils.Database, dataflow: str) -> int:
    return db.conn.execute("SELECT count(*) FROM outbox WHERE dataflow = ?",
                           (dataflow,)).fetchone()[0]


def next_due(db: sqlite_utils.Database, dataflow: str) -> int | None:
    return db.conn.execute("SELECT min(next_attempt_at) FROM outbox WHERE dataflow = ?",
                           (dataflow,)).fetchone()[0]


def record(db: sqlite_utils.Database, dataflow: str, delivered: Sequence[Attempt],
           retrying: Sequence[Attempt], failed: Sequence[Attempt]) -> None:
    """Write a round of attempts in one transaction. Each row is only touched if the
    outbox still holds that very export (a newer one may have replaced it meanwhile)."""
    with write_txn(db) as conn:
        conn.executemany(
            "DELETE FROM outbox WHERE dataflow = ? AND profile_id = ? AND seq = ?",
            [(dataflow, a.item.profile_id, a.item.seq) for a in (*delivered, *failed)])
        conn.executemany(
            "INSERT INTO deliveries (dataflow, profile_id, seq, idempotency_key, status, attempts, "
            "latency_ms, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(dataflow, a.item.profile_id, a.item.seq, a.item.idempotency_key, a.status,
              a.item.attempts + 1, max(0, a.at - a.item.change_at), a.at) for a in delivered])
        conn.executemany(
            "INSERT INTO dataflow_profiles (dataflow, profile_id, qualified, delivered_seq) "
            "VALUES (?, ?, '', ?) ON CONFLICT (dataflow, profile_id) DO UPDATE SET "
            "delivered_seq = max(delivered_seq, excluded.delivered_seq)",
            [(dataflow, a.item.profile_id, a.item.seq) for a in delivered])
        conn.executemany(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?, "
            "last_error = ?, first_attempt_at = coalesce(first_attempt_at, ?), last_attempt_at = ? "
            "WHERE dataflow = ? AND profile_id = ? AND seq = ?",
            [(a.next_attempt_at, a.status, a.error, a.at, a.at, dataflow, a.item.profile_id,
              a.item.seq) for a in retrying])
        conn.executemany(
            "INSERT INTO failed_requests (dataflow, profile_id, shard, seq, idempotency_key, reason, "
            "attempts, last_status, last_error, first_attempt_at, last_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(dataflow, a.item.profile_id, shard_of(a.item.profile_id), a.item.seq,
              a.item.idempotency_key, a.item.reason, a.item.attempts + 1, a.status, a.error,
              a.item.first_attempt_at or a.at, a.at) for a in failed])


def open_failures(db: sqlite_utils.Database, dataflow: str) -> list[FailedEntry]:
    return [FailedEntry(*row) for row in db.conn.execute(
        "SELECT id, profile_id, seq, idempotency_key, reason, attempts, last_status, last_error "
        "FROM failed_requests WHERE dataflow = ? AND state = 'failed' ORDER BY id", (dataflow,))]


def delivered_seqs(db: sqlite_utils.Database, dataflow: str,
                   profile_ids: Sequence[str]) -> dict[str, int]:
    return dict(db.conn.execute(
        "SELECT profile_id, delivered_seq FROM dataflow_profiles WHERE dataflow = ? "
        "AND profile_id IN (SELECT value FROM json_each(?))",
        (dataflow, orjson.dumps(list(profile_ids)).decode())).fetchall())


def queued_seqs(db: sqlite_utils.Database, dataflow: str,
                profile_ids: Sequence[str]) -> dict[str, int]:
    return dict(db.conn.execute(
        "SELECT profile_id, seq FROM outbox WHERE dataflow = ? "
        "AND profile_id IN (SELECT value FROM json_each(?))",
        (dataflow, orjson.dumps(list(profile_ids)).decode())).fetchall())


def requeue(db: sqlite_utils.Database, dataflow: str,
            resend: Sequence[tuple[FailedEntry, bytes]], superseded: Sequence[FailedEntry]) -> None:
    """Replay bookkeeping in one transaction: re-sent entries go back to the outbox with the
    profile's current state under their original idempotency key; superseded ones close."""
    now = now_ms()
    with write_txn(db) as conn:
        conn.executemany(
            "INSERT INTO outbox (dataflow, profile_id, shard, seq, idempotency_key, body, reason, "
            "change_at, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, 'replay', ?, ?) "
            "ON CONFLICT (dataflow, profile_id) DO NOTHING",
            [(dataflow, e.profile_id, shard_of(e.profile_id), e.seq, e.idempotency_key, body,
              now, now) for e, body in resend])
        conn.executemany("UPDATE failed_requests SET state = ?, resolved_at = ? WHERE id = ?",
                         [("requeued", now, e.id) for e, _ in resend]
                         + [("superseded", now, e.id) for e in superseded])

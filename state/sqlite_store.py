"""SqliteStore: the Store on one SQLite file (WAL), the embedded default."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import sqlite_utils

from state import dataflows, erase, leases, outbox, profiles, stats
from state.db import now_ms, open_db
from state.model import (
    SKIP_DELIVERED,
    Attempt,
    Backfill,
    BreakerState,
    DeliveryRecord,
    Export,
    FailedEntry,
    Forgotten,
    Fragment,
    Pending,
    ShardScope,
    StoredDataflow,
    StoredProfile,
    SyncResult,
)
from state.stats import DataflowStats


class SqliteStore:
    """Each thread gets a connection of its own (opened on its first call), so outcomes
    can be recorded on a writer thread while the event loop's thread reads: one SQLite
    connection must never carry two threads' transactions at once."""

    scope: ShardScope | None = None  # shard groups are PostgreSQL's (PostgresStore.scoped)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._opened: list[sqlite_utils.Database] = []
        self._lock = threading.Lock()
        self._local.db = self._open()

    def _open(self) -> sqlite_utils.Database:
        db = open_db(self.path)
        with self._lock:
            self._opened.append(db)
        return db

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    # profiles and the change log
    def append_changes(self, fragments: Sequence[Fragment]) -> int:
        return profiles.apply_fragments(self.db, fragments)

    def append_change_groups(self, groups: Iterable[Sequence[Fragment]]) -> int:
        return profiles.apply_fragment_groups(self.db, groups)

    def load_profiles(self, profile_ids: Sequence[str]) -> dict[str, StoredProfile]:
        return profiles.load_profiles(self.db, profile_ids)

    def profile_count(self) -> int:
        return profiles.profile_count(self.db)

    def head_seq(self) -> int:
        return dataflows.max_seq(self.db)

    def read_changes(self, after: int, limit: int) -> list[tuple]:
        return dataflows.read_changes(self.db, after, limit)

    def memberships(self, profile_ids: Sequence[str],
                    segments: Sequence[str]) -> list[tuple[str, str, str]]:
        return dataflows.memberships(self.db, profile_ids, segments)

    # dataflow state
    def sync_dataflow(self, name: str, destination: str, segments: Sequence[str],
                      mapping_hash: str, endpoint: str | None = None) -> SyncResult:
        return dataflows.sync_dataflow(self.db, name, destination, segments, mapping_hash,
                                       endpoint)

    def unmapped_segments(self, dataflow: str) -> list[str]:
        return dataflows.unmapped_segments(self.db, dataflow)

    def stale_qualified(self, dataflow: str, segments: Sequence[str], after: str,
                        limit: int) -> list[str]:
        return dataflows.stale_qualified(self.db, dataflow, segments, after, limit)

    def stored_dataflows(self) -> list[StoredDataflow]:
        return dataflows.stored_dataflows(self.db)

    def mark_removed(self, keep: Sequence[str]) -> list[str]:
        return dataflows.mark_removed(self.db, keep)

    def drop_dataflow(self, name: str) -> dict[str, int]:
        return erase.drop_dataflow(self.db, name)

    def cursor(self, dataflow: str) -> int:
        return dataflows.cursor(self.db, dataflow)

    def mapping_times(self, dataflow: str) -> dict[str, tuple[int, int]]:
        return dataflows.mapping_times(self.db, dataflow)

    def snapshots(self, dataflow: str, profile_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        return dataflows.snapshots(self.db, dataflow, profile_ids)

    def enqueue_exports(self, dataflow: str, exports: Sequence[Export],
                        snapshot_updates: Sequence[tuple[str, str]] = (),
                        cursor_from: int | None = None, cursor_to: int | None = None,
                        backfill: tuple[int, str, int] | None = None,
                        read_at: int | None = None) -> None:
        dataflows.queue_exports(self.db, dataflow, exports, snapshot_updates, cursor_from,
                                cursor_to, backfill, read_at)

    # backfills
    def start_backfill(self, dataflow: str, segment: str | None, reason: str) -> int:
        return dataflows.start_backfill(self.db, dataflow, segment, reason)

    def open_backfills(self, dataflow: str) -> list[Backfill]:
        return dataflows.open_backfills(self.db, dataflow)

    def count_qualified(self, segments: Sequence[str]) -> int:
        return dataflows.count_qualified(self.db, segments)

    def qualified_after(self, segments: Sequence[str], after: str, limit: int) -> list[str]:
        return dataflows.qualified_after(self.db, segments, after, limit)

    def backfill_rows(self, profile_ids: Sequence[str],
                      mapped_segments: Sequence[str]) -> list[tuple[str, int, str]]:
        return dataflows.backfill_rows(self.db, profile_ids, mapped_segments)

    def queue_backfill(self, dataflow: str, job: int, segments: Sequence[str],
                       tracked: Sequence[str], after: str, limit: int) -> tuple[str, int] | None:
        return dataflows.queue_backfill(self.db, dataflow, job, segments, tracked, after, limit)

    def set_backfill_total(self, job: int, total: int) -> None:
        dataflows.set_backfill_total(self.db, job, total)

    def finish_backfill(self, job: int) -> None:
        dataflows.finish_backfill(self.db, job)

    # the outbox
    def claim_due(self, dataflow: str, now: int, limit: int,
                  tried_before: int | None = None, after_seq: int | None = None) -> list[Pending]:
        return outbox.due(self.db, dataflow, now, limit, tried_before=tried_before,
                          after_seq=after_seq)

    def pending_count(self, dataflow: str) -> int:
        return outbox.pending_count(self.db, dataflow)

    def next_due(self, dataflow: str) -> int | None:
        return outbox.next_due(self.db, dataflow)

    def record_outcomes(self, dataflow: str, delivered: Sequence[Attempt],
                        retrying: Sequence[Attempt], failed: Sequence[Attempt],
                        skipped: Sequence[Pending] = (),
                        skip_reason: str = SKIP_DELIVERED) -> None:
        outbox.record(self.db, dataflow, delivered, retrying, failed, skipped, skip_reason)

    def skipped_counts(self, dataflow: str) -> dict[str, int]:
        return outbox.skipped_counts(self.db, dataflow)

    def lock_sending(self, dataflow: str) -> outbox.SendLock | None:
        """An flock beside the database file: the kernel drops it when the holder dies."""
        return outbox.try_lock_sending(self.db, dataflow)

    # the failed-request store
    def open_failures(self, dataflow: str, since: int | None = None,
                      profiles: Sequence[str] | None = None) -> list[FailedEntry]:
        return outbox.open_failures(self.db, dataflow, since, profiles)

    def due_redeliveries(self, dataflow: str, now: int, limit: int) -> list[FailedEntry]:
        return outbox.due_redeliveries(self.db, dataflow, now, limit)

    def requeue_failures(self, dataflow: str, entries: Sequence[FailedEntry],
                         redelivery: bool = False
                         ) -> tuple[list[FailedEntry], list[FailedEntry]]:
        return outbox.requeue(self.db, dataflow, entries, redelivery)

    def delivery_history(self, dataflow: str, profile_id: str,
                         limit: int = 100) -> list[DeliveryRecord]:
        return outbox.delivery_history(self.db, dataflow, profile_id, limit)

    # the circuit breaker
    def breaker(self, dataflow: str) -> BreakerState:
        return outbox.breaker(self.db, dataflow)

    def save_breaker(self, dataflow: str, state: BreakerState) -> None:
        outbox.save_breaker(self.db, dataflow, state)

    # leases
    def acquire_lease(self, dataflow: str, group: int, owner: str, ttl_ms: int) -> int | None:
        return leases.acquire(self.db, dataflow, group, owner, ttl_ms, now_ms())

    def holds_lease(self, dataflow: str, group: int, epoch: int) -> bool:
        return leases.holds(self.db, dataflow, group, epoch, now_ms())

    def release_lease(self, dataflow: str, group: int, owner: str) -> None:
        leases.release(self.db, dataflow, group, owner)

    # figures and upkeep
    def stats(self, dataflow: str, since_ms: int | None = None) -> DataflowStats:
        return stats.dataflow_stats(self.db, dataflow, since_ms)

    def prune_deliveries(self, older_than_ms: int, limit: int | None = None) -> int:
        return outbox.prune_deliveries(self.db, older_than_ms, limit)

    def prune_changes(self, older_than_ms: int, limit: int) -> int:
        return dataflows.prune_changes(self.db, older_than_ms, limit)

    def prune_resolved_failures(self, older_than_ms: int, limit: int) -> int:
        return outbox.prune_resolved_failures(self.db, older_than_ms, limit)

    # profile lifecycle
    def forget(self, profile_ids: Sequence[str]) -> Forgotten:
        """Deleted rows are zeroed, then the free pages and the WAL (``state.erase``)."""
        return erase.forget(self.db, profile_ids)

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for db in opened:
            db.conn.close()


__all__ = ["SqliteStore"]

"""The Store: every read and write of relay state, as domain verbs.

The pipeline, the flows and the command line talk to a Store and nothing else; only the
implementations in ``state/`` know SQL. ``SqliteStore`` (``state.sqlite_store``) is the
embedded default; a second engine implements the same verbs and runs the same contract
tests (``tests/test_store_contract.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from state.model import (
    SKIP_DELIVERED,
    Attempt,
    Backfill,
    BreakerState,
    CursorMoved,
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

__all__ = ["CursorMoved", "Store"]


class SendLock(Protocol):
    def release(self) -> None: ...


class Store(Protocol):
    scope: ShardScope | None
    """The shard group this store is seen by (``PostgresStore.scoped``), else None."""

    # -- profiles and the change log ---------------------------------------------------
    def append_changes(self, fragments: Sequence[Fragment]) -> int:
        """Merge fragments, in order, and append one change each, in one transaction;
        returns the last change seq."""
    def append_change_groups(self, groups: Iterable[Sequence[Fragment]]) -> int:
        """``append_changes`` for one batch handed over in groups: all groups in one
        transaction (a failure, even while a group is being produced, leaves none of them),
        in order, each merged and written before the next is taken from ``groups``, so a
        caller parsing lines as groups are asked for never holds the batch decoded at once.
        Returns the last change seq (0 when no group held a fragment)."""
    def load_profiles(self, profile_ids: Sequence[str]) -> dict[str, StoredProfile]: ...
    def profile_count(self) -> int: ...
    def head_seq(self) -> int:
        """The newest change seq (0 for an empty log)."""
    def read_changes(self, after: int, limit: int) -> list[tuple]:
        """Changes after ``after``: (seq, profile_id, committed_at, attr_paths,
        identity_changed, segments)."""
    def memberships(self, profile_ids: Sequence[str],
                    segments: Sequence[str]) -> list[tuple[str, str, str]]: ...

    # -- dataflow state --------------------------------------------------------------------
    def sync_dataflow(self, name: str, destination: str, segments: Sequence[str],
                      mapping_hash: str, endpoint: str | None = None) -> SyncResult:
        """Register the dataflow or bring its mapping in line; a segment unmapped is
        remembered, and mapping it again is reported as ``remapped``. ``endpoint`` (no
        query string, no credentials): a change of it or of the destination is reported as
        ``moved_from``. A dataflow marked removed is back: ``resumed``."""
    def unmapped_segments(self, dataflow: str) -> list[str]:
        """Segments the dataflow mapped once and no longer maps."""
    def stale_qualified(self, dataflow: str, segments: Sequence[str], after: str,
                        limit: int) -> list[str]:
        """Profiles (in order, after ``after``) the dataflow's snapshot shows qualified for
        one of ``segments`` that are not qualified for it now: exits it has not seen."""
    def stored_dataflows(self) -> list[StoredDataflow]:
        """Every dataflow with state in the store, in the config or not."""
    def mark_removed(self, keep: Sequence[str]) -> list[str]:
        """Mark stored dataflows not in ``keep`` as removed; returns those newly marked."""
    def drop_dataflow(self, name: str) -> dict[str, int]:
        """Erase all of a dataflow's state in one transaction; rows erased per kind."""
    def cursor(self, dataflow: str) -> int: ...
    def mapping_times(self, dataflow: str) -> dict[str, tuple[int, int]]: ...
    def snapshots(self, dataflow: str, profile_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """profile -> (qualified mapped segments last seen, newest seq queued)."""
    def enqueue_exports(self, dataflow: str, exports: Sequence[Export],
                        snapshot_updates: Sequence[tuple[str, str]] = (),
                        cursor_from: int | None = None, cursor_to: int | None = None,
                        backfill: tuple[int, str, int] | None = None,
                        read_at: int | None = None) -> None:
        """Exports, snapshots and the cursor (or backfill progress) in one transaction;
        raises CursorMoved when the cursor is no longer ``cursor_from``. Exports and
        snapshots of profiles not in the store (forgotten meanwhile) are dropped;
        ``read_at``: when the caller read what it decided on (epoch ms), so that check can
        be skipped when no forget happened since."""

    # -- backfills ---------------------------------------------------------------------------
    def start_backfill(self, dataflow: str, segment: str | None, reason: str) -> int: ...
    def open_backfills(self, dataflow: str) -> list[Backfill]: ...
    def count_qualified(self, segments: Sequence[str]) -> int: ...
    def qualified_after(self, segments: Sequence[str], after: str, limit: int) -> list[str]: ...
    def backfill_rows(self, profile_ids: Sequence[str],
                      mapped_segments: Sequence[str]) -> list[tuple[str, int, str]]: ...
    def queue_backfill(self, dataflow: str, job: int, segments: Sequence[str],
                       tracked: Sequence[str], after: str, limit: int) -> tuple[str, int] | None:
        """One chunk of backfill ``job``, in one transaction and without the profiles
        passing through the caller: the next ``limit`` profiles (in profile order, after
        ``after``) qualified now for one of ``segments`` are queued as exports of their
        current state (seq: their last change; reason ``backfill``; an export already
        waiting is replaced unless its seq is newer), their snapshots get the ``tracked``
        segments they are qualified for (sorted, newline separated; the newest seq queued
        is kept), and the job's progress moves to the last of them (``after_profile``, and
        ``done`` grows by their number). A profile forgotten before the transaction is not
        queued. Returns (last profile, how many), or None when none are left."""
    def set_backfill_total(self, job: int, total: int) -> None: ...
    def finish_backfill(self, job: int) -> None: ...

    # -- the outbox ----------------------------------------------------------------------------
    def claim_due(self, dataflow: str, now: int, limit: int,
                  tried_before: int | None = None, after_seq: int | None = None) -> list[Pending]:
        """Exports due at ``now``, oldest change first, at most ``limit``: those never
        tried (only with a seq after ``after_seq``) and those whose retry time has come
        (not tried at or after ``tried_before``)."""
    def pending_count(self, dataflow: str) -> int: ...
    def next_due(self, dataflow: str) -> int | None:
        """The earliest next-attempt time in the outbox (0: due now; None: empty)."""
    def record_outcomes(self, dataflow: str, delivered: Sequence[Attempt],
                        retrying: Sequence[Attempt], failed: Sequence[Attempt],
                        skipped: Sequence[Pending] = (),
                        skip_reason: str = SKIP_DELIVERED) -> None:
        """One transaction: delivered into the delivery log, retrying rescheduled, failed
        into the failed store; ``skipped`` just closed, and counted under ``skip_reason``."""
    def skipped_counts(self, dataflow: str) -> dict[str, int]:
        """Exports closed without a request, by reason."""
    def lock_sending(self, dataflow: str) -> SendLock | None:
        """The right to send the dataflow's outbox, or None while another process has it;
        one sender at a time keeps each profile's deliveries in order."""

    # -- the failed-request store --------------------------------------------------------------
    def open_failures(self, dataflow: str, since: int | None = None,
                      profiles: Sequence[str] | None = None) -> list[FailedEntry]:
        """The failed store, oldest first; ``since``: only entries that failed at or after
        it (epoch ms); ``profiles``: only these profiles' entries."""
    def due_redeliveries(self, dataflow: str, now: int, limit: int) -> list[FailedEntry]:
        """Entries whose automatic redelivery (``next_redelivery_at``) is due at ``now``."""
    def requeue_failures(self, dataflow: str, entries: Sequence[FailedEntry],
                         redelivery: bool = False
                         ) -> tuple[list[FailedEntry], list[FailedEntry]]:
        """Back into the outbox, each profile once, sent with its state at send time;
        (re-queued, superseded). ``redelivery``: an automatic redelivery, which keeps the
        export's count of redeliveries and the time it first failed; else a replay."""
    def delivery_history(self, dataflow: str, profile_id: str,
                         limit: int = 100) -> list[DeliveryRecord]:
        """A profile's deliveries and failures for good to the dataflow, newest first."""

    # -- the circuit breaker -----------------------------------------------------------------------
    def breaker(self, dataflow: str) -> BreakerState: ...
    def save_breaker(self, dataflow: str, state: BreakerState) -> None: ...

    # -- leases ------------------------------------------------------------------------------
    def acquire_lease(self, dataflow: str, group: int, owner: str, ttl_ms: int) -> int | None: ...
    def holds_lease(self, dataflow: str, group: int, epoch: int) -> bool: ...
    def release_lease(self, dataflow: str, group: int, owner: str) -> None: ...

    # -- figures and upkeep ------------------------------------------------------------------
    def stats(self, dataflow: str, since_ms: int | None = None) -> DataflowStats: ...
    def prune_deliveries(self, older_than_ms: int, limit: int | None = None) -> int:
        """Delivery records older than ``older_than_ms``; ``limit``: at most that many."""
    def prune_changes(self, older_than_ms: int, limit: int) -> int:
        """Up to ``limit`` change-log rows older than ``older_than_ms`` that every stored
        dataflow has read (seq at or below the lowest cursor), oldest first."""
    def prune_resolved_failures(self, older_than_ms: int, limit: int) -> int:
        """Up to ``limit`` failed-store entries resolved by a replay before ``older_than_ms``."""

    # -- profile lifecycle ---------------------------------------------------------------------
    def forget(self, profile_ids: Sequence[str]) -> Forgotten:
        """Erase every trace of these profiles (profile, memberships, change log, queued
        exports, snapshots, failed store, delivery records) in one transaction, leaving none
        of their bytes in the store's files. A later fragment starts a new profile."""
    def close(self) -> None: ...

"""The Store: every read and write of relay state, as domain verbs.

The pipeline, the flows and the command line talk to a Store and nothing else; only the
implementations in ``state/`` know SQL. ``SqliteStore`` (``state.sqlite_store``) is the
embedded default; a second engine implements the same verbs and runs the same contract
tests (``tests/test_store_contract.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from state.model import (
    Attempt,
    Backfill,
    CursorMoved,
    Export,
    FailedEntry,
    Fragment,
    Pending,
    StoredProfile,
    SyncResult,
)
from state.stats import DataflowStats

__all__ = ["CursorMoved", "Store"]


class SendLock(Protocol):
    def release(self) -> None: ...


class Store(Protocol):
    # -- profiles and the change log ---------------------------------------------------
    def append_changes(self, fragments: Sequence[Fragment]) -> int:
        """Merge fragments, in order, and append one change each, in one transaction;
        returns the last change seq."""
    def load_profiles(self, profile_ids: Sequence[str]) -> dict[str, StoredProfile]: ...
    def profile_count(self) -> int: ...
    def head_seq(self) -> int:
        """The newest change seq (0 for an empty log)."""
    def read_changes(self, after: int, limit: int) -> list[tuple]:
        """Changes after ``after``: (seq, profile_id, committed_at, attr_paths,
        identity_added, segments)."""
    def memberships(self, profile_ids: Sequence[str],
                    segments: Sequence[str]) -> list[tuple[str, str, str]]: ...

    # -- dataflow state --------------------------------------------------------------------
    def sync_dataflow(self, name: str, destination: str, segments: Sequence[str],
                      mapping_hash: str) -> SyncResult: ...
    def cursor(self, dataflow: str) -> int: ...
    def mapping_times(self, dataflow: str) -> dict[str, tuple[int, int]]: ...
    def snapshots(self, dataflow: str, profile_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """profile -> (qualified mapped segments last seen, newest seq queued)."""
    def enqueue_exports(self, dataflow: str, exports: Sequence[Export],
                        snapshot_updates: Sequence[tuple[str, str]] = (),
                        cursor_from: int | None = None, cursor_to: int | None = None,
                        backfill: tuple[int, str, int] | None = None) -> None:
        """Exports, snapshots and the cursor (or backfill progress) in one transaction;
        raises CursorMoved when the cursor is no longer ``cursor_from``."""

    # -- backfills ---------------------------------------------------------------------------
    def start_backfill(self, dataflow: str, segment: str | None, reason: str) -> int: ...
    def open_backfills(self, dataflow: str) -> list[Backfill]: ...
    def count_qualified(self, segments: Sequence[str]) -> int: ...
    def qualified_after(self, segments: Sequence[str], after: str, limit: int) -> list[str]: ...
    def backfill_rows(self, profile_ids: Sequence[str],
                      mapped_segments: Sequence[str]) -> list[tuple[str, int, str]]: ...
    def set_backfill_total(self, job: int, total: int) -> None: ...
    def finish_backfill(self, job: int) -> None: ...

    # -- the outbox ----------------------------------------------------------------------------
    def claim_due(self, dataflow: str, now: int, limit: int,
                  tried_before: int | None = None) -> list[Pending]: ...
    def pending_count(self, dataflow: str) -> int: ...
    def next_due(self, dataflow: str) -> int | None:
        """The earliest next-attempt time in the outbox (0: due now; None: empty)."""
    def record_outcomes(self, dataflow: str, delivered: Sequence[Attempt],
                        retrying: Sequence[Attempt], failed: Sequence[Attempt],
                        skipped: Sequence[Pending] = ()) -> None:
        """One transaction: delivered into the delivery log, retrying rescheduled, failed
        into the failed store; ``skipped`` (state already delivered) just closed."""
    def lock_sending(self, dataflow: str) -> SendLock | None:
        """The right to send the dataflow's outbox, or None while another process has it;
        one sender at a time keeps each profile's deliveries in order."""

    # -- the failed-request store --------------------------------------------------------------
    def open_failures(self, dataflow: str) -> list[FailedEntry]: ...
    def requeue_failures(self, dataflow: str, entries: Sequence[FailedEntry]
                         ) -> tuple[list[FailedEntry], list[FailedEntry]]: ...

    # -- leases ------------------------------------------------------------------------------
    def acquire_lease(self, dataflow: str, group: int, owner: str, ttl_ms: int) -> int | None: ...
    def holds_lease(self, dataflow: str, group: int, epoch: int) -> bool: ...
    def release_lease(self, dataflow: str, group: int, owner: str) -> None: ...

    # -- figures and upkeep ------------------------------------------------------------------
    def stats(self, dataflow: str, since_ms: int | None = None) -> DataflowStats: ...
    def prune_deliveries(self, older_than_ms: int) -> int: ...
    def close(self) -> None: ...

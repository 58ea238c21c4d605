"""The domain model, at the bottom of the import graph: what a profile, a fragment and an
export are, and how a fragment merges into a profile. Every other layer builds on these;
this module imports nothing of the project."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

STATUSES = frozenset({"realized", "existing", "exited"})
QUALIFIED = frozenset({"realized", "existing"})
AUTHENTICATED_STATES = frozenset({"ambiguous", "authenticated", "loggedOut"})

# The reason of the backfill of a segment mapped again after being unmapped: it also exports
# the exits that happened meanwhile.
REMAP_BACKFILL = "segment mapped again"

# Why an export was closed without a request (counted per dataflow; ``status`` shows them).
SKIP_DELIVERED = "state already delivered"
SKIP_UNIDENTIFIED = "no identity and no mapped attribute"
SKIP_FORGOTTEN = "profile forgotten"


@dataclass(slots=True)
class Fragment:
    """One update to a profile, as ingested and validated."""

    profile_id: str
    ts: int  # epoch ms
    attributes: dict[str, Any] | None = None
    # namespace -> entries to add or update ({"id": ..., "removed": true} removes one), or
    # None: remove the namespace (see ``merge_identities``)
    identities: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict)
    segments: dict[str, tuple[str, str]] = field(default_factory=dict)  # seg -> (status, lqt)
    # leaf paths the attributes write, collected while validating (see ``leaf_paths``)
    paths: list[str] | None = None


@dataclass(slots=True)
class StoredProfile:
    """A merged profile as the store holds it."""

    profile_id: str
    attributes: dict[str, Any]
    identity_map: dict[str, list[dict[str, Any]]]
    segments: dict[str, tuple[str, str | None]]  # seg -> (status, lastQualificationTime)
    last_seq: int = 0  # the change that made this state: identifies it


@dataclass(frozen=True, slots=True)
class Export:
    """A decided export: a reference to a profile for a dataflow, never its body. The body
    is rendered from the profile's state when it is sent."""

    profile_id: str
    seq: int            # the change that triggered it
    reason: str         # e.g. "attribute,segment", "backfill", "replay"
    change_at: int      # commit time of the triggering change (for latency)
    qualified: str      # mapped segments qualified at this state, newline separated


class Pending(NamedTuple):
    """An export waiting in the outbox, as a sender claims it. A named tuple, like
    ``Attempt``: one is made per export sent, and a tuple is made at a quarter of a frozen
    dataclass's cost."""

    profile_id: str
    seq: int
    reason: str
    change_at: int
    attempts: int
    first_attempt_at: int | None
    delivered_seq: int = 0  # the newest state of this profile the dataflow has delivered
    redelivery: int = 0  # redeliveries from the failed store so far (0: never failed for good)
    first_failed_at: int | None = None  # when this export first failed for good


class Attempt(NamedTuple):
    """The outcome of sending one pending export once. ``sent_seq`` and ``key`` identify
    the state that was sent (the profile's state at send time). ``next_attempt_at``: when
    it is tried again, its retry or, once it failed for good, its redelivery from the
    failed store (0: never by itself)."""

    item: Pending
    sent_seq: int
    key: str
    status: int | None
    error: str | None
    at: int
    next_attempt_at: int = 0


@dataclass(frozen=True, slots=True)
class FailedEntry:
    """An export in the failed-request store (the state it carried when it failed)."""

    id: int
    profile_id: str
    seq: int
    idempotency_key: str
    reason: str
    attempts: int               # of its last round of attempts
    last_status: int | None
    last_error: str | None
    redeliveries: int = 0       # automatic redeliveries before this failure
    first_failed_at: int | None = None  # when the export first failed for good (epoch ms)
    last_failed_at: int | None = None   # when it failed for good this time
    next_redelivery_at: int | None = None  # None: it waits for a replay by hand


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One entry of a profile's delivery history to a dataflow."""

    at: int                     # epoch ms
    seq: int                    # the change whose state was sent
    outcome: str                # delivered | failed
    status: int | None
    attempts: int
    idempotency_key: str
    error: str | None = None


@dataclass
class BreakerState:
    """A dataflow's circuit breaker, as stored: exports failed for good in a row, and
    whether (since when) delivery is paused and when the next probe is due."""

    failures_in_row: int = 0
    paused_at: int | None = None
    next_probe_at: int | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


@dataclass(frozen=True, slots=True)
class Backfill:
    id: int
    dataflow: str
    segment_id: str | None
    reason: str
    total: int | None
    done: int
    after_profile: str


@dataclass(frozen=True, slots=True)
class SyncResult:
    created: bool
    new_segments: tuple[str, ...]
    removed_segments: tuple[str, ...]
    remapped: tuple[str, ...] = ()   # of the new segments, those mapped before and unmapped since
    resumed: bool = False            # the dataflow was removed from the config and is back
    # (destination, endpoint) before a change of either; None when neither changed
    moved_from: tuple[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class StoredDataflow:
    """A dataflow as the store knows it, whether or not the config still names it."""

    name: str
    destination: str
    endpoint: str | None      # without query string or credentials
    created_at: int
    cursor: int
    removed_at: int | None    # when a run first found it gone from the config


@dataclass
class Forgotten:
    """What a forget erased: rows per kind, and how the store's file was cleaned."""

    counts: dict[str, int] = field(default_factory=dict)
    free_pages_zeroed: int = 0
    rewritten: bool = False      # the store's one-time rewrite (see ``Store.forget``)
    wal_truncated: bool = True   # False: a reader held the WAL; it empties at the next checkpoint


class CursorMoved(RuntimeError):
    """Another process advanced this dataflow's cursor first; the batch is dropped and
    read again, so nothing is queued twice."""


class LeaseLost(RuntimeError):
    """A shard group's lease has another owner now (or is gone): the run that held it must
    change nothing more, and ends. Raised by every write of a group-scoped store."""


SHARD_COUNT = 256  # profiles' shards (state.db.shard_of); a group is a contiguous range of them


def group_problem(count: int, index: int = 0) -> str | None:
    """What is wrong with group ``index`` of ``count`` (a layout of ``count`` groups), if
    anything: the one check of the CLI, the supervise flow and ``ShardScope``."""
    if not 1 <= count <= SHARD_COUNT:
        return f"groups {count}: want 1 to {SHARD_COUNT}"
    if not 0 <= index < count:
        return f"group {index} of {count}: want 0 to {count - 1}"
    return None
RANGE_LEASES = 1_000_000  # lease groups from here on are shard ranges (ShardScope.lease_group)


@dataclass
class ShardScope:
    """What a shard-group run owns: shards ``lo`` to ``hi`` (inclusive) of one dataflow,
    under the lease ``epoch`` it was granted. ``share`` is its part of the dataflow's rate
    limit, and ``valid_until`` (``time.monotonic()``) when its lease may have run out
    unless renewed: past it, no request is sent (a run frozen and then thawed after a
    takeover must not send an old state after the new owner sent a newer one)."""

    dataflow: str
    lo: int
    hi: int
    owner: str
    epoch: int = 0
    share: float = 1.0
    valid_until: float = float("inf")

    @classmethod
    def of_group(cls, dataflow: str, index: int, count: int, owner: str) -> ShardScope:
        """Group ``index`` of ``count`` equal ranges of the shards."""
        if problem := group_problem(count, index):
            raise ValueError(problem)
        return cls(dataflow, index * SHARD_COUNT // count,
                   (index + 1) * SHARD_COUNT // count - 1, owner)

    @property
    def lease_group(self) -> int:
        """The lease row's key: one per range. (Below ``RANGE_LEASES``: plain leases, such
        as group 0, the whole dataflow's, held by a stream run on one machine.)"""
        return RANGE_LEASES + self.lo * SHARD_COUNT + self.hi

    @property
    def name(self) -> str:
        return f"{self.dataflow}[{self.lo}-{self.hi}]"

    @property
    def leads(self) -> bool:
        """The group of shard 0 also runs the dataflow's backfills and the store's upkeep."""
        return self.lo == 0


def iso_utc(moment: datetime) -> str:
    # isoformat, not strftime: glibc's %Y does not zero-pad years before 1000
    return moment.astimezone(UTC).isoformat(timespec="seconds")[:-6] + "Z"


def leaf_paths(attrs: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves a fragment writes (a null is a leaf: it removes)."""
    out: list[str] = []
    for key, value in attrs.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(leaf_paths(value, path + "."))
        elif not isinstance(value, dict):
            out.append(path)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``True`` and ``1`` differ."""
    return type(a) is type(b) and a == b


def merge_identities(identity_map: dict[str, list[dict[str, Any]]],
                     patch: dict[str, list[dict[str, Any]] | None]) -> bool:
    """Apply a fragment's ``identityMap`` to a profile's, in place; True when it changed.

    A namespace written as None is removed. In a namespace, an entry ``{"id": ...,
    "removed": true}`` removes that identity; any other entry adds the identity, or updates
    the fields of the one with that id (the latest value wins, a null removes the field).
    A namespace left empty is removed. Writing what is already there changes nothing."""
    changed = False
    for ns, entries in patch.items():
        if entries is None:
            if identity_map.pop(ns, None) is not None:
                changed = True
            continue
        known = identity_map.get(ns, [])
        by_id = {e["id"]: e for e in known}
        for entry in entries:
            ident = entry["id"]
            held = by_id.get(ident)
            if entry.get("removed") is True:
                if held is not None:
                    known = [e for e in known if e is not held]
                    del by_id[ident]
                    changed = True
                continue
            if held is None:
                held = by_id[ident] = {"id": ident}
                known.append(held)
                changed = True
            for key, value in entry.items():
                if key in ("id", "removed"):
                    continue
                if value is None:
                    if held.pop(key, None) is not None:
                        changed = True
                elif key not in held or not _same(held[key], value):
                    held[key] = value
                    changed = True
        if known:
            identity_map[ns] = known
        else:
            identity_map.pop(ns, None)
    return changed


def deep_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Merge ``patch`` into ``target`` in place; a null leaf removes the key, and objects
    left empty by removals are pruned. An object that writes no value (``{}``, or only nulls
    under a path that does not exist) changes nothing, so every change to the profile lies
    on or under a path that ``leaf_paths`` reports."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            current = target.get(key)
            if isinstance(current, dict):
                deep_merge(current, value)
                if not current:
                    del target[key]
            else:
                fresh: dict[str, Any] = {}
                deep_merge(fresh, value)
                if fresh:
                    target[key] = fresh
        else:
            target[key] = value


def newest_per_profile(entries: Iterable[FailedEntry]) -> dict[str, FailedEntry]:
    """Each profile's newest failed-store entry (highest seq, then the later entry): the one
    a replay or a redelivery re-queues."""
    newest: dict[str, FailedEntry] = {}
    for entry in entries:
        held = newest.get(entry.profile_id)
        if held is None or (entry.seq, entry.id) > (held.seq, held.id):
            newest[entry.profile_id] = entry
    return newest

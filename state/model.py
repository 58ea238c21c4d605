"""The domain model, at the bottom of the import graph: what a profile, a fragment and an
export are, and how a fragment merges into a profile. Every other layer builds on these;
this module imports nothing of the project."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATUSES = frozenset({"realized", "existing", "exited"})
QUALIFIED = frozenset({"realized", "existing"})


@dataclass(slots=True)
class Fragment:
    """One update to a profile, as ingested and validated."""

    profile_id: str
    ts: int  # epoch ms
    attributes: dict[str, Any] | None = None
    identities: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
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


@dataclass(frozen=True, slots=True)
class Pending:
    """An export waiting in the outbox, as a sender claims it."""

    profile_id: str
    seq: int
    reason: str
    change_at: int
    attempts: int
    first_attempt_at: int | None
    delivered_seq: int = 0  # the newest state of this profile the dataflow has delivered


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of sending one pending export once. ``sent_seq`` and ``key`` identify
    the state that was sent (the profile's state at send time)."""

    item: Pending
    sent_seq: int
    key: str
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


class CursorMoved(RuntimeError):
    """Another process advanced this dataflow's cursor first; the batch is dropped and
    read again, so nothing is queued twice."""


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

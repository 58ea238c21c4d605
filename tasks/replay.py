"""Replay: failed-request store -> the profiles' current state -> the outbox."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from state import outbox
from state.profiles import load_profiles
from tasks.payload import PayloadSpec, build_payload, encode


@dataclass(frozen=True)
class ReplayPlan:
    resent: list[outbox.FailedEntry]
    superseded: list[outbox.FailedEntry]


def requeue_failures(db: sqlite_utils.Database, flow_name: str, spec: PayloadSpec) -> ReplayPlan:
    """Re-queue each profile's newest failed export with its current state and original
    idempotency key. Older entries of the same profile, and entries whose profile has
    since been delivered or queued with a newer state, are marked superseded."""
    entries = outbox.open_failures(db, flow_name)
    newest: dict[str, outbox.FailedEntry] = {}
    superseded: list[outbox.FailedEntry] = []
    for entry in entries:
        held = newest.get(entry.profile_id)
        if held is None or entry.seq >= held.seq:
            if held is not None:
                superseded.append(held)
            newest[entry.profile_id] = entry
        else:
            superseded.append(entry)
    pids = list(newest)
    delivered = outbox.delivered_seqs(db, flow_name, pids)
    queued = outbox.queued_seqs(db, flow_name, pids)
    profiles = load_profiles(db, pids)
    resend: list[tuple[outbox.FailedEntry, bytes]] = []
    for pid, entry in newest.items():
        newer = max(delivered.get(pid, 0), queued.get(pid, 0))
        if newer > entry.seq or pid not in profiles:
            superseded.append(entry)
        elif pid in queued:
            superseded.append(entry)  # the same state is already waiting to be sent
        else:
            resend.append((entry, encode(build_payload(profiles[pid], spec))))
    outbox.requeue(db, flow_name, resend, superseded)
    return ReplayPlan([e for e, _ in resend], superseded)

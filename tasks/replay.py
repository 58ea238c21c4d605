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
    idempotency key. Older entries of the same profile are superseded, and so are entries
    whose profile has a newer state delivered or waiting (``outbox.requeue`` checks that in
    its transaction)."""
    newest: dict[str, outbox.FailedEntry] = {}
    superseded: list[outbox.FailedEntry] = []
    for entry in outbox.open_failures(db, flow_name):
        held = newest.get(entry.profile_id)
        if held is None or entry.seq >= held.seq:
            if held is not None:
                superseded.append(held)
            newest[entry.profile_id] = entry
        else:
            superseded.append(entry)
    profiles = load_profiles(db, list(newest))
    resend = [(entry, encode(build_payload(profiles[pid], spec)))
              for pid, entry in newest.items() if pid in profiles]
    superseded += [entry for pid, entry in newest.items() if pid not in profiles]
    requeued = outbox.requeue(db, flow_name, resend, superseded)
    late = [entry for entry, _ in resend if entry not in requeued]
    return ReplayPlan(requeued, superseded + late)

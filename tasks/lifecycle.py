"""The profile lifecycle around the pipeline (the README's "Data lifecycle"): upkeep of a
stream run (dataflows gone from the config, retention), forgetting profiles, dropping a
removed dataflow's state, and which queued exports are closed without a request.

Plain functions on a Store, like ``tasks.pipeline``; nothing here knows Prefect or SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from config import Config
from state import Store
from state.db import now_ms
from state.model import (
    SKIP_DELIVERED,
    SKIP_FORGOTTEN,
    SKIP_UNIDENTIFIED,
    Forgotten,
    Pending,
    StoredProfile,
)
from state.store import SendLock

DAY_MS = 86_400_000
PRUNE_BATCH = 5_000          # rows per pruning transaction: the write lock is held briefly
PRUNE_BATCHES_PER_POLL = 4   # per kind and poll, so a backlog is pruned over several polls
LOCK_WAIT_SECONDS = 60.0     # forget and drop wait this long for a sender to finish a round
LOCK_POLL_SECONDS = 0.05

log = logging.getLogger("profile_relay")


class LifecycleError(Exception):
    """A lifecycle command that cannot be carried out; the message says why."""


# -- what is never sent -----------------------------------------------------------------------

def has_mapped_attribute(attributes: dict[str, Any], paths: Sequence[Sequence[str]]) -> bool:
    """Whether any mapped attribute path (or something under it) is on the profile."""
    for path in paths:
        node: Any = attributes
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return True
    return False


def unsent_reason(item: Pending, profile: StoredProfile | None,
                  attribute_paths: Sequence[Sequence[str]]) -> str | None:
    """Why a queued export is closed without a request, or None to send it:
    - its profile was forgotten (it left the store after the export was queued);
    - a streamed export whose profile state was already delivered (sending renders the
      current state, which may include a later change still to be decided: when that state
      reached the endpoint, there is nothing new to say; a backfill was asked for, so it
      is sent regardless);
    - the profile has neither an identity nor a mapped attribute: the receiver could not
      tell whom the body is about."""
    if profile is None:
        return SKIP_FORGOTTEN
    if item.reason != "backfill" and profile.last_seq <= item.delivered_seq:
        return SKIP_DELIVERED
    if not profile.identity_map and not has_mapped_attribute(profile.attributes, attribute_paths):
        return SKIP_UNIDENTIFIED
    return None


# -- dataflows that come and go ---------------------------------------------------------------

def public_endpoint(url: str) -> str:
    """An endpoint as it may be stored and logged: no credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _wait_lock(store: Store, dataflow: str, wait: float) -> SendLock:
    deadline = time.monotonic() + wait
    while (lock := store.lock_sending(dataflow)) is None:
        if time.monotonic() >= deadline:
            raise LifecycleError(f"dataflow {dataflow!r} has been sending for over {wait:g} s; "
                                 "try again when its run is between rounds")
        time.sleep(LOCK_POLL_SECONDS)
    return lock


def drop_dataflow(store: Store, config: Config, name: str,
                  lock_wait: float = LOCK_WAIT_SECONDS) -> dict[str, int]:
    """Erase the state of a dataflow that is no longer in the config; rows per kind."""
    if any(f.name == name for f in config.dataflows):
        raise LifecycleError(f"dataflow {name!r} is still in the config; remove it from the "
                             "config first (its state is what its runs resume from)")
    stored = [f.name for f in store.stored_dataflows()]
    if name not in stored:
        raise LifecycleError(f"the store has no dataflow named {name!r}; stored: {stored}")
    lock = _wait_lock(store, name, lock_wait)
    try:
        return store.drop_dataflow(name)
    finally:
        lock.release()


# -- forget ------------------------------------------------------------------------------------

def forget_profiles(store: Store, profile_ids: Sequence[str],
                    lock_wait: float = LOCK_WAIT_SECONDS) -> Forgotten:
    """Erase every trace of these profiles. Every dataflow's sender is held off meanwhile,
    so no request in flight records a delivery of a forgotten profile afterwards."""
    locks: list[SendLock] = []
    try:
        for flow in store.stored_dataflows():
            locks.append(_wait_lock(store, flow.name, lock_wait))
        return store.forget(profile_ids)
    finally:
        for lock in locks:
            lock.release()


# -- upkeep of a stream run --------------------------------------------------------------------

@dataclass
class Upkeep:
    removed: list[str] = field(default_factory=list)
    pruned: dict[str, int] = field(default_factory=dict)


def upkeep(store: Store, config: Config,
           logger: logging.Logger | logging.LoggerAdapter = log, now: int | None = None) -> Upkeep:
    """What a stream run does after each poll: notice dataflows gone from the config (they
    stop, their state is kept), and prune the change log, the delivery log and resolved
    failed-store entries older than ``retention_days``, a few short transactions at a time
    so ingest never waits long. Change-log rows are pruned only once every stored dataflow
    has read them; entries still in the failed store are kept until replayed."""
    done = Upkeep(removed=store.mark_removed([f.name for f in config.dataflows]))
    for name in done.removed:
        stats = store.stats(name)
        logger.info("%s: no longer in the config: stopped, its state kept (%d pending, %d "
                    "failed); it holds back the pruning of the change log until it is back in "
                    "the config or `profile-relay dataflows drop` erases it", name,
                    stats.pending, stats.failed)
    cutoff = (now_ms() if now is None else now) - config.retention_days * DAY_MS
    for kind, prune in (("changes", store.prune_changes), ("deliveries", store.prune_deliveries),
                        ("failures", store.prune_resolved_failures)):
        total = 0
        for _ in range(PRUNE_BATCHES_PER_POLL):
            count = prune(cutoff, PRUNE_BATCH)
            total += count
            if count < PRUNE_BATCH:
                break
        done.pruned[kind] = total
    if any(done.pruned.values()):
        logger.debug("pruned past %d day(s): %s", config.retention_days, done.pruned)
    return done

"""The Store contract: every verb of ``state.Store``, written against the interface only.

Each test takes the ``store`` fixture, parametrized over the engines; a new engine joins
by adding its name to ``ENGINES`` and a branch to ``make_store``, and must pass unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from state import CursorMoved, Store, open_store
from state.db import now_ms
from state.model import Attempt, Export, Fragment

ENGINES = ["sqlite"]
FLOW = "flow-1"


def make_store(engine: str, tmp_path: Path) -> Store:
    if engine == "sqlite":
        return open_store(tmp_path / "relay.db")
    raise AssertionError(engine)


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    st = make_store(request.param, tmp_path)
    yield st
    st.close()


def frag(pid: str, attrs: dict | None = None, segs: dict[str, str] | None = None,
         ids: dict | None = None) -> Fragment:
    f = Fragment(pid, now_ms(), attributes=attrs, identities=ids or {},
                 segments={s: (status, "2026-01-01T00:00:00Z") for s, status in (segs or {}).items()})
    if attrs is not None:
        f.paths = sorted(attrs)
    return f


def registered(store: Store, segments: tuple[str, ...] = ("seg-a",)) -> None:
    store.sync_dataflow(FLOW, "dest", list(segments), "hash-1")


def queue(store: Store, *exports: Export) -> None:
    store.enqueue_exports(FLOW, list(exports))


def export(pid: str, seq: int, reason: str = "attribute") -> Export:
    return Export(pid, seq, reason, now_ms(), "seg-a")


def attempt(store: Store, pid: str, status: int | None = 200, error: str | None = None,
            next_at: int = 0) -> Attempt:
    [item] = [p for p in store.claim_due(FLOW, 2**62, 100) if p.profile_id == pid]
    return Attempt(item, item.seq, f"key-{pid}-{item.seq}", status, error, now_ms(), next_at)


# -- profiles and the change log -------------------------------------------------------------

def test_append_changes_merges_and_logs_each_fragment(store: Store) -> None:
    assert store.head_seq() == 0
    last = store.append_changes([
        frag("p-1", {"a": 1}, {"seg-a": "realized"}, {"ecid": [{"id": "e1"}]}),
        frag("p-2", {"b": 2}),
        frag("p-1", {"c": 3}, {"seg-a": "existing"}),
    ])
    assert last == store.head_seq() == 3
    assert store.profile_count() == 2
    p1 = store.load_profiles(["p-1", "nobody"])
    assert set(p1) == {"p-1"}
    assert p1["p-1"].attributes == {"a": 1, "c": 3}
    assert p1["p-1"].identity_map == {"ecid": [{"id": "e1"}]}
    assert p1["p-1"].segments == {"seg-a": ("existing", "2026-01-01T00:00:00Z")}
    assert p1["p-1"].last_seq == 3
    rows = store.read_changes(0, 10)
    assert [(r[0], r[1]) for r in rows] == [(1, "p-1"), (2, "p-2"), (3, "p-1")]
    assert [r[0] for r in store.read_changes(1, 1)] == [2]
    assert store.memberships(["p-1", "p-2"], ["seg-a"]) == [("p-1", "seg-a", "existing")]


# -- dataflow state ----------------------------------------------------------------------------

def test_sync_creates_the_dataflow_at_the_head_with_a_backfill(store: Store) -> None:
    store.append_changes([frag("p-1", segs={"seg-a": "realized"})])
    result = store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")
    assert result.created and store.cursor(FLOW) == 1
    [job] = store.open_backfills(FLOW)
    assert job.segment_id is None and job.done == 0
    assert set(store.mapping_times(FLOW)) == {"seg-a"}
    again = store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")
    assert not again.created and again.new_segments == ()
    more = store.sync_dataflow(FLOW, "dest", ["seg-a", "seg-b"], "h")
    assert more.new_segments == ("seg-b",)
    assert [j.segment_id for j in store.open_backfills(FLOW)] == [None, "seg-b"]
    less = store.sync_dataflow(FLOW, "dest", ["seg-b"], "h")
    assert less.removed_segments == ("seg-a",) and set(store.mapping_times(FLOW)) == {"seg-b"}
    with pytest.raises(KeyError):
        store.cursor("never-ran")


def test_enqueue_moves_the_cursor_and_snapshots_in_one_step(store: Store) -> None:
    store.append_changes([frag("p-1"), frag("p-2")])
    registered(store)
    store.append_changes([frag("p-1"), frag("p-2")])
    start = store.cursor(FLOW)
    store.enqueue_exports(FLOW, [export("p-1", 3)], [("p-2", "seg-a")], cursor_from=start,
                          cursor_to=4)
    assert store.cursor(FLOW) == 4
    assert store.snapshots(FLOW, ["p-1", "p-2", "p-3"]) == {"p-1": ("seg-a", 3), "p-2": ("seg-a", 0)}
    with pytest.raises(CursorMoved):  # a second decider with the stale cursor writes nothing
        store.enqueue_exports(FLOW, [export("p-2", 4)], cursor_from=start, cursor_to=4)
    assert [p.profile_id for p in store.claim_due(FLOW, 2**62, 10)] == ["p-1"]


def test_a_newer_export_replaces_a_waiting_one_never_the_reverse(store: Store) -> None:
    registered(store)
    queue(store, export("p-1", 5))
    queue(store, export("p-1", 7))
    queue(store, export("p-1", 6))
    [item] = store.claim_due(FLOW, 2**62, 10)
    assert item.seq == 7 and store.pending_count(FLOW) == 1


# -- the outbox ------------------------------------------------------------------------------------

def test_claim_due_in_seq_order_within_limit_and_schedule(store: Store) -> None:
    registered(store)
    queue(store, export("p-3", 3), export("p-1", 1), export("p-2", 2))
    assert [p.profile_id for p in store.claim_due(FLOW, now_ms(), 2)] == ["p-1", "p-2"]
    later = now_ms() + 60_000
    store.record_outcomes(FLOW, [], [attempt(store, "p-1", 503, "HTTP 503", next_at=later)], [])
    assert store.next_due(FLOW) == 0  # p-2 and p-3 are due now
    assert [p.profile_id for p in store.claim_due(FLOW, now_ms(), 10)] == ["p-2", "p-3"]
    assert [p.profile_id for p in store.claim_due(FLOW, later, 10)] == ["p-1", "p-2", "p-3"]
    [p1] = [p for p in store.claim_due(FLOW, later, 10) if p.profile_id == "p-1"]
    assert p1.attempts == 1 and p1.first_attempt_at is not None
    # one try per drain: an export attempted since ``tried_before`` is left alone
    assert "p-1" not in [p.profile_id for p in store.claim_due(FLOW, later, 10,
                                                               tried_before=p1.first_attempt_at)]


def test_record_outcomes(store: Store) -> None:
    registered(store)
    queue(store, export("p-1", 1), export("p-2", 2), export("p-3", 3), export("p-4", 4))
    ok, bad = attempt(store, "p-1"), attempt(store, "p-2", 400, "HTTP 400 Bad Request")
    [p4] = [p for p in store.claim_due(FLOW, 2**62, 10) if p.profile_id == "p-4"]
    store.record_outcomes(FLOW, [ok], [attempt(store, "p-3", 500, "HTTP 500", now_ms() + 5000)],
                          [bad], [p4])
    assert store.pending_count(FLOW) == 1  # p-3 waits for its retry
    assert store.next_due(FLOW) > now_ms()
    [failed] = store.open_failures(FLOW)
    assert (failed.profile_id, failed.attempts, failed.last_status, failed.idempotency_key) == (
        "p-2", 1, 400, "key-p-2-2")
    stats = store.stats(FLOW)
    assert (stats.delivered, stats.failed, stats.pending, stats.retrying) == (1, 1, 1, 1)
    [again] = [p for p in store.claim_due(FLOW, 2**62, 10)]
    assert again.profile_id == "p-3"
    # a delivered state is remembered: a later claim of that profile carries it
    queue(store, export("p-1", 9))
    [p1] = [p for p in store.claim_due(FLOW, 2**62, 10) if p.profile_id == "p-1"]
    assert p1.delivered_seq == 1


def test_an_outcome_for_a_replaced_export_changes_nothing(store: Store) -> None:
    registered(store)
    queue(store, export("p-1", 1))
    stale = attempt(store, "p-1")
    queue(store, export("p-1", 2))  # a newer state replaced it while the request was out
    store.record_outcomes(FLOW, [stale], [], [])
    [item] = store.claim_due(FLOW, 2**62, 10)
    assert item.seq == 2


def test_one_sender_at_a_time(store: Store) -> None:
    registered(store)
    held = store.lock_sending(FLOW)
    assert held is not None
    assert store.lock_sending(FLOW) is None
    held.release()
    again = store.lock_sending(FLOW)
    assert again is not None
    again.release()


# -- the failed-request store ---------------------------------------------------------------------

def test_requeue_failures_newest_per_profile_and_superseded(store: Store) -> None:
    store.append_changes([frag("p-1"), frag("p-2"), frag("p-3"), frag("p-4")])
    registered(store)
    for pid, seq in (("p-1", 1), ("p-2", 2), ("p-3", 3), ("p-4", 4)):
        queue(store, export(pid, seq))
        store.record_outcomes(FLOW, [], [], [attempt(store, pid, 500, "HTTP 500")])
    queue(store, export("p-1", 1))  # an older state of p-1 fails again: two entries
    store.record_outcomes(FLOW, [], [], [attempt(store, "p-1", 500, "HTTP 500")])
    queue(store, export("p-3", 3))  # p-3 is queued again: it will send the current state
    queue(store, export("p-4", 4))
    store.record_outcomes(FLOW, [attempt(store, "p-4")], [], [])  # p-4's state got through
    entries = store.open_failures(FLOW)
    assert len(entries) == 5
    resent, superseded = store.requeue_failures(FLOW, entries)
    assert sorted(e.profile_id for e in resent) == ["p-1", "p-2"]
    assert sorted(e.profile_id for e in superseded) == ["p-1", "p-3", "p-4"]
    assert store.open_failures(FLOW) == []
    by_pid = {p.profile_id: p for p in store.claim_due(FLOW, 2**62, 10)}
    assert by_pid["p-1"].reason == "replay" and by_pid["p-1"].seq == 1
    assert store.stats(FLOW).requeued == 2


# -- backfills ------------------------------------------------------------------------------------

def test_backfill_verbs(store: Store) -> None:
    store.append_changes([frag("p-1", segs={"seg-a": "realized", "seg-b": "existing"}),
                          frag("p-2", segs={"seg-a": "exited"}),
                          frag("p-3", segs={"seg-b": "realized"}), frag("p-4")])
    registered(store, ("seg-a", "seg-b"))
    job_id = store.start_backfill(FLOW, "seg-b", "by hand")
    assert store.count_qualified(["seg-a", "seg-b"]) == 2
    assert store.qualified_after(["seg-a", "seg-b"], "", 10) == ["p-1", "p-3"]
    assert store.qualified_after(["seg-a", "seg-b"], "p-1", 10) == ["p-3"]
    assert store.backfill_rows(["p-1", "p-3", "p-9"], ["seg-a", "seg-b"]) == [
        ("p-1", 1, "seg-a\nseg-b"), ("p-3", 3, "seg-b")]
    store.set_backfill_total(job_id, 2)
    store.enqueue_exports(FLOW, [export("p-3", 3, "backfill")], backfill=(job_id, "p-3", 1))
    job = next(j for j in store.open_backfills(FLOW) if j.id == job_id)
    assert (job.total, job.done, job.after_profile) == (2, 1, "p-3")
    store.finish_backfill(job_id)
    assert job_id not in [j.id for j in store.open_backfills(FLOW)]


# -- leases ----------------------------------------------------------------------------------------

def test_leases_have_one_owner_and_an_epoch(store: Store) -> None:
    first = store.acquire_lease(FLOW, 0, "a", ttl_ms=200)
    assert first == 1 and store.holds_lease(FLOW, 0, first)
    assert store.acquire_lease(FLOW, 0, "b", ttl_ms=200) is None  # held by a
    assert store.acquire_lease(FLOW, 0, "a", ttl_ms=200) == first  # renewal keeps the epoch
    assert store.acquire_lease(FLOW, 1, "b", ttl_ms=200) == 1  # another group is free
    time.sleep(0.25)
    taken = store.acquire_lease(FLOW, 0, "b", ttl_ms=10_000)  # a's lease lapsed
    assert taken == first + 1
    assert not store.holds_lease(FLOW, 0, first) and store.holds_lease(FLOW, 0, taken)
    store.release_lease(FLOW, 0, "b")
    assert store.acquire_lease(FLOW, 0, "a", ttl_ms=200) == taken + 1  # no wait after release


# -- upkeep -----------------------------------------------------------------------------------------

def test_prune_deliveries_by_age(store: Store) -> None:
    registered(store)
    queue(store, export("p-1", 1))
    store.record_outcomes(FLOW, [attempt(store, "p-1")], [], [])
    assert store.prune_deliveries(now_ms() - 60_000) == 0
    assert store.prune_deliveries(now_ms() + 1) == 1
    assert store.stats(FLOW).delivered == 0

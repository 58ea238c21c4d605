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

ENGINES = ["sqlite", "postgresql"]
FLOW = "flow-1"


def make_store(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if engine == "sqlite":
        return open_store(tmp_path / "relay.db")
    if engine == "postgresql":  # a fresh database on the session's real server (conftest)
        return open_store(request.getfixturevalue("pg_url"))
    raise AssertionError(engine)


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    st = make_store(request.param, tmp_path, request)
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
    """Queue exports, first storing any of their profiles the store lacks (an export of a
    profile not in the store is dropped)."""
    pids = list(dict.fromkeys(e.profile_id for e in exports))
    known = store.load_profiles(pids)
    if missing := [pid for pid in pids if pid not in known]:
        store.append_changes([frag(pid) for pid in missing])
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
    # the next chunk of a drain: exports never tried only after the last one claimed, and
    # retries whenever due
    assert [p.profile_id for p in store.claim_due(FLOW, later, 10, after_seq=2)] == ["p-1", "p-3"]


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


# -- profile lifecycle ----------------------------------------------------------------------------

def identity_flags(store: Store) -> list[int]:
    return [row[4] for row in store.read_changes(0, 100)]


def test_identity_changes_add_update_remove_and_no_op(store: Store) -> None:
    store.append_changes([
        frag("p-1", ids={"ecid": [{"id": "e1"}], "email": [{"id": "a@x.com"}]}),  # added
        frag("p-1", ids={"ecid": [{"id": "e1"}]}),                                 # nothing new
        frag("p-1", ids={"ecid": [{"id": "e1", "primary": True}]}),               # field added
        frag("p-1", ids={"ecid": [{"id": "e1", "primary": True}]}),               # same again
        frag("p-1", ids={"ecid": [{"id": "e1"}]}),                                 # field kept
        frag("p-1", ids={"ecid": [{"id": "e1", "primary": False,
                                   "authenticatedState": "authenticated"}]}),      # latest wins
        frag("p-1", ids={"ecid": [{"id": "e2", "removed": True}]}),               # not there
        frag("p-1", ids={"ecid": [{"id": "e1", "removed": True}]}),               # removed
        frag("p-1", ids={"email": None, "crm": None}),                             # ns removed
        frag("p-1", ids={"crm": [{"id": "c1", "primary": True}]}),
        frag("p-1", ids={"crm": [{"id": "c1", "primary": None}]}),                # field removed
    ])
    assert identity_flags(store) == [1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
    assert store.load_profiles(["p-1"])["p-1"].identity_map == {"crm": [{"id": "c1"}]}


def test_sync_remembers_unmapped_segments_and_reports_a_remap(store: Store) -> None:
    store.sync_dataflow(FLOW, "dest", ["seg-a", "seg-b"], "h", "http://h/1")
    assert store.unmapped_segments(FLOW) == []
    less = store.sync_dataflow(FLOW, "dest", ["seg-b"], "h", "http://h/1")
    assert less.removed_segments == ("seg-a",) and store.unmapped_segments(FLOW) == ["seg-a"]
    again = store.sync_dataflow(FLOW, "dest", ["seg-a", "seg-b", "seg-c"], "h", "http://h/1")
    assert again.new_segments == ("seg-a", "seg-c") and again.remapped == ("seg-a",)
    assert store.unmapped_segments(FLOW) == []
    reasons = {j.segment_id: j.reason for j in store.open_backfills(FLOW) if j.segment_id}
    assert reasons == {"seg-a": "segment mapped again", "seg-c": "segment newly mapped"}


def test_sync_reports_a_move_of_destination_or_endpoint(store: Store) -> None:
    first = store.sync_dataflow(FLOW, "dest", ["seg-a"], "h", "http://h/1")
    assert first.created and first.moved_from is None
    assert store.sync_dataflow(FLOW, "dest", ["seg-a"], "h", "http://h/1").moved_from is None
    moved = store.sync_dataflow(FLOW, "dest", ["seg-a"], "h", "http://h/2")
    assert moved.moved_from == ("dest", "http://h/1") and not moved.new_segments
    renamed = store.sync_dataflow(FLOW, "other", ["seg-a"], "h2", "http://h/2")
    assert renamed.moved_from == ("dest", "http://h/2")
    [stored] = store.stored_dataflows()
    assert (stored.name, stored.destination, stored.endpoint) == (FLOW, "other", "http://h/2")
    assert store.open_backfills(FLOW)[-1].reason == "new dataflow"  # nothing new to send


def test_removed_dataflows_are_marked_once_and_resume(store: Store) -> None:
    store.append_changes([frag("p-1")])
    registered(store)
    store.sync_dataflow("other", "dest", ["seg-a"], "h")
    assert store.mark_removed([FLOW, "other"]) == []
    assert store.mark_removed([FLOW]) == ["other"]
    assert store.mark_removed([FLOW]) == []  # once
    stored = {f.name: f for f in store.stored_dataflows()}
    assert stored["other"].removed_at is not None and stored[FLOW].removed_at is None
    assert stored["other"].cursor == 1
    back = store.sync_dataflow("other", "dest", ["seg-a"], "h")
    assert back.resumed and not back.created and store.cursor("other") == 1
    assert not store.sync_dataflow("other", "dest", ["seg-a"], "h").resumed


def test_stale_qualified_finds_exits_the_snapshot_has_not_seen(store: Store) -> None:
    store.append_changes([frag("p-1", segs={"seg-a": "exited"}), frag("p-2", segs={"seg-a": "realized"}),
                          frag("p-3", segs={"seg-b": "realized"}), frag("p-4")])
    registered(store, ("seg-a", "seg-b"))
    store.enqueue_exports(FLOW, [], [("p-1", "seg-a\nseg-b"), ("p-2", "seg-a"), ("p-3", "seg-b"),
                                     ("p-4", "seg-a")])
    assert store.stale_qualified(FLOW, ["seg-a"], "", 10) == ["p-1", "p-4"]
    assert store.stale_qualified(FLOW, ["seg-a"], "p-1", 10) == ["p-4"]
    assert store.stale_qualified(FLOW, ["seg-a", "seg-b"], "", 1) == ["p-1"]
    assert store.stale_qualified(FLOW, ["seg-b"], "", 10) == ["p-1"]
    assert store.stale_qualified("other", ["seg-a"], "", 10) == []


def test_exports_of_profiles_not_in_the_store_are_dropped(store: Store) -> None:
    store.append_changes([frag("p-1")])
    registered(store)
    store.enqueue_exports(FLOW, [export("p-1", 1), export("gone", 1)], [("gone-too", "seg-a")])
    assert [p.profile_id for p in store.claim_due(FLOW, 2**62, 10)] == ["p-1"]
    assert store.snapshots(FLOW, ["p-1", "gone", "gone-too"]) == {"p-1": ("seg-a", 1)}


def test_a_decision_read_before_a_forget_queues_nothing_for_it(store: Store) -> None:
    store.append_changes([frag("p-1"), frag("p-2")])
    registered(store)
    read_at = now_ms() - 1                      # the decider reads p-1 and p-2 ...
    store.forget(["p-1"])                       # ... p-1 is forgotten meanwhile
    store.enqueue_exports(FLOW, [export("p-1", 1), export("p-2", 2)], [("p-1", "seg-a")],
                          read_at=read_at)
    assert [p.profile_id for p in store.claim_due(FLOW, 2**62, 10)] == ["p-2"]
    assert store.snapshots(FLOW, ["p-1", "p-2"]).keys() == {"p-2"}
    store.enqueue_exports(FLOW, [export("p-2", 3)], read_at=now_ms() + 120_000)  # read later
    assert [p.seq for p in store.claim_due(FLOW, 2**62, 10)] == [3]


def test_skipped_exports_are_closed_and_counted_by_reason(store: Store) -> None:
    registered(store)
    queue(store, export("p-1", 1), export("p-2", 2), export("p-3", 3))
    items = {p.profile_id: p for p in store.claim_due(FLOW, 2**62, 10)}
    store.record_outcomes(FLOW, [], [], [], [items["p-1"]])
    store.record_outcomes(FLOW, [], [], [], [items["p-2"], items["p-3"]],
                          skip_reason="no identity and no mapped attribute")
    assert store.pending_count(FLOW) == 0
    assert store.skipped_counts(FLOW) == {"no identity and no mapped attribute": 2,
                                          "state already delivered": 1}
    assert store.stats(FLOW).skipped == store.skipped_counts(FLOW)
    assert store.skipped_counts("other") == {}


def test_drop_dataflow_erases_its_state_only(store: Store) -> None:
    registered(store)
    store.sync_dataflow("kept", "dest", ["seg-a"], "h")
    queue(store, export("p-1", 1), export("p-2", 2), export("p-3", 3))
    store.enqueue_exports("kept", [export("p-1", 1)])
    store.record_outcomes(FLOW, [attempt(store, "p-1")], [], [attempt(store, "p-2", 400, "HTTP 400")])
    store.acquire_lease(FLOW, 0, "me", 1000)
    counts = store.drop_dataflow(FLOW)
    assert counts["dataflow"] == 1 and counts["queued exports"] == 1
    assert counts["failed requests"] == 1 and counts["delivery records"] == 1
    assert counts["profile snapshots"] == 3 and counts["backfills"] == 1
    assert [f.name for f in store.stored_dataflows()] == ["kept"]
    assert store.pending_count(FLOW) == 0 and store.open_failures(FLOW) == []
    assert store.stats(FLOW).delivered == 0 and not store.stats(FLOW).known
    assert store.pending_count("kept") == 1
    again = store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")  # back: a new dataflow
    assert again.created and store.acquire_lease(FLOW, 0, "another", 1000) == 1


def test_forget_erases_every_trace_and_a_later_fragment_starts_afresh(store: Store) -> None:
    store.append_changes([frag("p-1", {"a": 1}, {"seg-a": "realized"}, {"ecid": [{"id": "e1"}]}),
                          frag("p-2", {"a": 2}, {"seg-a": "realized"}),
                          frag("p-1", {"b": 1}, {"seg-b": "realized"})])
    registered(store)
    store.enqueue_exports(FLOW, [export("p-1", 3), export("p-2", 2)])
    store.record_outcomes(FLOW, [attempt(store, "p-2")], [], [attempt(store, "p-1", 400, "HTTP 400")])
    queue(store, export("p-1", 3), export("p-2", 2))
    job = store.start_backfill(FLOW, None, "by hand")
    store.enqueue_exports(FLOW, [], backfill=(job, "p-1", 1))
    done = store.forget(["p-1", "nobody", "p-1"])
    assert done.counts == {"profiles": 1, "memberships": 2, "change log rows": 2,
                           "queued exports": 1, "dataflow snapshots": 1, "failed requests": 1,
                           "delivery records": 0}
    assert store.load_profiles(["p-1"]) == {} and store.profile_count() == 1
    assert [r[1] for r in store.read_changes(0, 10)] == ["p-2"]
    assert store.memberships(["p-1"], ["seg-a", "seg-b"]) == []
    assert store.snapshots(FLOW, ["p-1", "p-2"]).keys() == {"p-2"}
    assert [p.profile_id for p in store.claim_due(FLOW, 2**62, 10)] == ["p-2"]
    assert store.open_failures(FLOW) == []
    assert next(j for j in store.open_backfills(FLOW) if j.id == job).after_profile == ""
    second = store.forget(["p-2"])
    assert second.counts["delivery records"] == 1 and second.counts["queued exports"] == 1
    store.append_changes([frag("p-1", {"c": 1})])
    fresh = store.load_profiles(["p-1"])["p-1"]
    assert (fresh.attributes, fresh.identity_map, fresh.segments) == ({"c": 1}, {}, {})


def test_prune_changes_only_what_every_dataflow_read_and_is_old(store: Store) -> None:
    store.append_changes([frag(f"p-{i}") for i in range(6)])     # seq 1..6
    registered(store)                                             # cursor 6
    store.sync_dataflow("slow", "dest", ["seg-a"], "h")           # cursor 6
    store.append_changes([frag("p-9"), frag("p-9")])              # seq 7, 8
    future = now_ms() + 60_000
    assert store.prune_changes(now_ms() - 60_000, 100) == 0       # nothing that old
    assert store.prune_changes(future, 2) == 2                    # a batch of the oldest
    assert [r[0] for r in store.read_changes(0, 100)] == [3, 4, 5, 6, 7, 8]
    assert store.prune_changes(future, 100) == 4                  # up to the lowest cursor
    assert [r[0] for r in store.read_changes(0, 100)] == [7, 8]
    store.enqueue_exports(FLOW, [], cursor_from=6, cursor_to=8)
    store.enqueue_exports("slow", [], cursor_from=6, cursor_to=8)
    assert store.prune_changes(future, 100) == 1                  # the newest row stays
    assert store.head_seq() == 8
    store.append_changes([frag("p-9")])
    assert store.head_seq() == 9  # seqs are never reused


def test_prune_deliveries_in_batches_and_resolved_failures_only(store: Store) -> None:
    registered(store)
    queue(store, *(export(f"p-{i}", i) for i in range(5)))
    items = store.claim_due(FLOW, 2**62, 10)
    store.record_outcomes(FLOW, [Attempt(i, i.seq, "k", 200, None, now_ms()) for i in items[:3]],
                          [], [Attempt(i, i.seq, "k", 400, "HTTP 400", now_ms()) for i in items[3:]])
    future = now_ms() + 60_000
    assert store.prune_deliveries(future, limit=2) == 2
    assert store.prune_deliveries(future, limit=2) == 1
    assert store.prune_resolved_failures(future, 10) == 0        # open failures are kept
    entries = store.open_failures(FLOW)
    store.requeue_failures(FLOW, entries[:1])
    assert store.prune_resolved_failures(now_ms() - 60_000, 10) == 0
    assert store.prune_resolved_failures(future, 10) == 1
    assert [e.id for e in store.open_failures(FLOW)] == [entries[1].id]

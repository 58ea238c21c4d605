"""Backfill by reference, one set-based transaction per chunk (``Store.queue_backfill``):
what a chunk queues and records, forgotten profiles, crashes inside a chunk, and both
ways of reading a chunk (a walk in key order, or one pass over the table for a small
backfill) giving the same result. Also the migration that moved memberships into the
profile row. The verb's tests run on every engine of the contract suite
(``tests/test_store_contract.py``); the others on SQLite files."""

from __future__ import annotations

import io
import random
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

import state.dataflows as flows_state
from config import parse_config
from state import Store, open_store
from state.db import open_db
from state.model import Attempt, Backfill, Export
from state.schema import MIGRATIONS
from tasks import pipeline
from tasks.ingest import ingest_stream
from tests.test_store_contract import ENGINES, make_store

FLOW = "flow-1"
SEGMENTS = ["seg-a", "seg-b", "seg-ab", "seg 'q'", "seg%_\u00e9"]  # prefixes, quotes, LIKE signs


def ingest(store: Store, *docs: dict[str, Any]) -> None:
    data = b"".join(orjson.dumps(d) + b"\n" for d in docs)
    result = ingest_stream(store, io.BytesIO(data), "test", frozenset(SEGMENTS))
    assert result.rejected == 0, result.rejections


def member(pid: str, **statuses: str) -> dict[str, Any]:
    """A fragment setting these segments (keyword: segment with '-' as '_')."""
    ups = {seg.replace("_", "-"): {"status": status} for seg, status in statuses.items()}
    return {"profileId": pid, "segmentMembership": {"ups": ups}}


def fragment(pid: str, segments: dict[str, str]) -> dict[str, Any]:
    return {"profileId": pid, "segmentMembership": {"ups": {
        seg: {"status": status} for seg, status in segments.items()}}}


def job_of(store: Store, job_id: int) -> Backfill:
    return next(j for j in store.open_backfills(FLOW) if j.id == job_id)


def outbox(store: Store) -> dict[str, tuple[int, str]]:
    return {p.profile_id: (p.seq, p.reason) for p in store.claim_due(FLOW, 2**62, 10**6)}


def last_seqs(store: Store, pids: list[str]) -> dict[str, int]:
    return {pid: p.last_seq for pid, p in store.load_profiles(pids).items()}


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """Every engine of the Store contract suite: these verbs are part of the interface."""
    st = make_store(request.param, tmp_path, request)
    yield st
    st.close()


@pytest.fixture
def sqlite_store(tmp_path: Path):
    st = open_store(tmp_path / "relay.db")
    yield st
    st.close()


def test_a_chunk_queues_references_snapshots_and_progress_in_one_step(store: Store) -> None:
    ingest(store, member("p-1", seg_a="realized", seg_b="existing"),
           member("p-2", seg_b="realized"), member("p-3", seg_a="exited"),
           member("p-4", seg_ab="realized"),  # seg-ab is not seg-a
           member("p-5", seg_a="existing"), {"profileId": "p-6"})
    store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")
    [job] = store.open_backfills(FLOW)
    tracked = ["seg-b", "seg-a", "seg-ab"]  # mapped and unmapped ones the snapshot keeps
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], tracked, "", 1) == ("p-1", 1)
    assert (job_of(store, job.id).after_profile, job_of(store, job.id).done) == ("p-1", 1)
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], tracked, "p-1", 10) == ("p-5", 1)
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], tracked, "p-5", 10) is None
    assert (job_of(store, job.id).after_profile, job_of(store, job.id).done) == ("p-5", 2)
    seqs = last_seqs(store, ["p-1", "p-5"])
    assert outbox(store) == {"p-1": (seqs["p-1"], "backfill"), "p-5": (seqs["p-5"], "backfill")}
    # the snapshot names the tracked segments qualified now, sorted, as backfill_rows does
    assert store.snapshots(FLOW, ["p-1", "p-2", "p-5"]) == {
        "p-1": ("seg-a\nseg-b", seqs["p-1"]), "p-5": ("seg-a", seqs["p-5"])}
    assert [(pid, q) for pid, _, q in store.backfill_rows(["p-1", "p-5"], tracked)] == [
        ("p-1", "seg-a\nseg-b"), ("p-5", "seg-a")]


def test_segment_ids_are_matched_whole_whatever_their_characters(store: Store) -> None:
    odd = "seg 'q'"
    ingest(store, fragment("p-1", {odd: "realized"}), fragment("p-2", {"seg%_\u00e9": "realized"}),
           fragment("p-3", {"seg-ab": "realized"}), fragment("p-4", {"seg-a": "realized"}))
    store.sync_dataflow(FLOW, "dest", [odd], "h")
    [job] = store.open_backfills(FLOW)
    for segments, expected in (([odd], ["p-1"]), (["seg%_\u00e9"], ["p-2"]), (["seg-a"], ["p-4"]),
                               (["seg-b"], []), (["seg-a", odd], ["p-1", "p-4"])):
        assert store.count_qualified(segments) == len(expected)
        assert store.qualified_after(segments, "", 10) == expected
        step = store.queue_backfill(FLOW, job.id, segments, segments, "", 10)
        assert step == ((expected[-1], len(expected)) if expected else None)


def test_a_waiting_newer_export_is_kept_and_an_older_one_replaced(store: Store) -> None:
    ingest(store, member("p-1", seg_a="realized"), member("p-2", seg_a="realized"))
    store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")
    seqs = last_seqs(store, ["p-1", "p-2"])
    store.enqueue_exports(FLOW, [Export("p-1", seqs["p-1"] + 100, "attribute", 1, "seg-a"),
                                 Export("p-2", seqs["p-2"] - 1, "attribute", 1, "seg-a")])
    [item] = [p for p in store.claim_due(FLOW, 2**62, 10) if p.profile_id == "p-2"]
    store.record_outcomes(FLOW, [], [Attempt(item, item.seq, "k", 503, "HTTP 503", 5, 10**12)], [])
    [job] = store.open_backfills(FLOW)
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], ["seg-a"], "", 10) == ("p-2", 2)
    waiting = {p.profile_id: p for p in store.claim_due(FLOW, 2**62, 10)}
    assert (waiting["p-1"].seq, waiting["p-1"].reason) == (seqs["p-1"] + 100, "attribute")
    # the older one is replaced by the backfill's, its retry state reset
    assert (waiting["p-2"].seq, waiting["p-2"].reason, waiting["p-2"].attempts) == (
        seqs["p-2"], "backfill", 0)
    # the snapshot keeps the newest seq queued
    assert store.snapshots(FLOW, ["p-1"])["p-1"] == ("seg-a", seqs["p-1"] + 100)


def test_forgotten_profiles_are_never_queued(store: Store) -> None:
    ingest(store, *(member(f"p-{i:02d}", seg_a="realized") for i in range(10)))
    store.sync_dataflow(FLOW, "dest", ["seg-a"], "h")
    [job] = store.open_backfills(FLOW)
    store.set_backfill_total(job.id, store.count_qualified(["seg-a"]))  # 10, then a forget
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], ["seg-a"], "", 4) == ("p-03", 4)
    store.forget(["p-03", "p-05", "p-09"])  # one already queued, two still to come
    assert job_of(store, job.id).after_profile == "p-02"  # the forget stepped back past it
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], ["seg-a"], "p-02", 4) == ("p-08", 4)
    assert store.queue_backfill(FLOW, job.id, ["seg-a"], ["seg-a"], "p-08", 4) is None
    kept = [f"p-{i:02d}" for i in range(10) if i not in (3, 5, 9)]
    assert sorted(outbox(store)) == kept
    assert sorted(store.snapshots(FLOW, [f"p-{i:02d}" for i in range(10)])) == kept


def test_a_crash_inside_a_chunk_writes_nothing_of_it_and_the_backfill_resumes(
        sqlite_store: Store) -> None:
    store = sqlite_store
    pids = [f"p-{i:02d}" for i in range(12)]
    ingest(store, *(member(pid, seg_a="realized") for pid in pids))
    config = parse_config({
        "segments": [{"id": s} for s in SEGMENTS],
        "destinations": [{"name": "dest", "endpoint": "http://127.0.0.1:9/x"}],
        "dataflows": [{"name": FLOW, "destination": "dest", "segments": ["seg-a"],
                       "attributes": []}]})
    flow = config.dataflow(FLOW)
    pipeline.sync(store, config, flow)
    [job] = store.open_backfills(FLOW)
    conn = store.db.conn
    # the second chunk's snapshot insert fails after its outbox rows went in
    conn.execute("CREATE TRIGGER boom BEFORE INSERT ON dataflow_profiles "
                 "WHEN NEW.profile_id = 'p-07' BEGIN SELECT RAISE(ABORT, 'disk gone'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk gone"):
        pipeline.backfill(store, flow, job, chunk=5)
    assert sorted(outbox(store)) == pids[:5]
    assert sorted(store.snapshots(FLOW, pids)) == pids[:5]
    [job] = store.open_backfills(FLOW)
    assert (job.after_profile, job.done, job.total) == ("p-04", 5, 12)
    conn.execute("DROP TRIGGER boom")
    assert pipeline.backfill(store, flow, job, chunk=5) == 7
    assert sorted(outbox(store)) == pids and store.open_backfills(FLOW) == []
    assert conn.execute("SELECT count(*) FROM temp.sqlite_master").fetchone()[0] == 0


def test_a_walk_in_key_order_and_a_pass_over_the_table_queue_the_same(tmp_path: Path) -> None:
    """Profiles stored in a random order, a third of them qualified: a backfill large for
    its chunk walks the profiles in key order, a small one (at most ``SCAN_CHUNKS`` chunks)
    reads each chunk with one pass over the table; both queue the same exports and
    snapshots, chunk by chunk."""
    rng = random.Random(5)
    pids = [f"p-{i:04d}" for i in range(300)]
    rng.shuffle(pids)
    docs = [fragment(pid, {"seg-a": rng.choice(["realized", "existing", "exited"]),
                           "seg-b": rng.choice(["realized", "exited", "exited"])})
            for pid in pids]
    results = []
    for small in (False, True):
        store = open_store(tmp_path / f"{small}.db")
        ingest(store, *docs)
        store.sync_dataflow(FLOW, "dest", ["seg-a", "seg-b"], "h")
        [job] = store.open_backfills(FLOW)
        if small:  # as the pipeline records it before the first chunk
            store.set_backfill_total(job.id, flows_state.SCAN_CHUNKS * 10)
        steps, after = [], ""
        while step := store.queue_backfill(FLOW, job.id, ["seg-b"], ["seg-a", "seg-b"], after, 10):
            steps.append(step)
            after = step[0]
        qualified = [pid for pid, _, q in store.backfill_rows(pids, ["seg-b"]) if q]
        assert [n for _, n in steps[:-1]] == [10] * (len(steps) - 1)
        assert sum(n for _, n in steps) == len(qualified) == store.count_qualified(["seg-b"])
        assert 60 < len(qualified) < 140
        results.append((steps, outbox(store), store.snapshots(FLOW, pids)))
        store.close()
    assert results[0] == results[1]


def test_migration_6_moves_memberships_into_the_profile_row(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    conn.executescript(";\n".join(MIGRATIONS[:5]) + ";\n"
                       "CREATE TABLE schema_version (version INTEGER NOT NULL);"
                       "INSERT INTO schema_version VALUES (5);")
    conn.executemany("INSERT INTO profiles VALUES (?, 1, ?, '{}', 10, 20, ?)",
                     [("p-1", b'{"a":1}', 3), ("p-2", b"{}", 4), ("p-3", b"{}", 5)])
    conn.executemany("INSERT INTO profile_segments VALUES (?, ?, ?, ?)", [
        ("p-1", "seg-b", "existing", "2026-01-01T00:00:00Z"),
        ("p-1", "seg-a", "realized", None),
        ("p-2", "seg-a", "exited", "2026-01-02T00:00:00Z"),
        ("orphan", "seg-a", "realized", None)])  # a membership without its profile row
    conn.commit()
    conn.close()
    store = open_store(path)
    loaded = store.load_profiles(["p-1", "p-2", "p-3", "orphan"])
    assert {pid: p.segments for pid, p in loaded.items()} == {
        "p-1": {"seg-a": ("realized", None), "seg-b": ("existing", "2026-01-01T00:00:00Z")},
        "p-2": {"seg-a": ("exited", "2026-01-02T00:00:00Z")}, "p-3": {}, "orphan": {
            "seg-a": ("realized", None)}}
    assert (loaded["p-1"].attributes, loaded["p-1"].last_seq) == ({"a": 1}, 3)
    assert dict(store.db.conn.execute("SELECT profile_id, qualified FROM profiles")) == {
        "p-1": "\nseg-a\nseg-b\n", "p-2": "", "p-3": "", "orphan": "\nseg-a\n"}
    assert sorted(store.db.conn.execute("SELECT * FROM profile_segments")) == [
        ("orphan", "seg-a", "realized", None), ("p-1", "seg-a", "realized", None),
        ("p-1", "seg-b", "existing", "2026-01-01T00:00:00Z"),
        ("p-2", "seg-a", "exited", "2026-01-02T00:00:00Z")]
    assert store.count_qualified(["seg-a"]) == 2
    assert sorted(store.memberships(["p-1", "p-2"], ["seg-a"])) == [
        ("p-1", "seg-a", "realized"), ("p-2", "seg-a", "exited")]
    # a fragment on a migrated profile merges into its statuses
    ingest(store, fragment("p-2", {"seg-a": "realized", "seg-b": "exited"}))
    assert store.load_profiles(["p-2"])["p-2"].segments["seg-a"][0] == "realized"
    assert store.qualified_after(["seg-a"], "", 10) == ["orphan", "p-1", "p-2"]
    store.close()
    assert open_db(path).conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)

"""Ingest (the README's "Ingest format"): parsing, merge semantics, change log, rejections,
ordering, atomic batches, a large round trip, and property tests. Real SQLite files."""

from __future__ import annotations

import contextlib
import gc
import io
import random
import sqlite3
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state import open_store
from state.db import shard_of
from state.model import Fragment, deep_merge, leaf_paths
from tasks.fragments import MAX_DEPTH, MAX_LINE_BYTES, FragmentError, parse_fragment
from tasks.ingest import IngestResult, Rejection, ingest_files, ingest_stream
from tests.test_store_contract import ENGINES, make_store

CAT = frozenset({"seg-a", "seg-b", "seg-c"})
T0 = "2026-01-11T21:24:39Z"


@pytest.fixture
def db(tmp_path: Path):
    database = open_store(tmp_path / "store.db")
    yield database
    database.close()


def to_lines(items: Iterable[Any]) -> bytes:
    out = []
    for item in items:
        out.append(item if isinstance(item, bytes) else orjson.dumps(item))
    return b"\n".join(out) + b"\n"


def ingest(db, items: Iterable[Any], batch_lines: int = 5000, **kw: Any) -> IngestResult:
    return ingest_stream(db, io.BytesIO(to_lines(items)), "input.ndjson", CAT,
                         batch_lines=batch_lines, **kw)


def frag(pid: str = "p-1", ts: str | None = T0, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"profileId": pid}
    if ts is not None:
        doc["timestamp"] = ts
    doc.update(fields)
    return doc


def attrs_of(db, pid: str) -> dict[str, Any]:
    return db.load_profiles([pid])[pid].attributes


def changes(db) -> list[dict[str, Any]]:
    cur = db.db.conn.execute("SELECT * FROM changes ORDER BY seq")
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur]


def iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# --- merge semantics ---------------------------------------------------------------------


def test_attributes_are_deep_merged(db) -> None:
    r = ingest(db, [
        frag(attributes={"person": {"name": {"firstName": "John"}}, "loyalty": {"tier": "gold"}}),
        frag(attributes={"person": {"name": {"lastName": "Doe"}, "birthDate": "1980-01-01"}}),
        frag(attributes={"person": {"name": {"firstName": "Johnny"}}}),
    ])
    assert (r.ingested, r.rejected) == (3, 0)
    assert attrs_of(db, "p-1") == {
        "person": {"name": {"firstName": "Johnny", "lastName": "Doe"}, "birthDate": "1980-01-01"},
        "loyalty": {"tier": "gold"},
    }


def test_null_leaf_removes_and_prunes_empty_parents(db) -> None:
    ingest(db, [
        frag(attributes={"person": {"name": {"firstName": "J", "lastName": "D"}}, "x": 1}),
        frag(attributes={"person": {"name": {"firstName": None}}}),
    ])
    assert attrs_of(db, "p-1") == {"person": {"name": {"lastName": "D"}}, "x": 1}
    ingest(db, [frag(attributes={"person": {"name": {"lastName": None}}})])
    assert attrs_of(db, "p-1") == {"x": 1}  # person.name and person pruned
    ingest(db, [frag(attributes={"x": None, "never": None, "deep": {"er": None}})])
    assert attrs_of(db, "p-1") == {}
    assert db.profile_count() == 1  # an empty profile still exists


def test_null_on_a_subtree_removes_it_whole(db) -> None:
    ingest(db, [frag(attributes={"a": {"b": {"c": 1, "d": 2}, "e": 3}}),
                frag(attributes={"a": {"b": None}})])
    assert attrs_of(db, "p-1") == {"a": {"e": 3}}


def test_scalar_replaces_a_subtree_and_back(db) -> None:
    ingest(db, [frag(attributes={"address": {"city": "Paris", "zip": "75001"}}),
                frag(attributes={"address": "unknown"})])
    assert attrs_of(db, "p-1") == {"address": "unknown"}
    ingest(db, [frag(attributes={"address": {"city": "Lyon"}})])
    assert attrs_of(db, "p-1") == {"address": {"city": "Lyon"}}


def test_objects_that_write_nothing_change_nothing(db) -> None:
    ingest(db, [frag(attributes={"a": 5, "b": {"c": 1}}),
                frag(attributes={"a": {}, "b": {}}),
                frag(attributes={"a": {"x": None}, "b": {"d": {}}})])
    assert attrs_of(db, "p-1") == {"a": 5, "b": {"c": 1}}
    # every change lies on or under a path the change log reports
    assert [c["attr_paths"] for c in changes(db)] == ["a\nb.c", None, "a.x"]


def test_lists_are_leaves(db) -> None:
    ingest(db, [frag(attributes={"tags": ["a", "b", "c"], "o": {"l": [{"k": 1}]}}),
                frag(attributes={"tags": ["z"], "o": {"l": []}})])
    assert attrs_of(db, "p-1") == {"tags": ["z"], "o": {"l": []}}
    assert changes(db)[1]["attr_paths"] == "tags\no.l"


def test_values_of_every_json_type_round_trip(db) -> None:
    value = {"s": "é€😀", "i": -(2**63), "u": 2**64 - 1, "f": 1.5, "t": True, "n0": False,
             "e": "", "l": [1, "x", None, {"k": [True]}]}
    ingest(db, [frag(pid="ü-ñ-☃", attributes={"v": value})])
    assert attrs_of(db, "ü-ñ-☃") == {"v": value}


def test_identities_are_added_and_deduplicated(db) -> None:
    ingest(db, [
        frag(identityMap={"ecid": [{"id": "e1"}], "email": [{"id": "a@x.com", "primary": True}]}),
        frag(identityMap={"ecid": [{"id": "e2"}, {"id": "e1"}, {"id": "e2"}]}),
        frag(identityMap={"ecid": [{"id": "e1"}], "email": [{"id": "a@x.com"}]}),
        frag(identityMap={"crm": [{"id": "c9"}], "empty": []}),
    ])
    profile = db.load_profiles(["p-1"])["p-1"]
    assert profile.identity_map == {
        "ecid": [{"id": "e1"}, {"id": "e2"}],
        "email": [{"id": "a@x.com", "primary": True}],
        "crm": [{"id": "c9"}],
    }
    assert [c["identity_changed"] for c in changes(db)] == [1, 1, 0, 1]
    assert orjson.loads(changes(db)[1]["identities"]) == {
        "ecid": [{"id": "e2"}, {"id": "e1"}, {"id": "e2"}]}


def test_identities_are_per_profile(db) -> None:
    ingest(db, [frag("p-1", identityMap={"ecid": [{"id": "same"}]}),
                frag("p-2", identityMap={"ecid": [{"id": "same"}]})])
    assert [c["identity_changed"] for c in changes(db)] == [1, 1]


def test_segment_status_is_set_and_latest_wins(db) -> None:
    ingest(db, [
        frag(ts="2026-01-11T10:00:00Z", segmentMembership={"ups": {
            "seg-a": {"status": "realized"}, "seg-b": {"status": "realized"}}}),
        frag(ts="2026-01-11T11:00:00Z", segmentMembership={"ups": {
            "seg-a": {"status": "existing", "lastQualificationTime": "2026-01-11T10:30:00Z"}}}),
        frag(ts="2026-01-11T12:00:00Z", segmentMembership={"ups": {"seg-b": {"status": "exited"}}}),
        frag(ts="2026-01-11T13:00:00Z", attributes={"x": 1}),
    ])
    assert db.load_profiles(["p-1"])["p-1"].segments == {
        "seg-a": ("existing", "2026-01-11T10:30:00Z"),
        "seg-b": ("exited", "2026-01-11T12:00:00Z"),
    }
    assert [c["segments"] for c in changes(db)] == [
        '{"seg-a":"realized","seg-b":"realized"}', '{"seg-a":"existing"}',
        '{"seg-b":"exited"}', None]


def test_qualification_time_defaults_to_fragment_time_and_is_utc(db) -> None:
    ingest(db, [
        frag("p-1", ts="2026-01-11T23:24:39+02:00",
             segmentMembership={"ups": {"seg-a": {"status": "realized"}}}),
        frag("p-2", ts="2026-01-11T21:24:39",  # no offset: taken as UTC
             segmentMembership={"ups": {"seg-a": {"status": "realized"}}}),
        frag("p-3", ts="2026-01-11T21:24:39.987654Z", segmentMembership={"ups": {
            "seg-a": {"status": "existing", "lastQualificationTime": "2026-01-10T19:00:00-05:00"},
            "seg-b": {"status": "exited", "lastQualificationTime": None}}}),
    ])
    got = db.load_profiles(["p-1", "p-2", "p-3"])
    assert got["p-1"].segments == {"seg-a": ("realized", "2026-01-11T21:24:39Z")}
    assert got["p-2"].segments == {"seg-a": ("realized", "2026-01-11T21:24:39Z")}
    assert got["p-3"].segments == {"seg-a": ("existing", "2026-01-11T00:00:00Z"),
                                   "seg-b": ("exited", "2026-01-11T21:24:39Z")}
    assert [c["ts"] for c in changes(db)] == [
        iso_ms("2026-01-11T21:24:39+00:00"), iso_ms("2026-01-11T21:24:39+00:00"),
        iso_ms("2026-01-11T21:24:39.987+00:00")]


def test_missing_timestamp_is_the_time_of_ingest(db) -> None:
    before = time.time_ns() // 1_000_000
    ingest(db, [frag(ts=None, segmentMembership={"ups": {"seg-c": {"status": "realized"}}}),
                {"profileId": "p-2", "timestamp": None}])
    after = time.time_ns() // 1_000_000
    rows = changes(db)
    for row in rows:
        assert before <= row["ts"] <= after
        assert before <= row["committed_at"] <= after
    lqt = db.load_profiles(["p-1"])["p-1"].segments["seg-c"][1]
    assert lqt.endswith("Z")
    assert before // 1000 - 1 <= iso_ms(lqt) // 1000 <= after // 1000


def test_change_log_row_per_fragment(db) -> None:
    ingest(db, [
        frag("p-1", attributes={"person": {"name": {"firstName": "J"}}, "email": "a@x"}),
        frag("p-1", attributes={"person": {"name": {"firstName": "J"}}}),  # same value again
        frag("p-2", attributes={"gone": None}, identityMap={"ecid": [{"id": "1"}]}),
        frag("p-1"),  # only a profileId
    ])
    rows = changes(db)
    assert [r["profile_id"] for r in rows] == ["p-1", "p-1", "p-2", "p-1"]
    assert [r["attr_paths"] for r in rows] == [
        "person.name.firstName\nemail", "person.name.firstName", "gone", None]
    assert [r["identity_changed"] for r in rows] == [0, 0, 1, 0]
    assert [r["identities"] for r in rows] == [None, None, '{"ecid":[{"id":"1"}]}', None]
    assert all(r["segments"] is None for r in rows)
    assert [r["shard"] for r in rows] == [shard_of(r["profile_id"]) for r in rows]
    assert [r["ts"] for r in rows] == [iso_ms("2026-01-11T21:24:39+00:00")] * 4
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    profiles = {pid: (last, created, updated) for pid, last, created, updated in db.db.conn.execute(
        "SELECT profile_id, last_seq, created_at, updated_at FROM profiles")}
    assert profiles["p-1"][0] == seqs[3] and profiles["p-2"][0] == seqs[2]


def test_profile_row_keeps_created_at_and_moves_last_seq(db) -> None:
    r1 = ingest(db, [frag(attributes={"a": 1})])
    created = db.db.conn.execute("SELECT created_at FROM profiles").fetchone()[0]
    time.sleep(0.01)
    r2 = ingest(db, [frag(attributes={"a": 2})])
    last, created2, updated = db.db.conn.execute(
        "SELECT last_seq, created_at, updated_at FROM profiles").fetchone()
    assert created2 == created and updated > created
    assert r1.last_seq < r2.last_seq == last


def test_fragments_apply_in_ingest_order_within_and_across_batches(db) -> None:
    n = 50
    items = []
    for i in range(n):
        # timestamps go backwards: ingest order wins, not timestamp order
        ts = datetime.fromtimestamp(2_000_000_000 - i, UTC).isoformat()
        items.append(frag(f"p-{i % 3}", ts=ts, attributes={"n": i, f"k{i}": i},
                          segmentMembership={"ups": {"seg-a": {
                              "status": ["realized", "existing", "exited"][i % 3 if i < 45 else 2]}}}))
    result = ingest(db, items, batch_lines=7)
    assert result.ingested == n
    rows = changes(db)
    assert [r["profile_id"] for r in rows] == [f"p-{i % 3}" for i in range(n)]
    assert [r["attr_paths"] for r in rows] == [f"n\nk{i}" for i in range(n)]
    got = db.load_profiles(["p-0", "p-1", "p-2"])
    for p in range(3):
        last = max(i for i in range(n) if i % 3 == p)
        assert got[f"p-{p}"].attributes["n"] == last
        assert len(got[f"p-{p}"].attributes) == 1 + len(range(p, n, 3))
        assert got[f"p-{p}"].segments["seg-a"][0] == "exited"
    assert result.last_seq == rows[-1]["seq"]


def test_order_holds_across_separate_ingests(db, tmp_path: Path) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    a.write_bytes(to_lines([frag(attributes={"v": "a1"}), frag(attributes={"v": "a2"})]))
    b.write_bytes(to_lines([frag(attributes={"v": "b1"})]))
    result = ingest_files(db, [str(b), str(a)], CAT)
    assert result.ingested == 3
    assert attrs_of(db, "p-1") == {"v": "a2"}


# --- rejections -----------------------------------------------------------------------------


BAD_LINES: list[tuple[bytes, str]] = [
    (b"{not json", "not valid JSON"),
    (b'["profileId", "p"]', "must be a JSON object, got list"),
    (b'"just a string"', "must be a JSON object, got str"),
    (b'{"attributes": {"a": 1}}', "profileId is required"),
    (b'{"profileId": ""}', "profileId is required"),
    (b'{"profileId": 42}', "profileId is required"),
    (b'{"profileId": "p", "attributes": [1]}', "attributes must be an object"),
    (b'{"profileId": "p", "identityMap": {"ecid": {"id": "1"}}}', "identityMap.ecid must be a list"),
    (b'{"profileId": "p", "identityMap": {"ecid": [{"id": 5}]}}', "identityMap.ecid[0]"),
    (b'{"profileId": "p\\u0000q"}', "profileId must not contain a NUL character"),
    (b'{"profileId": "p", "timestamp": 1700000000}', "timestamp must be an ISO 8601 string"),
    (b'{"profileId": "p", "timestamp": "yesterday"}', "timestamp is not an ISO 8601 time"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-a": {"status": "qualified"}}}}',
     "segmentMembership.ups.seg-a.status must be realized, existing or exited"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-a": {}}}}', "status must be"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-a": {"status": ["realized"]}}}}',
     "status must be realized, existing or exited"),  # unhashable: a reason, not a crash
    (b'{"profileId": "p", "identityMap": {"ecid": [{"id": "1", "authenticatedState": {}}]}}',
     "authenticatedState must be one of"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-zz": {"status": "realized"}}}}',
     "segment 'seg-zz' is not in the config's catalogue"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-a": "realized"}}}',
     "must be an object with a status"),
    (b'{"profileId": "p", "segmentMembership": {"seg-a": {"status": "realized"}}}',
     "segmentMembership"),
    (b'{"profileId": "p", "segmentMembership": {"ups": {"seg-a": {"status": "realized", '
     b'"lastQualificationTime": "nope"}}}}', "lastQualificationTime is not an ISO 8601 time"),
    (b'{"profileId": "p", "email": "x"}', "unknown field(s) ['email']"),
    (b'{"profileId": "p", "attributes": {"a.b": 1}}', "invalid key 'a.b'"),
    (b'{"profileId": "p", "attributes": {"": 1}}', "invalid key"),
    (b'{"profileId": "\xff\xfe"}', "not valid JSON"),  # invalid UTF-8
    (b'{"profileId": "p", "attributes": {"n": NaN}}', "not valid JSON"),
    (b'\xef\xbb\xbf{"profileId": "p"}', "not valid JSON"),  # a byte order mark
    (b'{"profileId": "p", "timestamp": "0001-01-01T00:00:00+14:00"}', "out of range"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_line_is_rejected_with_reason_and_neighbours_kept(db, line, reason) -> None:
    seen: list[Rejection] = []
    result = ingest(db, [frag("before"), line, frag("after")], on_reject=seen.append)
    assert (result.ingested, result.rejected) == (2, 1)
    [rej] = result.rejections
    assert seen == [rej]
    assert (rej.source, rej.line) == ("input.ndjson", 2)
    assert reason in rej.reason
    assert str(rej).startswith("input.ndjson:2: ")
    assert sorted(db.load_profiles(["before", "after", "p"])) == ["after", "before"]


def test_too_long_profile_id_is_rejected(db) -> None:
    result = ingest(db, [frag("x" * 257), frag("y" * 256)])
    assert result.ingested == 1 and "longer than 256" in result.rejections[0].reason


def test_nesting_limit(db) -> None:
    def nested(depth: int) -> dict[str, Any]:
        doc: Any = "leaf"
        for _ in range(depth):
            doc = {"k": doc}
        return doc

    # deeper than orjson will encode (255) but not than it decodes: must be rejected, not
    # crash the batch when the store writes it
    deep_list = b"[" * 300 + b"1" + b"]" * 300
    result = ingest(db, [
        frag("ok", attributes=nested(MAX_DEPTH)),
        frag("too-deep", attributes=nested(MAX_DEPTH + 1)),
        b'{"profileId": "deep-list", "attributes": {"l": ' + deep_list + b"}}",
        b'{"profileId": "deep-identity", "identityMap": {"ecid": [{"id": "1", "meta": '
        + deep_list + b"}]}}",
        frag("ok-list", attributes={"l": [[[1]], {"a": [2]}]}),
    ])
    assert result.ingested == 2
    assert [(r.line, "nested deeper than 32" in r.reason) for r in result.rejections] == [
        (2, True), (3, True), (4, True)]
    assert sorted(db.load_profiles(["ok", "ok-list", "too-deep", "deep-list"])) == ["ok", "ok-list"]


def test_line_over_the_size_limit(db, tmp_path: Path) -> None:
    big = orjson.dumps(frag("big", attributes={"blob": "x" * (MAX_LINE_BYTES + 10)}))
    # a line exactly at the limit (newline included) is accepted
    pad = MAX_LINE_BYTES - 1 - len(orjson.dumps(frag("edge", attributes={"blob": ""})))
    edge = orjson.dumps(frag("edge", attributes={"blob": "y" * pad}))
    path = tmp_path / "big.ndjson"
    path.write_bytes(to_lines([frag("a"), big, frag("b"), b"x" * (3 * MAX_LINE_BYTES), edge]))
    result = ingest_files(db, [str(path)], CAT)
    assert result.ingested == 3
    assert [(r.source, r.line) for r in result.rejections] == [(str(path), 2), (str(path), 4)]
    assert f"line is {len(big) + 1} bytes" in result.rejections[0].reason
    assert f"line is {3 * MAX_LINE_BYTES + 1} bytes" in result.rejections[1].reason
    assert "byte limit" in result.rejections[1].reason
    assert sorted(db.load_profiles(["a", "b", "big", "edge"])) == ["a", "b", "edge"]


def test_many_rejections_in_one_file(db, tmp_path: Path) -> None:
    """File name and line numbers (blank lines counted, CRLF accepted), good lines kept."""
    path = tmp_path / "mixed.ndjson"
    content = (
        b'{"profileId": "p-1", "attributes": {"a": 1}}\r\n'  # 1
        b"\n"                                                # 2 blank: skipped, not rejected
        b"garbage\n"                                         # 3
        b"   \t \n"                                          # 4 blank
        b'{"profileId": "p-2"}\n'                            # 5
        b"null\n"                                            # 6
        b'{"profileId": "p-1", "attributes": {"b": 2}}\n'    # 7
        b'{"profileId": "p-3"'                               # 8, truncated and no newline
    )
    path.write_bytes(content)
    progress: list[int] = []
    result = ingest_files(db, [str(path)], CAT, on_progress=progress.append)
    assert (result.ingested, result.rejected) == (3, 3)
    assert [(r.source, r.line) for r in result.rejections] == [
        (str(path), 3), (str(path), 6), (str(path), 8)]
    assert "not valid JSON" in result.rejections[-1].reason
    assert attrs_of(db, "p-1") == {"a": 1, "b": 2}
    assert sum(progress) == len(content) - len(b"\n" + b"   \t \n")  # blank lines skipped


def test_truncated_last_line_is_rejected(db) -> None:
    stream = io.BytesIO(b'{"profileId": "p-1"}\n{"profileId": "p-3"')
    result = ingest_stream(db, stream, "t.ndjson", CAT)
    assert (result.ingested, result.rejected) == (1, 1)
    assert result.rejections[0].line == 2


def test_progress_counts_every_byte_read(db) -> None:
    lines = [orjson.dumps(frag(f"p-{i}")) for i in range(10)] + [b"bad"]
    progress: list[int] = []
    ingest(db, lines, batch_lines=3, on_progress=progress.append)
    assert sum(progress) == sum(len(line) + 1 for line in lines)
    assert len(progress) == 4


def test_rejection_list_is_capped_but_counted(db) -> None:
    seen: list[Rejection] = []
    result = ingest(db, [b"x"] * 1500 + [frag()], on_reject=seen.append)
    assert result.rejected == 1500 and len(seen) == 1500
    assert len(result.rejections) == 1000
    assert result.ingested == 1


def test_stdin_is_read_for_dash(db, monkeypatch) -> None:
    class FakeStdin:
        buffer = io.BytesIO(to_lines([frag("from-stdin"), b"oops"]))

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    result = ingest_files(db, ["-"], CAT)
    assert result.ingested == 1
    assert [(r.source, r.line) for r in result.rejections] == [("<stdin>", 2)]


def test_empty_input(db) -> None:
    result = ingest_stream(db, io.BytesIO(b""), "e", CAT)
    assert (result.ingested, result.rejected, result.last_seq) == (0, 0, 0)


# --- atomic batches ------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["changes", "profiles"])  # memberships: in the profile row
def test_a_failing_batch_leaves_no_rows(db, table: str) -> None:
    key = "profile_id"
    db.db.conn.execute(
        f"CREATE TRIGGER poison BEFORE INSERT ON {table} WHEN NEW.{key} = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
    seg = {"segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}}
    items = [frag(f"ok-{i}", attributes={"i": i}, **seg) for i in range(6)]
    items += [frag("ok-0", attributes={"later": True}, identityMap={"e": [{"id": "x"}]}),
              frag("poison", attributes={"x": 1}, **seg),
              frag("ok-9", **seg)]
    with pytest.raises(sqlite3.IntegrityError, match="poisoned row"):
        ingest(db, items, batch_lines=3)
    assert gc.isenabled()  # the collector, paused per batch, is back on
    conn = db.db.conn
    assert not conn.in_transaction
    # batches 1 and 2 (lines 1 to 6) are in; nothing of batch 3
    assert {r[0] for r in conn.execute("SELECT profile_id FROM profiles")} == {
        f"ok-{i}" for i in range(6)}
    assert conn.execute("SELECT count(*) FROM changes").fetchone()[0] == 6
    assert conn.execute("SELECT count(*) FROM profile_segments").fetchone()[0] == 6
    assert attrs_of(db, "ok-0") == {"i": 0}
    assert db.load_profiles(["ok-0"])["ok-0"].identity_map == {}
    # the store is still usable and the change log stays contiguous after the failure
    conn.execute("DROP TRIGGER poison")
    result = ingest(db, items[6:], batch_lines=3)
    assert result.ingested == 3
    seqs = [r["seq"] for r in changes(db)]
    assert len(seqs) == 9 and seqs == sorted(seqs)
    assert attrs_of(db, "ok-0") == {"i": 0, "later": True}


# --- a large round trip against a model -------------------------------------------------


LEAF_PATHS = ["person.name.firstName", "person.name.lastName", "person.birthDate",
              "personalEmail.address", "loyalty.tier", "loyalty.points", "tags",
              "address.city", "address.geo.lat"]
SUBTREE_PATHS = ["person", "person.name", "loyalty", "address", "address.geo"]


def _flat_apply(flat: dict[str, Any], writes: list[tuple[str, Any]]) -> None:
    """The model: a profile is a map of dotted leaf path -> value."""
    for path, value in writes:
        for existing in list(flat):
            if existing == path or existing.startswith(path + "."):
                del flat[existing]  # the path itself and everything under it
            elif value is not None and path.startswith(existing + "."):
                del flat[existing]  # a scalar where an object must now be
        if value is not None:
            flat[path] = value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _patch_from(writes: list[tuple[str, Any]]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Nest (path, value) writes into one fragment; drop writes that clash inside it."""
    kept: list[tuple[str, Any]] = []
    for path, value in writes:
        if any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p, _ in kept):
            continue
        kept.append((path, value))
    patch: dict[str, Any] = {}
    for path, value in kept:
        node = patch
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return patch, kept


def test_large_round_trip_matches_a_model(tmp_path: Path) -> None:
    rng = random.Random(20260111)
    n_frags, n_profiles = 20_000, 1_500
    model_attrs: dict[str, dict[str, Any]] = {}
    model_ids: dict[str, dict[str, list[str]]] = {}
    model_segs: dict[str, dict[str, tuple[str, str]]] = {}
    model_added = 0
    path = tmp_path / "round.ndjson"
    with path.open("wb") as out:
        for i in range(n_frags):
            pid = f"prof-{int(rng.paretovariate(1.2) * 7) % n_profiles:05d}"
            ts = datetime.fromtimestamp(1_760_000_000 + i, UTC)
            doc: dict[str, Any] = {"profileId": pid, "timestamp": ts.isoformat()}
            writes: list[tuple[str, Any]] = []
            for _ in range(rng.randint(0, 4)):
                roll = rng.random()
                if roll < 0.1:
                    writes.append((rng.choice(SUBTREE_PATHS + LEAF_PATHS), None))
                elif roll < 0.15:
                    writes.append((rng.choice(SUBTREE_PATHS), rng.choice(["redacted", 0])))
                else:
                    leaf = rng.choice(LEAF_PATHS)
                    value = ([rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
                             if leaf == "tags" else rng.choice(["a", "b", 1, 2.5, True]))
                    writes.append((leaf, value))
            if writes:
                patch, kept = _patch_from(writes)
                doc["attributes"] = patch
                _flat_apply(model_attrs.setdefault(pid, {}), kept)
            model_attrs.setdefault(pid, {})
            ids = model_ids.setdefault(pid, {})
            if rng.random() < 0.3:
                ns = rng.choice(["ecid", "email"])
                new = [f"{ns}-{rng.randint(0, 5)}" for _ in range(rng.randint(1, 2))]
                doc["identityMap"] = {ns: [{"id": x} for x in new]}
                before = sum(len(v) for v in ids.values())
                for x in new:
                    if x not in ids.setdefault(ns, []):
                        ids[ns].append(x)
                model_added += sum(len(v) for v in ids.values()) > before
            segs = model_segs.setdefault(pid, {})
            if rng.random() < 0.4:
                ups = {}
                for seg in rng.sample(sorted(CAT), rng.randint(1, 2)):
                    status = rng.choice(["realized", "existing", "exited"])
                    entry: dict[str, Any] = {"status": status}
                    lqt = ts.strftime("%Y-%m-%dT%H:%M:%SZ")
                    if rng.random() < 0.5:
                        lqt = "2025-06-01T00:00:00Z"
                        entry["lastQualificationTime"] = "2025-06-01T02:00:00+02:00"
                    ups[seg] = entry
                    segs[seg] = (status, lqt)
                doc["segmentMembership"] = {"ups": ups}
            out.write(orjson.dumps(doc) + b"\n")

    db = open_store(tmp_path / "round.db")
    try:
        result = ingest_files(db, [str(path)], CAT)
        assert (result.ingested, result.rejected) == (n_frags, 0)
        conn = db.db.conn
        assert conn.execute("SELECT count(*) FROM changes").fetchone()[0] == n_frags
        assert conn.execute("SELECT sum(identity_changed) FROM changes").fetchone()[0] == model_added
        assert db.profile_count() == len(model_attrs)
        sample = sorted(model_attrs)
        sample = sample[:50] + rng.sample(sample, 200) + sample[-50:]
        stored = db.load_profiles(sample)
        for pid in sample:
            assert stored[pid].attributes == _nest(model_attrs[pid]), pid
            assert {ns: [e["id"] for e in v] for ns, v in stored[pid].identity_map.items()} == {
                ns: v for ns, v in model_ids[pid].items() if v}, pid
            assert stored[pid].segments == model_segs[pid], pid
        last_seqs = dict(conn.execute("SELECT profile_id, max(seq) FROM changes GROUP BY 1"))
        for pid, last in conn.execute("SELECT profile_id, last_seq FROM profiles"):
            assert last_seqs[pid] == last
    finally:
        db.close()


# --- pure functions ------------------------------------------------------------------------


def test_leaf_paths_and_deep_merge_units() -> None:
    patch = {"a": {"b": 1, "c": {"d": None}, "e": {}}, "f": [1], "g": None}
    assert leaf_paths(patch) == ["a.b", "a.c.d", "f", "g"]
    target = {"a": {"c": {"d": 1}, "x": 2}, "g": 1}
    deep_merge(target, patch)
    assert target == {"a": {"x": 2, "b": 1}, "f": [1]}
    # the patch is not aliased into the target's objects
    patch["a"]["b"] = 99
    assert target["a"]["b"] == 1


def test_apply_fragments_with_hand_made_fragments(db) -> None:
    """Fragments not made by parse_fragment (no precomputed paths) log the same paths."""
    seq = db.append_changes([Fragment("h-1", 7, attributes={"a": {"b": 1, "c": None}}),
                               Fragment("h-1", 8, segments={"seg-a": ("realized", T0)})])
    rows = changes(db)
    assert [r["attr_paths"] for r in rows] == ["a.b\na.c", None]
    assert seq == rows[-1]["seq"]
    assert attrs_of(db, "h-1") == {"a": {"b": 1}}
    assert db.append_changes([]) == 0


def test_parsed_paths_match_leaf_paths() -> None:
    attrs = {"x": {"y": {"z": 1, "n": None, "e": {}}, "l": [1, {"k": 2}]}, "s": "v"}
    parsed = parse_fragment(orjson.dumps({"profileId": "p", "attributes": attrs}), CAT, 0)
    assert parsed.paths == leaf_paths(attrs) == ["x.y.z", "x.y.n", "x.l", "s"]


def test_gc_state_is_restored(db) -> None:
    ingest(db, [frag(), b"bad"])
    assert gc.isenabled()
    gc.disable()
    try:
        ingest(db, [frag()])
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_parse_fragment_accepts_str_and_bytes() -> None:
    line = '{"profileId": "p", "identityMap": {"ecid": [{"id": "1"}]}}'
    for form in (line, line.encode()):
        parsed = parse_fragment(form, CAT, 5)
        assert (parsed.profile_id, parsed.ts, parsed.identities) == ("p", 5, {"ecid": [{"id": "1"}]})


# --- properties ------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=8))
_json = st.recursive(_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=20)
_keys = st.sampled_from(["profileId", "timestamp", "attributes", "identityMap",
                         "segmentMembership", "ups", "status", "seg-a", "id", "x.y", ""])
_jsonish = st.recursive(
    st.one_of(_scalars, st.sampled_from(["p-1", "seg-a", "realized", "exited", T0,
                                         "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-10:00"])),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_keys, kids, max_size=5)),
    max_leaves=25)


def _only_fragment_error(line: bytes | str) -> None:
    with contextlib.suppress(FragmentError):  # anything else fails the test
        parse_fragment(line, CAT, 0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_parse_fragment_on_arbitrary_bytes_only_raises_fragment_error(data: bytes) -> None:
    _only_fragment_error(data)


@settings(max_examples=400, deadline=None)
@given(_jsonish)
def test_parse_fragment_on_jsonish_documents_only_raises_fragment_error(doc: Any) -> None:
    try:
        line = orjson.dumps(doc)
    except TypeError:  # e.g. integers orjson will not encode
        return
    _only_fragment_error(line)
    _only_fragment_error(line.decode())
    if isinstance(doc, dict):
        _only_fragment_error(orjson.dumps({**doc, "profileId": "p"}))


_attr_key = st.text(min_size=1, max_size=5).filter(lambda k: "." not in k)
_attributes = st.recursive(
    st.dictionaries(_attr_key, _scalars | st.lists(_scalars, max_size=3), max_size=3),
    lambda kids: st.dictionaries(_attr_key, kids | _scalars, max_size=3), max_leaves=12)
_valid_fragment = st.fixed_dictionaries(
    {"profileId": st.text(min_size=1, max_size=10).filter(lambda t: t.strip() and "\x00" not in t)},
    optional={
        "timestamp": st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
        "attributes": _attributes,
        "identityMap": st.dictionaries(st.sampled_from(["ecid", "email"]), st.lists(
            st.fixed_dictionaries({"id": st.text(min_size=1, max_size=5)}), max_size=3)),
        "segmentMembership": st.fixed_dictionaries({"ups": st.dictionaries(
            st.sampled_from(sorted(CAT)),
            st.fixed_dictionaries({"status": st.sampled_from(["realized", "existing", "exited"])}),
            max_size=3)}),
    },
)
_garbage = st.one_of(
    st.binary(max_size=60).map(lambda b: b"#" + b.replace(b"\n", b"")),
    _json.filter(lambda d: not isinstance(d, dict)).map(orjson.dumps),
    st.dictionaries(st.sampled_from(["attributes", "identityMap", "nope"]), _json,
                    max_size=3).map(orjson.dumps),
)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory):
    database = open_store(tmp_path_factory.mktemp("prop") / "prop.db")
    yield database
    database.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), _valid_fragment, _garbage), max_size=30),
       st.integers(min_value=1, max_value=8))
def test_ingest_keeps_every_valid_line_among_garbage(shared_db, rows, batch_lines: int) -> None:
    lines: list[bytes] = []
    good_docs: list[dict[str, Any]] = []
    bad_numbers: list[int] = []
    for is_good, doc, junk in rows:
        if is_good:
            lines.append(orjson.dumps(doc))
            good_docs.append(doc)
        else:
            lines.append(junk)
            bad_numbers.append(len(lines))
    conn = shared_db.db.conn
    before = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
    result = ingest_stream(shared_db, io.BytesIO(b"\n".join(lines)), "prop", CAT,
                           batch_lines=batch_lines)
    assert result.ingested == len(good_docs)
    assert [r.line for r in result.rejections] == bad_numbers
    logged = [r[0] for r in conn.execute(
        "SELECT profile_id FROM changes WHERE seq > ? ORDER BY seq", (before,))]
    assert logged == [d["profileId"] for d in good_docs]


def test_a_trickling_pipe_is_committed_without_waiting_for_a_full_batch(tmp_path):
    """A producer writing a few lines now and then (``profile-relay ingest -``) sees them
    committed within the linger time, not after BATCH_LINES lines."""
    import os
    import threading

    from tasks.ingest import ingest_stream

    db = open_store(tmp_path / "relay.db")
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    done = threading.Thread(target=ingest_stream, args=(db, reader, "<pipe>", frozenset()),
                            kwargs={"linger": 0.05})
    done.start()
    os.write(write_fd, b'{"profileId": "p-1"}\n{"profileId": "p-2"}\n')
    seen = 0
    for _ in range(200):  # up to 10 s
        seen = open_store(tmp_path / "relay.db").db.conn.execute(
            "SELECT count(*) FROM changes").fetchone()[0]
        if seen == 2:
            break
        time.sleep(0.05)
    assert seen == 2  # committed while the pipe is still open
    os.write(write_fd, b'{"profileId": "p-3"}\n')
    os.close(write_fd)
    done.join(10)
    assert not done.is_alive()
    assert db.db.conn.execute("SELECT count(*) FROM changes").fetchone()[0] == 3


# --- integers beyond 64 bits ---------------------------------------------------------------


WIDE = 123456789012345678901234567890


@pytest.mark.parametrize(("line", "where"), [
    (b'{"profileId": "p", "attributes": {"loyalty": {"points": %d}}}' % WIDE,
     "attributes.loyalty.points"),
    (b'{"profileId": "p", "attributes": {"l": [1, {"k": [%d]}]}}' % -(2**63 + 1), "attributes.l[1].k[0]"),
    (b'{"profileId": "p", "attributes": {"u": %d}}' % 2**64, "attributes.u"),
    (b'{"profileId": "p", "identityMap": {"ecid": [{"id": "e1", "crmKey": %d}]}}' % WIDE,
     "identityMap.ecid[0].crmKey"),
    (b'{"profileId": "p", "identityMap": {"ecid": [{"id": "e1", "meta": {"n": [%d]}}]}}' % WIDE,
     "identityMap.ecid[0].meta.n[0]"),
])
def test_an_integer_beyond_64_bits_is_rejected_with_where_it_is(db, line, where) -> None:
    """orjson would decode it as a float, rounded: the line is refused, never stored so."""
    result = ingest(db, [frag("before"), line, frag("after")])
    assert (result.ingested, result.rejected) == (2, 1)
    [rej] = result.rejections
    assert rej.line == 2
    assert rej.reason.startswith(f"{where} is an integer beyond 64 bits")
    assert "send it as a string" in rej.reason
    assert db.load_profiles(["p"]) == {}


def test_integers_within_64_bits_floats_and_long_digit_strings_are_kept_exactly(db) -> None:
    attributes = {"max": 2**64 - 1, "min": -(2**63), "big_float": 1e30, "neg_float": -9.3e18,
                  "digits": str(WIDE), "note": f"code: {WIDE}"}
    line = orjson.dumps(frag("p", attributes=attributes,
                             identityMap={"ecid": [{"id": str(WIDE), "n": 2**64 - 1}]}))
    assert b"%d" % WIDE in line  # a long digit run after a colon, inside a string
    result = ingest(db, [line, b'{"profileId": "q", "attributes": {"f": 12345678901234567890123.5}}'])
    assert (result.ingested, result.rejected) == (2, 0)
    profiles = db.load_profiles(["p", "q"])
    assert profiles["p"].attributes == attributes
    assert type(profiles["p"].attributes["max"]) is int
    assert profiles["p"].identity_map == {"ecid": [{"id": str(WIDE), "n": 2**64 - 1}]}
    assert profiles["q"].attributes == {"f": 1.2345678901234568e22}  # a float literal stays one


def test_an_integer_beyond_64_bits_through_the_command_line(tmp_path: Path) -> None:
    """``profile-relay ingest`` reports the line, the path and the reason, keeps the rest."""
    from typer.testing import CliRunner

    from app.cli import app

    config = tmp_path / "relay.yaml"
    config.write_text(
        "state: relay.db\nsegments: [{id: seg-a}]\n"
        "destinations: [{name: d, endpoint: 'http://127.0.0.1:9/x'}]\n"
        "dataflows: [{name: f, destination: d, segments: [seg-a], attributes: [crmId]}]\n")
    data = tmp_path / "in.ndjson"
    data.write_bytes(to_lines([
        frag("ok", attributes={"crmId": 2**64 - 1}),
        b'{"profileId": "wide-attr", "attributes": {"crmId": %d}}' % WIDE,
        b'{"profileId": "wide-id", "identityMap": {"crm": [{"id": "c", "num": %d}]}}' % WIDE,
    ]))
    result = CliRunner().invoke(app, ["ingest", "-c", str(config), str(data)])
    assert result.exit_code == 1, result.output
    assert f"{data}:2: attributes.crmId is an integer beyond 64 bits" in result.stderr
    assert f"{data}:3: identityMap.crm[0].num is an integer beyond 64 bits" in result.stderr
    assert "ingested 1, rejected 2" in result.stdout
    store = open_store(tmp_path / "relay.db")
    try:
        assert set(store.load_profiles(["ok", "wide-attr", "wide-id"])) == {"ok"}
        assert store.load_profiles(["ok"])["ok"].attributes == {"crmId": 2**64 - 1}
    finally:
        store.close()


# --- batches, groups and the line reader -----------------------------------------------------


def test_a_batch_is_one_transaction_across_its_groups(db, monkeypatch) -> None:
    import tasks.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "GROUP_LINES", 2)
    db.db.conn.execute("CREATE TRIGGER poison BEFORE INSERT ON changes WHEN "
                       "NEW.profile_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
    seg = {"segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}}
    items = [frag(f"a-{i}", attributes={"i": i}, **seg) for i in range(6)]       # batch 1
    items += [frag("b-0", attributes={"x": 1}), frag("b-1"), frag("a-0", attributes={"j": 1}),
              frag("b-3"), frag("poison"), frag("b-5")]                          # batch 2
    with pytest.raises(sqlite3.IntegrityError, match="poisoned row"):
        ingest(db, items, batch_lines=6)
    # batch 1's three groups are in; nothing of batch 2's first two groups either
    assert sorted(db.load_profiles([f"a-{i}" for i in range(6)] + ["b-0", "b-1", "b-3"])) == [
        f"a-{i}" for i in range(6)]
    assert attrs_of(db, "a-0") == {"i": 0}
    assert [r["profile_id"] for r in changes(db)] == [f"a-{i}" for i in range(6)]
    assert db.db.conn.execute("SELECT count(*) FROM profile_segments").fetchone()[0] == 6


def test_a_profile_in_several_groups_of_a_batch_merges_in_order(db, monkeypatch) -> None:
    import tasks.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "GROUP_LINES", 3)
    items = [frag("p-1", attributes={"n": i, f"k{i}": i}, identityMap={"e": [{"id": str(i % 4)}]},
                  segmentMembership={"ups": {"seg-a": {"status": ["realized", "exited"][i % 2]},
                                             f"seg-{'bc'[i % 2]}": {"status": "existing"}}})
             for i in range(11)]
    result = ingest(db, items)
    assert result.ingested == 11
    profile = db.load_profiles(["p-1"])["p-1"]
    assert profile.attributes == {"n": 10, **{f"k{i}": i for i in range(11)}}
    assert [e["id"] for e in profile.identity_map["e"]] == ["0", "1", "2", "3"]
    assert {s: v[0] for s, v in profile.segments.items()} == {
        "seg-a": "realized", "seg-b": "existing", "seg-c": "existing"}
    assert db.db.conn.execute("SELECT qualified FROM profiles").fetchone()[0] == (
        "\nseg-a\nseg-b\nseg-c\n")
    assert [c["identity_changed"] for c in changes(db)] == [1, 1, 1, 1] + [0] * 7
    assert profile.last_seq == changes(db)[-1]["seq"] == result.last_seq


def test_groups_are_parsed_only_as_the_store_takes_them(db, monkeypatch) -> None:
    """What is decoded at once is a group: the next group's lines are parsed after the
    store has written the previous one."""
    import tasks.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "GROUP_LINES", 4)
    parsed: list[int] = []
    real_parse = ingest_module.parse_fragment

    def counting(*args: Any) -> Any:
        parsed.append(1)
        return real_parse(*args)

    monkeypatch.setattr(ingest_module, "parse_fragment", counting)
    seen: list[tuple[int, int]] = []
    real_append = db.append_change_groups

    def append(groups: Any) -> int:
        def watched() -> Any:
            for group in groups:
                seen.append((len(group), len(parsed)))
                yield group
        return real_append(watched())

    monkeypatch.setattr(db, "append_change_groups", append)
    ingest(db, [frag(f"p-{i}") for i in range(10)], batch_lines=100)
    assert seen == [(4, 4), (4, 8), (2, 10)]


TRICKY = (b'{"profileId": "p-1", "attributes": {"a": 1}}\r\n'
          b"\n"
          b'{"profileId": "p-2", "attributes": {"s": "' + b"x" * 40 + b'"}}\n'
          b"   \n"
          b'{"profileId": "p-big", "attributes": {"blob": "' + b"y" * 300 + b'"}}\n'
          b"garbage\n"
          b'{"profileId": "p-1", "attributes": {"b": 2}}\n'
          b'{"profileId": "p-3"}')  # no line feed at the end


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_lines_are_the_same_whatever_the_read_block(tmp_path: Path, monkeypatch, block: int) -> None:
    import tasks.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "READ_BLOCK", block)
    monkeypatch.setattr(ingest_module, "MAX_LINE_BYTES", 200)
    store = open_store(tmp_path / "store.db")
    progress: list[int] = []
    try:
        result = ingest_stream(store, io.BytesIO(TRICKY), "t", CAT, on_progress=progress.append)
        assert (result.ingested, result.rejected) == (4, 2)
        big = len(TRICKY.split(b"\n")[4]) + 1
        assert [r.line for r in result.rejections] == [5, 6]
        assert result.rejections[0].reason.startswith(f"line is {big} bytes, over the 200")
        assert result.rejections[1].reason.startswith("not valid JSON")
        assert attrs_of(store, "p-1") == {"a": 1, "b": 2}
        assert sorted(store.load_profiles(["p-1", "p-2", "p-3", "p-big"])) == ["p-1", "p-2", "p-3"]
        assert sum(progress) == len(TRICKY) - len(b"\n" + b"   \n")
    finally:
        store.close()


def test_a_batch_is_cut_by_bytes_as_well_as_lines(db, monkeypatch) -> None:
    import tasks.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "BATCH_BYTES", 1000)
    line = orjson.dumps(frag("p", attributes={"pad": "z" * 300}))
    progress: list[int] = []
    result = ingest(db, [line] * 10, on_progress=progress.append)
    assert result.ingested == 10
    assert progress == [3 * (len(line) + 1)] * 3 + [len(line) + 1]  # 3 lines reach 1,000 bytes


@pytest.fixture(params=ENGINES)
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    """Every engine of the Store contract suite (``append_change_groups`` is a verb of it)."""
    store = make_store(request.param, tmp_path, request)
    yield store
    store.close()


def test_append_change_groups_is_one_transaction_taking_groups_in_turn(any_store) -> None:
    def fragment(pid: str, **attrs: Any) -> Fragment:
        return Fragment(pid, 7, attributes=attrs, paths=sorted(attrs),
                        segments={"seg-a": ("realized", T0)})

    taken: list[int] = []

    def groups(fail: bool) -> Any:
        for i, group in enumerate([[fragment("p-1", a=1), fragment("p-2", b=1)],
                                   [], [fragment("p-1", c=1)]]):
            taken.append(i)
            yield group
        if fail:
            raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        any_store.append_change_groups(groups(fail=True))
    assert any_store.head_seq() == 0 and any_store.load_profiles(["p-1", "p-2"]) == {}
    # the last seq written (PostgreSQL's sequence leaves the failed batch's seqs unused)
    last = any_store.append_change_groups(groups(fail=False))
    assert last == any_store.head_seq() and last >= 3
    assert taken == [0, 1, 2] * 2
    profiles = any_store.load_profiles(["p-1", "p-2"])
    assert profiles["p-1"].attributes == {"a": 1, "c": 1} and profiles["p-1"].last_seq == last
    assert profiles["p-2"].segments == {"seg-a": ("realized", T0)}
    assert [r[1] for r in any_store.read_changes(0, 10)] == ["p-1", "p-2", "p-1"]
    assert any_store.append_change_groups(iter([[], []])) == 0

"""Change detection and exports (SPEC "When a profile is exported to a dataflow", "What one
export contains", "Historical backfill"). Plain functions on a real SQLite file: ingest
NDJSON, run one dataflow pass (sync_mapping -> open backfills -> export_batch until None)
and look at what the outbox holds. No Prefect."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from tasks.export import export_batch, payload_spec, run_backfill, sync_mapping
from tasks.payload import Encoder, PayloadSpec, build_payload, encode, idempotency_key

import state.dataflows as flows_state
from config import Config, Segment, parse_config
from state import outbox
from state.dataflows import CursorMoved, Export
from state.db import now_ms, open_db
from state.profiles import load_profiles
from tasks.ingest import ingest_stream

FLOW = "crm-stream"
T0 = "2026-01-11T21:24:39Z"
ATTRIBUTES = ["person.name.firstName", "person.name.lastName", "personalEmail.address"]
CATALOGUE = [
    {"id": "seg-a", "name": "First name equals John", "createdAt": 1648553325000,
     "updatedAt": 1648553330000},
    {"id": "seg-b", "name": "Lives in Paris", "createdAt": 1648553400000},  # no updatedAt
    {"id": "seg-c"},  # neither name nor timestamps
]
SEG_IDS = frozenset(s["id"] for s in CATALOGUE)


# --- the harness -------------------------------------------------------------------------

def make_config(base: Path, segments: Iterable[str] = ("seg-a", "seg-b"),
                attributes: Iterable[str] = ATTRIBUTES, names: bool = False,
                timestamps: bool = False) -> Config:
    return parse_config({
        "state": "relay.db",
        "segments": CATALOGUE,
        "destinations": [{"name": "crm", "endpoint": "http://127.0.0.1:9/x",
                          "include_segment_names": names,
                          "include_segment_timestamps": timestamps}],
        "dataflows": [{"name": FLOW, "destination": "crm", "segments": list(segments),
                       "attributes": list(attributes)}],
    }, base_dir=base)


def frag(pid: str, attrs: dict | None = None, ids: dict | None = None,
         segs: dict[str, str] | None = None, ts: str = T0, lqt: str | None = None) -> dict:
    doc: dict[str, Any] = {"profileId": pid, "timestamp": ts}
    if attrs is not None:
        doc["attributes"] = attrs
    if ids is not None:
        doc["identityMap"] = ids
    if segs is not None:
        doc["segmentMembership"] = {"ups": {
            seg: {"status": status, **({"lastQualificationTime": lqt} if lqt else {})}
            for seg, status in segs.items()}}
    return doc


class Relay:
    """One store and one dataflow; ``run_pass`` returns what the pass queued and clears it."""

    def __init__(self, base: Path, **config: Any) -> None:
        self.base = base
        self.db = open_db(base / "relay.db")
        self.configure(**config)
        self.last: list[outbox.Pending] = []

    def configure(self, **config: Any) -> None:
        self.config = make_config(self.base, **config)
        self.flow = self.config.dataflow(FLOW)

    def ingest(self, *fragments: dict) -> None:
        data = b"".join(orjson.dumps(f) + b"\n" for f in fragments)
        result = ingest_stream(self.db, io.BytesIO(data), "src", SEG_IDS)
        assert result.rejected == 0, result.rejections

    def spec(self):
        return payload_spec(self.db, self.config, self.flow)

    def run_pass(self) -> dict[str, dict]:
        sync_mapping(self.db, self.config, self.flow)
        spec = self.spec()
        for job in flows_state.open_backfills(self.db, FLOW):
            run_backfill(self.db, self.flow, spec, job)
        while export_batch(self.db, self.flow, spec) is not None:
            pass
        return self.take()

    def pending(self) -> list[outbox.Pending]:
        return outbox.due(self.db, FLOW, now=2**62, limit=1_000_000)

    def take(self) -> dict[str, dict]:
        """The outbox's bodies by profile, then the outbox emptied (as delivered)."""
        self.last = self.pending()
        at = now_ms()
        outbox.record(self.db, FLOW, [outbox.Attempt(p, 200, None, at) for p in self.last], [], [])
        assert outbox.pending_count(self.db, FLOW) == 0
        bodies = {p.profile_id: orjson.loads(p.body) for p in self.last}
        assert len(bodies) == len(self.last)
        return bodies

    def cursor(self) -> int:
        return flows_state.cursor(self.db, FLOW)


@pytest.fixture
def relay(tmp_path: Path):
    """A dataflow that already exists (created on an empty store) before anything is ingested."""
    r = Relay(tmp_path)
    assert r.run_pass() == {}
    yield r
    r.db.conn.close()


def qualified(pid: str, seg: str = "seg-a", **attrs_kw: Any) -> dict:
    return frag(pid, attrs={"person": {"name": {"firstName": "John", "lastName": "Doe"}},
                            "personalEmail": {"address": f"{pid}@x.com"}},
                ids={"ecid": [{"id": f"e-{pid}"}]}, segs={seg: "realized"}, **attrs_kw)


# --- triggers: attributes ----------------------------------------------------------------

def test_mapped_attribute_rewritten_with_same_value_exports(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    assert set(relay.run_pass()) == {"p-1"}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "John"}}}))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["person"] == {"name": {"firstName": "John", "lastName": "Doe"}}
    assert relay.last[0].reason == "attribute"


def test_unmapped_attribute_write_does_not_export(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", attrs={"person": {"birthDate": "1980-01-01"},
                                    "mobilePhone": {"number": "+33 6"}}))
    assert relay.run_pass() == {}
    # siblings of a mapped leaf, and a prefix that is not a path boundary, are not mapped
    relay.ingest(frag("p-1", attrs={"person": {"name": {"middleName": "X"}},
                                    "personalEmailX": {"address": "no"}}))
    assert relay.run_pass() == {}


def test_write_under_a_mapped_path_exports(tmp_path: Path) -> None:
    relay = Relay(tmp_path, attributes=["person.name"])
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-a": "realized"}))
    assert set(relay.run_pass()) == {"p-1"}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Ann"}}}))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["person"] == {"name": {"firstName": "Ann"}}
    relay.ingest(frag("p-1", attrs={"person": {"gender": "f"}}))  # beside, not under
    assert relay.run_pass() == {}


def test_removing_a_mapped_attribute_exports_without_it(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": None}}}))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["person"] == {"name": {"lastName": "Doe"}}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"lastName": None}}}))
    got = relay.run_pass()
    assert "person" not in got["p-1"]  # pruned away entirely
    assert got["p-1"]["personalEmail"] == {"address": "p-1@x.com"}
    relay.ingest(frag("p-1", attrs={"personalEmail": None}))  # a parent of a mapped path
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert "personalEmail" not in got["p-1"]


# --- triggers: identities ----------------------------------------------------------------

def test_identity_added_exports(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", ids={"email": [{"id": "j@x.com"}]}))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["identityMap"] == {"ecid": [{"id": "e-p-1"}], "email": [{"id": "j@x.com"}]}
    assert relay.last[0].reason == "identity"


def test_known_identity_sent_again_does_not_export(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", ids={"ecid": [{"id": "e-p-1"}]}))
    assert relay.run_pass() == {}


# --- triggers: segment membership --------------------------------------------------------

def test_unmapped_segment_change_does_not_export_but_shows_next_time(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-c": "realized"}, ts="2026-01-12T08:00:00Z"))
    assert relay.run_pass() == {}
    relay.ingest(frag("p-1", segs={"seg-c": "exited"}, ts="2026-01-13T08:00:00Z"))
    assert relay.run_pass() == {}
    relay.ingest(frag("p-1", attrs={"personalEmail": {"address": "new@x.com"}}))
    got = relay.run_pass()
    assert got["p-1"]["segmentMembership"]["ups"]["seg-c"] == {
        "status": "exited", "lastQualificationTime": "2026-01-13T08:00:00Z"}


def test_realized_to_existing_does_not_export(relay: Relay) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"))
    assert set(relay.run_pass()) == {"p-1", "p-2"}
    relay.ingest(frag("p-1", segs={"seg-a": "existing"}),
                 frag("p-2", segs={"seg-b": "existing", "seg-a": "existing"}))
    got = relay.run_pass()
    assert set(got) == {"p-2"}  # p-2 gained seg-a; p-1 only went realized -> existing
    relay.ingest(frag("p-2", segs={"seg-a": "realized", "seg-b": "realized"}))
    assert relay.run_pass() == {}


def test_not_qualified_to_realized_exports(relay: Relay) -> None:
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Ann"}}}))
    assert relay.run_pass() == {}  # not a member of anything yet
    relay.ingest(frag("p-1", segs={"seg-b": "realized"}))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["segmentMembership"]["ups"]["seg-b"]["status"] == "realized"
    assert relay.last[0].reason == "segment"


def test_exit_exports_once_then_later_writes_do_not(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-a": "exited"}, ts="2026-01-12T00:00:00Z"))
    got = relay.run_pass()
    assert set(got) == {"p-1"}
    assert got["p-1"]["segmentMembership"]["ups"]["seg-a"] == {
        "status": "exited", "lastQualificationTime": "2026-01-12T00:00:00Z"}
    assert relay.run_pass() == {}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Jim"}}}),
                 frag("p-1", ids={"email": [{"id": "new@x.com"}]}),
                 frag("p-1", segs={"seg-a": "exited"}))
    assert relay.run_pass() == {}


def test_requalifying_after_exit_exports_again(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-a": "exited"}))
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-a": "realized"}, ts="2026-02-01T00:00:00Z"))
    got = relay.run_pass()
    assert got["p-1"]["segmentMembership"]["ups"]["seg-a"] == {
        "status": "realized", "lastQualificationTime": "2026-02-01T00:00:00Z"}


def test_exit_from_one_mapped_segment_while_still_in_another_exports(relay: Relay) -> None:
    relay.ingest(frag("p-1", segs={"seg-a": "realized", "seg-b": "realized"}))
    relay.run_pass()
    relay.ingest(frag("p-1", segs={"seg-b": "exited"}))
    got = relay.run_pass()
    assert got["p-1"]["segmentMembership"]["ups"]["seg-b"]["status"] == "exited"


def test_never_a_member_of_a_mapped_segment_never_exports(relay: Relay) -> None:
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Ann"}}},
                      ids={"ecid": [{"id": "1"}]}),
                 frag("p-1", segs={"seg-c": "realized"}),
                 frag("p-1", attrs={"personalEmail": {"address": "a@x.com"}}))
    assert relay.run_pass() == {}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Ann"}}}),
                 frag("p-1", ids={"email": [{"id": "a@x.com"}]}))
    assert relay.run_pass() == {}


def test_only_newly_qualified_members_are_exported(relay: Relay) -> None:
    old = [f"old-{i:03d}" for i in range(100)]
    relay.ingest(*(qualified(p) for p in old))
    assert set(relay.run_pass()) == set(old)
    new = [f"new-{i}" for i in range(5)]
    relay.ingest(*(frag(p, segs={"seg-a": "existing"}) for p in old[:50]),  # no flip
                 *(qualified(p) for p in new))
    got = relay.run_pass()
    assert set(got) == set(new)
    assert {p.reason for p in relay.last} == {"segment,identity,attribute"}


# --- coalescing and payloads -------------------------------------------------------------

def test_fragments_of_one_profile_in_a_batch_give_one_export_with_the_latest_state(
        relay: Relay) -> None:
    relay.ingest(
        frag("p-1", attrs={"person": {"name": {"firstName": "John"}}}, segs={"seg-a": "realized"}),
        frag("p-2", segs={"seg-a": "realized"}),
        frag("p-1", attrs={"person": {"name": {"lastName": "Doe"}}}),
        frag("p-1", ids={"ecid": [{"id": "1"}]}),
        frag("p-1", attrs={"person": {"name": {"firstName": "Jack"}}}),
        frag("p-1", attrs={"mobilePhone": {"number": "1"}}),  # unmapped, but the newest change
        frag("p-2", attrs={"person": {"name": {"firstName": "Zed"}}}),
    )
    got = relay.run_pass()
    assert set(got) == {"p-1", "p-2"}
    assert len(relay.last) == 2
    assert got["p-1"]["person"] == {"name": {"firstName": "Jack", "lastName": "Doe"}}
    assert got["p-1"]["identityMap"] == {"ecid": [{"id": "1"}]}
    newest = relay.db.conn.execute(
        "SELECT max(seq) FROM changes WHERE profile_id = 'p-1'").fetchone()[0]
    by_pid = {p.profile_id: p for p in relay.last}
    assert by_pid["p-1"].seq == newest
    assert by_pid["p-1"].idempotency_key == idempotency_key(FLOW, "p-1", newest,
                                                            by_pid["p-1"].body)
    assert by_pid["p-2"].seq == relay.cursor()


def test_newer_export_replaces_one_still_waiting(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    sync_mapping(relay.db, relay.config, relay.flow)
    export_batch(relay.db, relay.flow, relay.spec())
    first = relay.pending()
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Jo"}}}))
    export_batch(relay.db, relay.flow, relay.spec())
    second = relay.pending()
    assert len(first) == len(second) == 1
    assert second[0].seq > first[0].seq
    assert orjson.loads(second[0].body)["person"]["name"]["firstName"] == "Jo"


RICH = frag(
    "p-1", ts="2026-01-11T23:24:39+02:00",
    attrs={"person": {"name": {"firstName": "John", "lastName": "Doe"}, "birthDate": "1980-01-01"},
           "personalEmail": {"address": "john@x.com", "type": "home"},
           "mobilePhone": {"number": "+33 6 00"}},
    ids={"ecid": [{"id": "1457500653634928"}], "email": [{"id": "john@x.com", "primary": True}]},
    segs={"seg-a": "realized", "seg-c": "existing"},
)


@pytest.mark.parametrize(("names", "timestamps"),
                         [(False, False), (True, False), (False, True), (True, True)])
def test_payload_content(tmp_path: Path, names: bool, timestamps: bool) -> None:
    relay = Relay(tmp_path, names=names, timestamps=timestamps)
    relay.run_pass()
    relay.ingest(RICH, frag("p-1", ids={"crm": [{"id": "c-9"}]}),
                 frag("p-1", segs={"seg-b": "exited"}, lqt="2026-01-10T19:00:00-05:00"))
    got = relay.run_pass()
    times = flows_state.mapping_times(relay.db, FLOW)
    assert set(times) == {"seg-a", "seg-b"}

    ups: dict[str, dict[str, Any]] = {
        "seg-a": {"status": "realized", "lastQualificationTime": "2026-01-11T21:24:39Z"},
        "seg-b": {"status": "exited", "lastQualificationTime": "2026-01-11T00:00:00Z"},
        "seg-c": {"status": "existing", "lastQualificationTime": "2026-01-11T21:24:39Z"},
    }
    if names:
        ups["seg-a"]["name"] = "First name equals John"
        ups["seg-b"]["name"] = "Lives in Paris"
    if timestamps:
        ups["seg-a"].update(createdAt=1648553325000, updatedAt=1648553330000,
                            mappingCreatedAt=times["seg-a"][0], mappingUpdatedAt=times["seg-a"][1])
        ups["seg-b"].update(createdAt=1648553400000,
                            mappingCreatedAt=times["seg-b"][0], mappingUpdatedAt=times["seg-b"][1])
    assert got == {"p-1": {
        "person": {"name": {"firstName": "John", "lastName": "Doe"}},
        "personalEmail": {"address": "john@x.com"},
        "segmentMembership": {"ups": ups},
        "identityMap": {"ecid": [{"id": "1457500653634928"}],
                        "email": [{"id": "john@x.com", "primary": True}],
                        "crm": [{"id": "c-9"}]},
    }}
    for entry in got["p-1"]["segmentMembership"]["ups"].values():
        for key in ("createdAt", "updatedAt", "mappingCreatedAt", "mappingUpdatedAt"):
            if key in entry:
                assert type(entry[key]) is int
                assert entry[key] > 1_600_000_000_000


ODD_SEGMENTS = ["seg-a", "sé\"g/\\1", "z\t\u2603", "seg-\U0001f600"]


@pytest.mark.parametrize("attributes", [
    ATTRIBUTES,
    ["person.name", "person.name.firstName", "tags", "personalEmail.address", "person.birthDate"],
    [],
])
@pytest.mark.parametrize(("names", "timestamps"), [(False, False), (True, True)])
def test_export_encoder_gives_the_same_document_as_build_payload(
        tmp_path: Path, attributes: list[str], names: bool, timestamps: bool) -> None:
    """The export path (Encoder on raw rows) and the generic one (build_payload on loaded
    profiles, used by replay and test-send) must agree on every profile."""
    db = open_db(tmp_path / "relay.db")
    lines = [
        frag("p-1", attrs={"person": {"name": {"firstName": "Zoë", "lastName": "D"},
                                      "birthDate": "1980"}, "tags": ["a", {"b": None}],
                           "personalEmail": {"address": "x@y"}},
             ids={"ecid": [{"id": "1"}], "email": [{"id": "z@x", "primary": True}]},
             segs={s: "realized" for s in ODD_SEGMENTS}),
        frag("p-2", attrs={"person": "not an object", "personalEmail": {"type": "home"}},
             segs={"seg-a": "exited"}),
        frag("p-3", ids={"ecid": [{"id": "3"}]}),
        frag("p-4", attrs={"personalEmail": {"address": "only@x"}, "person": {"gender": "f"}},
             segs={ODD_SEGMENTS[2]: "existing"}, lqt="2026-01-10T19:00:00-05:00"),
    ]
    ingest_stream(db, io.BytesIO(b"".join(orjson.dumps(f) + b"\n" for f in lines)), "src",
                  frozenset(ODD_SEGMENTS))
    db.conn.execute("INSERT INTO profile_segments VALUES ('p-3', 'seg-a', 'existing', NULL)")
    spec = PayloadSpec(
        attribute_paths=tuple(tuple(p.split(".")) for p in attributes),
        include_names=names, include_timestamps=timestamps,
        catalogue={"seg-a": Segment(id="seg-a", name="A", createdAt=1, updatedAt=2),
                   ODD_SEGMENTS[1]: Segment(id=ODD_SEGMENTS[1], name="n\"ame\u00e9"),
                   ODD_SEGMENTS[2]: Segment(id=ODD_SEGMENTS[2], updatedAt=5)},
        mapping_times={"seg-a": (10, 20), ODD_SEGMENTS[3]: (30, 40)})
    pids = ["p-1", "p-2", "p-3", "p-4", "p-missing"]
    encoder = Encoder(spec)
    mapped = ["seg-a", ODD_SEGMENTS[2]]
    rows = flows_state.payload_rows(db, pids, encoder.segment_tails, mapped)
    assert [r[0] for r in rows] == pids[:4]
    profiles = load_profiles(db, pids)
    for pid, attrs, idmap, last_seq, ups, qualified in rows:
        assert last_seq == profiles[pid].last_seq
        assert sorted(qualified.split("\n") if qualified else []) == sorted(
            s for s, (status, _) in profiles[pid].segments.items()
            if s in mapped and status != "exited")
        fast = encoder.body(attrs, idmap, ups)
        assert orjson.loads(fast) == build_payload(profiles[pid], spec)
        if attributes == ATTRIBUTES:  # keys in the same order too
            assert fast == encode(build_payload(profiles[pid], spec))
    db.conn.close()


# --- backfill ----------------------------------------------------------------------------

def test_new_dataflow_gets_earlier_profiles_through_backfill_exactly_once(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    relay.ingest(qualified("p-a"), qualified("p-b", seg="seg-b"),
                 frag("p-ab", segs={"seg-a": "existing", "seg-b": "realized"}),
                 frag("p-c", attrs={"person": {"name": {"firstName": "C"}}}, segs={"seg-c": "realized"}),
                 frag("p-x", segs={"seg-a": "realized"}), frag("p-x", segs={"seg-a": "exited"}),
                 frag("p-none", attrs={"person": {"name": {"firstName": "N"}}}),
                 frag("p-a", attrs={"person": {"name": {"firstName": "Johnny"}}}))
    head = flows_state.max_seq(relay.db)
    got = relay.run_pass()
    assert set(got) == {"p-a", "p-b", "p-ab"}
    assert {p.reason for p in relay.last} == {"backfill"}
    assert got["p-a"]["person"]["name"]["firstName"] == "Johnny"
    last_seq = dict(relay.db.conn.execute("SELECT profile_id, last_seq FROM profiles"))
    assert all(p.seq == last_seq[p.profile_id] for p in relay.last)
    assert relay.cursor() == head  # streaming starts after what the backfill covers
    assert flows_state.open_backfills(relay.db, FLOW) == []
    assert relay.run_pass() == {}  # and no streaming export of the same changes follows
    relay.ingest(frag("p-ab", attrs={"personalEmail": {"address": "ab@x.com"}}))
    assert set(relay.run_pass()) == {"p-ab"}


def test_newly_mapped_segment_is_backfilled_with_its_mapping_time(tmp_path: Path) -> None:
    relay = Relay(tmp_path, segments=["seg-a"], timestamps=True)
    relay.run_pass()
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"),
                 frag("p-3", segs={"seg-a": "realized", "seg-b": "existing"}),
                 frag("p-4", segs={"seg-b": "realized"}), frag("p-4", segs={"seg-b": "exited"}),
                 frag("p-5", segs={"seg-c": "realized"}))
    assert set(relay.run_pass()) == {"p-1", "p-3"}
    streamed_key = {p.profile_id: p.idempotency_key for p in relay.last}["p-3"]
    created_a = flows_state.mapping_times(relay.db, FLOW)["seg-a"][0]
    time.sleep(0.005)

    relay.configure(segments=["seg-a", "seg-b"], timestamps=True)
    before = now_ms()
    got = relay.run_pass()
    after = now_ms()
    assert set(got) == {"p-2", "p-3"}  # exactly the profiles qualified for seg-b
    assert {p.reason for p in relay.last} == {"backfill"}
    times = flows_state.mapping_times(relay.db, FLOW)
    assert before <= times["seg-b"][0] <= after
    assert times["seg-a"][0] == created_a
    assert got["p-2"]["segmentMembership"]["ups"]["seg-b"]["mappingCreatedAt"] == times["seg-b"][0]
    # p-3's state is the one streamed before, but the content is new (seg-b's mapping
    # times): its own key, so a receiver dropping duplicate keys keeps it
    assert {p.profile_id: p.idempotency_key for p in relay.last}["p-3"] != streamed_key
    assert relay.run_pass() == {}
    relay.ingest(frag("p-2", attrs={"person": {"name": {"lastName": "X"}}}))  # now streamed
    assert set(relay.run_pass()) == {"p-2"}


def test_streaming_does_not_repeat_what_a_backfill_already_exported(tmp_path: Path) -> None:
    """The cursor lags (a backlog) when a segment is newly mapped: the backfill exports the
    current state; the older changes streamed afterwards must not export it again, neither
    under the same sequence nor, worse, under an older one after the newer was sent."""
    relay = Relay(tmp_path, segments=["seg-a"])
    relay.run_pass()
    relay.ingest(qualified("p-1", seg="seg-b"))                                 # not mapped yet
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Jo"}}}))  # backlog
    relay.ingest(qualified("p-2"))                                              # backlog, seg-a
    relay.configure(segments=["seg-a", "seg-b"])
    sync_mapping(relay.db, relay.config, relay.flow)
    spec = relay.spec()
    for job in flows_state.open_backfills(relay.db, FLOW):
        run_backfill(relay.db, relay.flow, spec, job)
    backfilled = relay.take()
    assert set(backfilled) == {"p-1"}
    while export_batch(relay.db, relay.flow, spec, limit=1) is not None:
        pass
    assert set(relay.take()) == {"p-2"}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"lastName": "X"}}}))
    assert set(relay.run_pass()) == {"p-1"}  # a change after the backfill still streams


def test_changing_the_attributes_bumps_mapping_updated_at_only(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    relay.run_pass()
    first = flows_state.mapping_times(relay.db, FLOW)
    assert all(created == updated for created, updated in first.values())
    time.sleep(0.005)
    relay.configure(attributes=[*ATTRIBUTES, "person.birthDate"])
    before = now_ms()
    relay.run_pass()
    second = flows_state.mapping_times(relay.db, FLOW)
    for seg, (created, updated) in second.items():
        assert created == first[seg][0]
        assert updated >= before > first[seg][1]
    relay.run_pass()  # the same mapping again: nothing moves
    assert flows_state.mapping_times(relay.db, FLOW) == second
    assert flows_state.open_backfills(relay.db, FLOW) == []


def test_backfill_by_hand_for_one_segment(relay: Relay) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"),
                 frag("p-3", segs={"seg-a": "existing", "seg-b": "existing"}),
                 frag("p-4", segs={"seg-b": "exited"}), frag("p-5", segs={"seg-c": "realized"}))
    relay.run_pass()
    job_id = flows_state.start_backfill(relay.db, FLOW, "seg-b", "by hand")
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    assert (job.id, job.segment_id) == (job_id, "seg-b")
    assert run_backfill(relay.db, relay.flow, relay.spec(), job) == 2
    assert flows_state.open_backfills(relay.db, FLOW) == []
    keys = {p.profile_id: p.idempotency_key for p in relay.pending()}
    assert set(relay.take()) == {"p-2", "p-3"}
    # the same state backfilled again carries the same idempotency keys
    flows_state.start_backfill(relay.db, FLOW, "seg-b", "by hand")
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    run_backfill(relay.db, relay.flow, relay.spec(), job)
    assert {p.profile_id: p.idempotency_key for p in relay.pending()} == keys


def test_interrupted_backfill_resumes_where_it_stopped(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    members = [f"p-{i:02d}" for i in range(35)]
    relay.ingest(*(qualified(p, seg="seg-a" if i % 2 else "seg-b") for i, p in enumerate(members)),
                 frag("out-1", segs={"seg-c": "realized"}))
    sync_mapping(relay.db, relay.config, relay.flow)
    spec = relay.spec()
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    assert job.segment_id is None

    calls: list[tuple[int, int]] = []

    def crash(done: int, total: int) -> None:
        calls.append((done, total))
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_backfill(relay.db, relay.flow, spec, job, chunk=10, on_progress=crash)
    assert calls == [(10, 35)]
    first = relay.take()
    assert set(first) == set(members[:10])
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    assert (job.done, job.after_profile, job.total) == (10, members[9], 35)

    progress: list[tuple[int, int]] = []
    assert run_backfill(relay.db, relay.flow, spec, job, chunk=10,
                        on_progress=lambda d, t: progress.append((d, t))) == 25
    assert progress == [(20, 35), (30, 35), (35, 35)]
    rest = relay.pending()
    assert sorted(p.profile_id for p in rest) == members[10:]
    assert len({p.idempotency_key for p in rest}) == 25
    relay.take()
    assert flows_state.open_backfills(relay.db, FLOW) == []
    assert relay.run_pass() == {}


# --- crashes and concurrency -------------------------------------------------------------

def test_crash_between_detection_and_outbox_write(relay: Relay,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"),
                 frag("p-3", attrs={"person": {"name": {"firstName": "N"}}}))
    start = relay.cursor()
    real = flows_state.queue_exports
    failures = []

    def crash_once(*args: Any, **kwargs: Any) -> None:
        if not failures:
            failures.append(1)
            raise OSError("disk gone")
        real(*args, **kwargs)

    monkeypatch.setattr(flows_state, "queue_exports", crash_once)
    with pytest.raises(OSError):
        relay.run_pass()
    assert relay.cursor() == start
    assert relay.pending() == []
    assert relay.db.conn.execute("SELECT count(*) FROM dataflow_profiles").fetchone()[0] == 0
    got = relay.run_pass()
    assert set(got) == {"p-1", "p-2"}
    assert len(relay.last) == 2
    assert relay.cursor() == flows_state.max_seq(relay.db)
    assert relay.run_pass() == {}


def test_crash_during_a_backfill_chunk_loses_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    relay = Relay(tmp_path)
    members = [f"p-{i:02d}" for i in range(12)]
    relay.ingest(*(qualified(p) for p in members))
    real = flows_state.queue_exports
    seen = []

    def crash_second(*args: Any, **kwargs: Any) -> None:
        seen.append(1)
        if len(seen) == 2:
            raise OSError("disk gone")
        real(*args, **kwargs)

    monkeypatch.setattr(flows_state, "queue_exports", crash_second)
    sync_mapping(relay.db, relay.config, relay.flow)
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    with pytest.raises(OSError):
        run_backfill(relay.db, relay.flow, relay.spec(), job, chunk=5)
    assert set(relay.take()) == set(members[:5])
    (job,) = flows_state.open_backfills(relay.db, FLOW)
    run_backfill(relay.db, relay.flow, relay.spec(), job, chunk=5)
    assert set(relay.take()) == set(members[5:])


def test_stale_cursor_raises_cursor_moved_and_writes_nothing(relay: Relay) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2"))
    stale = relay.cursor()
    spec = relay.spec()
    assert export_batch(relay.db, relay.flow, spec) is not None  # decider A wins
    done = relay.pending()
    assert len(done) == 2
    head = relay.cursor()
    late = Export("p-1", head, "attribute", now_ms(),
                  idempotency_key(FLOW, "p-1", head, b'{"late":true}'), b'{"late":true}', "seg-a")
    with pytest.raises(CursorMoved):  # decider B read the same batch
        flows_state.queue_exports(relay.db, FLOW, [late], [("p-2", "")],
                                  cursor_from=stale, cursor_to=head)
    assert relay.cursor() == head
    assert relay.pending() == done
    assert dict(relay.db.conn.execute(
        "SELECT profile_id, qualified FROM dataflow_profiles")) == {"p-1": "seg-a", "p-2": "seg-a"}


def test_export_batch_losing_the_race_queues_nothing(relay: Relay,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Decider B reads the batch; decider A (another connection) decides and queues the same
    batch before B writes. B must raise CursorMoved and queue nothing."""
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"))
    other = open_db(relay.base / "relay.db")
    real = flows_state.read_changes
    raced: list[int] = []

    def read_then_lose_the_race(db, after, limit):
        rows = real(db, after, limit)
        if not raced:
            raced.append(1)
            assert export_batch(other, relay.flow, relay.spec()) is not None  # decider A
        return rows

    monkeypatch.setattr(flows_state, "read_changes", read_then_lose_the_race)
    with pytest.raises(CursorMoved):
        export_batch(relay.db, relay.flow, relay.spec())  # decider B
    won = relay.pending()
    assert sorted(p.profile_id for p in won) == ["p-1", "p-2"]
    assert relay.cursor() == flows_state.max_seq(relay.db)
    assert export_batch(relay.db, relay.flow, relay.spec()) is None
    assert relay.pending() == won
    other.conn.close()


def test_idempotency_keys_are_stable_per_export() -> None:
    body = b'{"a":1}'
    key = idempotency_key(FLOW, "p-1", 7, body)
    assert key == idempotency_key(FLOW, "p-1", 7, body)
    others = {idempotency_key(FLOW, "p-1", 8, body), idempotency_key(FLOW, "p-2", 7, body),
              idempotency_key("other", "p-1", 7, body), idempotency_key(FLOW, "p-17", 0, body),
              idempotency_key(FLOW + "\0p-1", "", 7, body),
              idempotency_key(FLOW, "p-1", 7, b'{"a":2}')}  # same state, other content
    assert key not in others and len(others) == 6
    assert [len(part) for part in key.split("-")] == [8, 4, 4, 4, 12]

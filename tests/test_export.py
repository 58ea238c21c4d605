"""Change detection and exports (the README's "When a profile is exported", "What an export
contains", "Backfill"). The pipeline's plain functions on a real SQLite store: ingest
NDJSON, run one dataflow's decide pass (sync -> open backfills -> decide_batch until None)
and look at what the outbox holds, rendered by the body builder. No Prefect."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

import state.dataflows as flows_state
from config import Config, Segment, parse_config
from state import CursorMoved, open_store
from state.db import now_ms
from state.model import Attempt, Export
from tasks import pipeline
from tasks.body import BodySpec, document, idempotency_key, render
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


@dataclass(frozen=True)
class Sent:
    """A queued export as a sender would send it now."""

    profile_id: str
    seq: int
    reason: str
    idempotency_key: str
    sent_seq: int
    body: dict[str, Any]


class Relay:
    """One store and one dataflow; ``run_pass`` returns what the pass queued and clears it."""

    def __init__(self, base: Path, **config: Any) -> None:
        self.base = base
        self.store = open_store(base / "relay.db")
        self.db = self.store.db
        self.configure(**config)
        self.last: list[Sent] = []

    def configure(self, **config: Any) -> None:
        self.config = make_config(self.base, **config)
        self.flow = self.config.dataflow(FLOW)

    def ingest(self, *fragments: dict) -> None:
        data = b"".join(orjson.dumps(f) + b"\n" for f in fragments)
        result = ingest_stream(self.store, io.BytesIO(data), "src", SEG_IDS)
        assert result.rejected == 0, result.rejections

    def spec(self) -> BodySpec:
        return pipeline.body_spec(self.store, self.config, self.flow)

    def sync(self) -> None:
        pipeline.sync(self.store, self.config, self.flow)

    def run_pass(self) -> dict[str, dict]:
        pipeline.decide_pass(self.store, self.config, self.flow, pipeline.PassResult())
        return self.take()

    def pending(self) -> list[Sent]:
        items = self.store.claim_due(FLOW, now=2**62, limit=1_000_000)
        profiles = self.store.load_profiles([p.profile_id for p in items])
        spec = self.spec()
        return [Sent(p.profile_id, p.seq, p.reason,
                     idempotency_key(spec, p.profile_id, profiles[p.profile_id].last_seq),
                     profiles[p.profile_id].last_seq,
                     orjson.loads(render(profiles[p.profile_id], spec))) for p in items]

    def take(self) -> dict[str, dict]:
        """The outbox's bodies by profile, then the outbox emptied (as delivered)."""
        items = self.store.claim_due(FLOW, now=2**62, limit=1_000_000)
        self.last = self.pending()
        at = now_ms()
        self.store.record_outcomes(FLOW, [Attempt(p, s.sent_seq, s.idempotency_key, 200, None, at)
                                          for p, s in zip(items, self.last, strict=True)], [], [])
        assert self.store.pending_count(FLOW) == 0
        bodies = {p.profile_id: p.body for p in self.last}
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
    r.store.close()


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
    assert by_pid["p-1"].idempotency_key == idempotency_key(relay.spec(), "p-1", newest)
    assert by_pid["p-2"].seq == relay.cursor()


def test_newer_export_replaces_one_still_waiting(relay: Relay) -> None:
    relay.ingest(qualified("p-1"))
    relay.sync()
    pipeline.decide_batch(relay.store, relay.flow)
    first = relay.pending()
    relay.ingest(frag("p-1", attrs={"person": {"name": {"firstName": "Jo"}}}))
    pipeline.decide_batch(relay.store, relay.flow)
    second = relay.pending()
    assert len(first) == len(second) == 1
    assert second[0].seq > first[0].seq
    assert second[0].body["person"]["name"]["firstName"] == "Jo"


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
    times = relay.store.mapping_times(FLOW)
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
def test_bodies_and_backfill_rows_for_odd_profiles(
        tmp_path: Path, attributes: list[str], names: bool, timestamps: bool) -> None:
    """Odd segment ids, non-object attributes and profiles without segments render as the
    seed's object, keys in its order; a backfill reads the same state it will send."""
    store = open_store(tmp_path / "relay.db")
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
    ingest_stream(store, io.BytesIO(b"".join(orjson.dumps(f) + b"\n" for f in lines)), "src",
                  frozenset(ODD_SEGMENTS))
    store.db.conn.execute("INSERT INTO profile_segments VALUES ('p-3', 'seg-a', 'existing', NULL)")
    spec = BodySpec(
        dataflow=FLOW, attribute_paths=tuple(tuple(p.split(".")) for p in attributes),
        include_names=names, include_timestamps=timestamps,
        catalogue={"seg-a": Segment(id="seg-a", name="A", createdAt=1, updatedAt=2),
                   ODD_SEGMENTS[1]: Segment(id=ODD_SEGMENTS[1], name="n\"ame\u00e9"),
                   ODD_SEGMENTS[2]: Segment(id=ODD_SEGMENTS[2], updatedAt=5)},
        mapping_times={"seg-a": (10, 20), ODD_SEGMENTS[3]: (30, 40)})
    pids = ["p-1", "p-2", "p-3", "p-4", "p-missing"]
    mapped = ["seg-a", ODD_SEGMENTS[2]]
    rows = store.backfill_rows(pids, mapped)
    assert [r[0] for r in rows] == pids[:4]
    profiles = store.load_profiles(pids)
    for pid, last_seq, qualified in rows:
        profile = profiles[pid]
        assert last_seq == profile.last_seq
        assert (qualified.split("\n") if qualified else []) == sorted(
            s for s, (status, _) in profile.segments.items()
            if s in mapped and status != "exited")
        body = orjson.loads(render(profile, spec))
        assert body == document(profile, spec)
        assert list(body)[-2:] == ["segmentMembership", "identityMap"]
        assert list(body["segmentMembership"]["ups"]) == sorted(profile.segments)
        assert body["identityMap"] == profile.identity_map
        for seg, entry in body["segmentMembership"]["ups"].items():
            assert entry["status"] == profile.segments[seg][0]
            assert ("name" in entry) == (names and seg in ("seg-a", ODD_SEGMENTS[1]))
            assert ("mappingCreatedAt" in entry) == (timestamps and seg in ("seg-a", ODD_SEGMENTS[3]))
    assert orjson.loads(render(profiles["p-1"], spec)).get("tags") == (
        ["a", {"b": None}] if "tags" in attributes else None)
    store.close()


# --- backfill ----------------------------------------------------------------------------

def test_new_dataflow_gets_earlier_profiles_through_backfill_exactly_once(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    relay.ingest(qualified("p-a"), qualified("p-b", seg="seg-b"),
                 frag("p-ab", segs={"seg-a": "existing", "seg-b": "realized"}),
                 frag("p-c", attrs={"person": {"name": {"firstName": "C"}}}, segs={"seg-c": "realized"}),
                 frag("p-x", segs={"seg-a": "realized"}), frag("p-x", segs={"seg-a": "exited"}),
                 frag("p-none", attrs={"person": {"name": {"firstName": "N"}}}),
                 frag("p-a", attrs={"person": {"name": {"firstName": "Johnny"}}}))
    head = relay.store.head_seq()
    got = relay.run_pass()
    assert set(got) == {"p-a", "p-b", "p-ab"}
    assert {p.reason for p in relay.last} == {"backfill"}
    assert got["p-a"]["person"]["name"]["firstName"] == "Johnny"
    last_seq = dict(relay.db.conn.execute("SELECT profile_id, last_seq FROM profiles"))
    assert all(p.seq == last_seq[p.profile_id] for p in relay.last)
    assert relay.cursor() == head  # streaming starts after what the backfill covers
    assert relay.store.open_backfills(FLOW) == []
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
    created_a = relay.store.mapping_times(FLOW)["seg-a"][0]
    time.sleep(0.005)

    relay.configure(segments=["seg-a", "seg-b"], timestamps=True)
    before = now_ms()
    got = relay.run_pass()
    after = now_ms()
    assert set(got) == {"p-2", "p-3"}  # exactly the profiles qualified for seg-b
    assert {p.reason for p in relay.last} == {"backfill"}
    times = relay.store.mapping_times(FLOW)
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
    relay.sync()
    for job in relay.store.open_backfills(FLOW):
        pipeline.backfill(relay.store, relay.flow, job)
    backfilled = relay.take()
    assert set(backfilled) == {"p-1"}
    while pipeline.decide_batch(relay.store, relay.flow, limit=1) is not None:
        pass
    assert set(relay.take()) == {"p-2"}
    relay.ingest(frag("p-1", attrs={"person": {"name": {"lastName": "X"}}}))
    assert set(relay.run_pass()) == {"p-1"}  # a change after the backfill still streams


def test_changing_the_attributes_bumps_mapping_updated_at_only(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    relay.run_pass()
    first = relay.store.mapping_times(FLOW)
    assert all(created == updated for created, updated in first.values())
    time.sleep(0.005)
    relay.configure(attributes=[*ATTRIBUTES, "person.birthDate"])
    before = now_ms()
    relay.run_pass()
    second = relay.store.mapping_times(FLOW)
    for seg, (created, updated) in second.items():
        assert created == first[seg][0]
        assert updated >= before > first[seg][1]
    relay.run_pass()  # the same mapping again: nothing moves
    assert relay.store.mapping_times(FLOW) == second
    assert relay.store.open_backfills(FLOW) == []


def test_backfill_by_hand_for_one_segment(relay: Relay) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2", seg="seg-b"),
                 frag("p-3", segs={"seg-a": "existing", "seg-b": "existing"}),
                 frag("p-4", segs={"seg-b": "exited"}), frag("p-5", segs={"seg-c": "realized"}))
    relay.run_pass()
    job_id = relay.store.start_backfill(FLOW, "seg-b", "by hand")
    (job,) = relay.store.open_backfills(FLOW)
    assert (job.id, job.segment_id) == (job_id, "seg-b")
    assert pipeline.backfill(relay.store, relay.flow, job) == 2
    assert relay.store.open_backfills(FLOW) == []
    keys = {p.profile_id: p.idempotency_key for p in relay.pending()}
    assert set(relay.take()) == {"p-2", "p-3"}
    # the same state backfilled again carries the same idempotency keys
    relay.store.start_backfill(FLOW, "seg-b", "by hand")
    (job,) = relay.store.open_backfills(FLOW)
    pipeline.backfill(relay.store, relay.flow, job)
    assert {p.profile_id: p.idempotency_key for p in relay.pending()} == keys


def test_interrupted_backfill_resumes_where_it_stopped(tmp_path: Path) -> None:
    relay = Relay(tmp_path)
    members = [f"p-{i:02d}" for i in range(35)]
    relay.ingest(*(qualified(p, seg="seg-a" if i % 2 else "seg-b") for i, p in enumerate(members)),
                 frag("out-1", segs={"seg-c": "realized"}))
    relay.sync()
    (job,) = relay.store.open_backfills(FLOW)
    assert job.segment_id is None

    calls: list[tuple[int, int]] = []

    def crash(done: int, total: int) -> None:
        calls.append((done, total))
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        pipeline.backfill(relay.store, relay.flow, job, chunk=10, on_progress=crash)
    assert calls == [(10, 35)]
    first = relay.take()
    assert set(first) == set(members[:10])
    (job,) = relay.store.open_backfills(FLOW)
    assert (job.done, job.after_profile, job.total) == (10, members[9], 35)

    progress: list[tuple[int, int]] = []
    assert pipeline.backfill(relay.store, relay.flow, job, chunk=10,
                        on_progress=lambda d, t: progress.append((d, t))) == 25
    assert progress == [(20, 35), (30, 35), (35, 35)]
    rest = relay.pending()
    assert sorted(p.profile_id for p in rest) == members[10:]
    assert len({p.idempotency_key for p in rest}) == 25
    relay.take()
    assert relay.store.open_backfills(FLOW) == []
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
    assert relay.cursor() == relay.store.head_seq()
    assert relay.run_pass() == {}


def test_crash_during_a_backfill_chunk_loses_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    relay = Relay(tmp_path)
    members = [f"p-{i:02d}" for i in range(12)]
    relay.ingest(*(qualified(p) for p in members))
    real = flows_state.queue_backfill  # one chunk, one transaction
    seen = []

    def crash_second(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        if len(seen) == 2:
            raise OSError("disk gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(flows_state, "queue_backfill", crash_second)
    relay.sync()
    (job,) = relay.store.open_backfills(FLOW)
    with pytest.raises(OSError):
        pipeline.backfill(relay.store, relay.flow, job, chunk=5)
    assert set(relay.take()) == set(members[:5])
    (job,) = relay.store.open_backfills(FLOW)
    pipeline.backfill(relay.store, relay.flow, job, chunk=5)
    assert set(relay.take()) == set(members[5:])


def test_stale_cursor_raises_cursor_moved_and_writes_nothing(relay: Relay) -> None:
    relay.ingest(qualified("p-1"), qualified("p-2"))
    stale = relay.cursor()
    assert pipeline.decide_batch(relay.store, relay.flow) is not None  # decider A wins
    done = relay.pending()
    assert len(done) == 2
    head = relay.cursor()
    late = Export("p-1", head, "attribute", now_ms(), "seg-a")
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
    other = open_store(relay.base / "relay.db")
    real = flows_state.read_changes
    raced: list[int] = []

    def read_then_lose_the_race(db, after, limit):
        rows = real(db, after, limit)
        if not raced:
            raced.append(1)
            assert pipeline.decide_batch(other, relay.flow) is not None  # decider A
        return rows

    monkeypatch.setattr(flows_state, "read_changes", read_then_lose_the_race)
    with pytest.raises(CursorMoved):
        pipeline.decide_batch(relay.store, relay.flow)  # decider B
    won = relay.pending()
    assert sorted(p.profile_id for p in won) == ["p-1", "p-2"]
    assert relay.cursor() == relay.store.head_seq()
    assert pipeline.decide_batch(relay.store, relay.flow) is None
    assert relay.pending() == won
    other.close()


def test_idempotency_keys_identify_the_state_sent() -> None:
    def spec(dataflow: str = FLOW, times: tuple[int, int] = (1, 2)) -> BodySpec:
        return BodySpec(dataflow=dataflow, attribute_paths=(("a",),), include_names=False,
                        include_timestamps=True, catalogue={}, mapping_times={"seg-a": times})

    key = idempotency_key(spec(), "p-1", 7)
    assert key == idempotency_key(spec(), "p-1", 7)  # the same state: the same key
    others = {idempotency_key(spec(), "p-1", 8), idempotency_key(spec(), "p-2", 7),
              idempotency_key(spec("other"), "p-1", 7), idempotency_key(spec(), "p-17", 0),
              idempotency_key(spec(FLOW + "\0p-1"), "", 7),
              idempotency_key(spec(times=(1, 3)), "p-1", 7)}  # same state, other content
    assert key not in others and len(others) == 6
    assert [len(part) for part in key.split("-")] == [8, 4, 4, 4, 12]

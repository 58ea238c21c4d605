"""Change detection and backfill throughput, against a baseline measured in the same run.

    .venv/bin/python bench/diff.py [--profiles N] [--batch N] [--db PATH] [--profile]

1. Builds a store of N profiles (11 attribute leaves, 2 identities, 5 segment memberships
   each; seg-00 qualified for ~98 % of them) by writing rows straight into the schema of
   state/schema.py (the file is created with open_db, so the migrations run first), and
   registers a dataflow mapping seg-00 and seg-01 with ``tasks.pipeline.sync``.
2. (c) runs that new dataflow's initial backfill with ``tasks.pipeline.backfill``: every
   qualified profile into the outbox (as a reference: bodies are rendered at send time),
   a chunk per set-based transaction -> profiles/s. This also leaves the dataflow's
   snapshots as a running dataflow has them. The outbox is then emptied (as if
   delivered). (d) BASELINE for (c): the same backfill for a second dataflow on the same
   store, each chunk's profiles passed through Python (``qualified_after``,
   ``backfill_rows``, ``enqueue_exports``: the way until 2026-12-03); it must leave the
   same snapshots, and is dropped afterwards.
3. Appends a micro-batch of --batch fragments through tasks.ingest.ingest_stream: mapped
   attribute writes (some with the same value), unmapped writes, identity adds, mapped
   membership flips and unmapped segment changes, on random profiles.
4. (a) BASELINE: only reading the rows that micro-batch touches out of SQLite into Polars
   (the change rows after the cursor and those profiles' rows, memberships included, as
   pl.DataFrames). (b) OURS: ``tasks.pipeline.decide_batch`` from
   the micro-batch to exports in the outbox (detection, snapshots and the cursor, one
   transaction; the outbox holds references, so no body is built here).

Targets: micro-batch <= 0.5 s, backfill >= 100,000 profiles/s, peak RSS <= 2 GiB.
--profile prints where the time of (b) and (c) goes (cProfile, top functions).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import orjson
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import parse_config
from state import Store, open_store
from state.db import now_ms, open_db, shard_of, write_txn
from state.model import Backfill, Export
from state.profiles import qualified_of
from tasks import pipeline
from tasks.ingest import ingest_stream

FLOW = "bench-flow"
REF_FLOW = "bench-flow-per-profile"
REF_CHUNK = 5_000  # the chunk of the per-profile backfill
SEGMENTS = [f"seg-{i:02d}" for i in range(10)]
MAPPED = ["seg-00", "seg-01"]
ATTRIBUTES = ["person.name.firstName", "person.name.lastName", "personalEmail.address",
              "homeAddress.city"]
FIRST = ["John", "Ann", "Marie", "Paul", "Li", "Omar", "Eva", "Noah", "Mia", "Sam"]
LAST = ["Doe", "Martin", "Bernard", "Dubois", "Smith", "Garcia", "Rossi", "Kim"]
CITIES = ["Paris", "Lyon", "Lille", "Nantes", "Berlin", "Madrid", "Rome", "Oslo"]
LQT = "2026-01-11T21:24:39Z"
CHUNK = 50_000
TARGET_BATCH_S = 0.5
TARGET_BACKFILL = 100_000
TARGET_RSS = 2 << 30


class Clock:
    """Wall and CPU time of a block: on a shared machine the CPU time is the steadier figure."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.3f} s (cpu {self.cpu:.3f} s)"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def pid_of(i: int) -> str:
    return f"p-{i:08d}"


def build_store(path: Path, n: int, rng: random.Random, shuffled: bool = False) -> None:
    """N profiles (memberships in the profile row) with their change-log row, written with
    executemany, in key order, or with ``shuffled`` in a random order (as profiles arrive
    in a real store: the table's storage order is then unrelated to the key order)."""
    order = list(range(n))
    if shuffled:
        random.Random(n).shuffle(order)
    db = open_db(path)  # runs the migrations
    conn = db.conn
    conn.execute("PRAGMA synchronous = OFF")
    committed = now_ms()
    statuses = ["realized", "existing", "existing", "exited"]
    others = SEGMENTS[1:]
    paths = ("person.name.firstName\nperson.name.lastName\nperson.birthDate\nperson.gender\n"
             "personalEmail.address\nmobilePhone.number\nhomeAddress.city\n"
             "homeAddress.postalCode\nhomeAddress.country\nloyalty.tier\nloyalty.points")
    with write_txn(db):
        for start in range(0, n, CHUNK):
            profiles, changes = [], []
            for k, i in enumerate(order[start:start + CHUNK], start):
                pid = pid_of(i)
                shard = shard_of(pid)
                attrs = {
                    "person": {"name": {"firstName": FIRST[i % 10], "lastName": LAST[i % 8]},
                               "birthDate": f"19{50 + i % 50}-0{1 + i % 9}-1{i % 10}",
                               "gender": "f" if i % 2 else "m"},
                    "personalEmail": {"address": f"{pid}@example.com"},
                    "mobilePhone": {"number": f"+33 6 {i:08d}"},
                    "homeAddress": {"city": CITIES[i % 8], "postalCode": f"{75000 + i % 999}",
                                    "country": "FR"},
                    "loyalty": {"tier": ("gold", "silver", "bronze")[i % 3], "points": i % 5000},
                }
                ids = {"ecid": [{"id": str(10**15 + i * 7919)}],
                       "email": [{"id": f"{pid}@example.com"}]}
                segs = {"seg-00": "existing" if rng.random() < 0.98 else "exited"}
                for seg in rng.sample(others, 4):
                    segs[seg] = rng.choice(statuses)
                seq = k + 1  # in storage order
                entries = {seg: (status, LQT) for seg, status in segs.items()}
                profiles.append((pid, shard, orjson.dumps(attrs), orjson.dumps(ids),
                                 orjson.dumps(entries), qualified_of(entries), committed,
                                 committed, seq))
                changes.append((seq, pid, shard, committed, committed, paths,
                                orjson.dumps(ids).decode(), 1, orjson.dumps(segs).decode()))
            conn.executemany(
                "INSERT INTO profiles (profile_id, shard, attributes, identity_map, segments, "
                "qualified, created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                profiles)
            conn.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", changes)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()


def per_profile_backfill(store: Store, name: str, job: Backfill, segments: list[str],
                         chunk: int) -> int:
    """A backfill as ``tasks.pipeline.backfill`` did it until 2026-12-03: each chunk's
    profile ids read into Python, their rows read back, their exports queued."""
    store.set_backfill_total(job.id, store.count_qualified(segments))
    after, exported = "", 0
    while pids := store.qualified_after(segments, after, chunk):
        now = now_ms()
        exports = [Export(pid, seq, "backfill", now, qualified)
                   for pid, seq, qualified in store.backfill_rows(pids, segments)]
        store.enqueue_exports(name, exports, backfill=(job.id, pids[-1], len(pids)), read_at=now)
        after = pids[-1]
        exported += len(exports)
    store.finish_backfill(job.id)
    return exported


def micro_batch(n: int, size: int, rng: random.Random) -> bytes:
    """``size`` fragments on random profiles: what a busy few seconds of ingest look like."""
    lines = []
    for k in range(size):
        i = rng.randrange(n)
        doc: dict = {"profileId": pid_of(i), "timestamp": LQT}
        kind = rng.random()
        if kind < 0.35:    # mapped attribute, a third of them rewriting the same value
            first = FIRST[i % 10] if k % 3 == 0 else rng.choice(FIRST)
            doc["attributes"] = {"person": {"name": {"firstName": first}}}
        elif kind < 0.60:  # unmapped attribute
            doc["attributes"] = {"loyalty": {"points": rng.randrange(10_000)}}
        elif kind < 0.75:  # identity added
            doc["identityMap"] = {"crm": [{"id": f"crm-{k}"}]}
        elif kind < 0.90:  # mapped membership flip
            seg = rng.choice(MAPPED)
            doc["segmentMembership"] = {"ups": {seg: {"status": rng.choice(["exited", "realized"])}}}
        else:              # unmapped segment change
            seg = rng.choice(SEGMENTS[2:])
            doc["segmentMembership"] = {"ups": {seg: {"status": rng.choice(["exited", "existing"])}}}
        lines.append(orjson.dumps(doc))
    return b"\n".join(lines) + b"\n"


def baseline(conn, after: int) -> tuple[Clock, int]:
    """Only reading what the micro-batch touches into Polars: its changes, and the rows of
    the profiles they name (documents, memberships included)."""
    with Clock() as clock:
        changes = pl.DataFrame(conn.execute(
            "SELECT seq, profile_id, committed_at, attr_paths, identity_changed, segments "
            "FROM changes WHERE seq > ? ORDER BY seq", (after,)).fetchall(),
            schema=["seq", "profile_id", "committed_at", "attr_paths", "identity_changed",
                    "segments"], orient="row")
        arg = (orjson.dumps(changes.get_column("profile_id").unique().to_list()).decode(),)
        profiles = pl.DataFrame(conn.execute(
            "SELECT profile_id, attributes, identity_map, segments, qualified, last_seq "
            "FROM profiles WHERE profile_id IN (SELECT value FROM json_each(?))", arg).fetchall(),
            schema=["profile_id", "attributes", "identity_map", "segments", "qualified",
                    "last_seq"], orient="row")
    return clock, changes.height + profiles.height


class Phases:
    """CPU and wall time per step of decide_batch / backfill, by wrapping the Store verbs
    and the detection functions they call (per call, not per row: the overhead is
    negligible)."""

    STORE_VERBS = ("read_changes", "memberships", "snapshots", "count_qualified",
                   "queue_backfill", "qualified_after", "backfill_rows", "enqueue_exports")
    PIPELINE_STEPS = ("candidates", "decide")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.saved: list[tuple[object, str]] = []

    def __enter__(self) -> Phases:
        # the store's verbs as instance attributes (removed again on exit), the pipeline's
        # detection steps in its module namespace (restored on exit)
        for target, names in ((self.store, self.STORE_VERBS), (pipeline, self.PIPELINE_STEPS)):
            for name in names:
                real = getattr(target, name)
                self.saved.append((target, name, real))
                setattr(target, name, self._timed(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for target, name, real in reversed(self.saved):
            if target is self.store:
                delattr(target, name)
            else:
                setattr(target, name, real)

    def _timed(self, name, real):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        return timed

    def report(self, title: str, total: Clock) -> None:
        print(f"    where {title} goes (cpu s; wall s):")
        for name in sorted(self.cpu, key=self.cpu.get, reverse=True):
            print(f"      {name:16s} {self.cpu[name]:7.3f}  {self.wall[name]:7.3f}")
        rest = total.cpu - sum(self.cpu.values())
        print(f"      {'the rest':16s} {rest:7.3f}  "
              f"{total.wall - sum(self.wall.values()):7.3f}   (Export rows, the glue)")


def top(prof: cProfile.Profile, title: str, lines: int = 22) -> None:
    print(f"\n--- cProfile: {title} (by own time) ---")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(lines)
    print("\n".join(out.getvalue().splitlines()[6:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--db", type=Path, default=None, help="store file (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=pipeline.BACKFILL_CHUNK,
                    help="profiles per backfill transaction")
    ap.add_argument("--shuffled", action="store_true",
                    help="store the profiles in a random order, not in key order")
    ap.add_argument("--profile", nargs="?", const="wall", choices=["wall", "cpu"],
                    help="cProfile (b) and (c), timed by wall clock (default) or CPU time")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-diff-")
        args.db = Path(tmp.name) / "store.db"
    elif args.db.exists():
        sys.exit(f"{args.db} exists; give a new path")

    with Clock() as built:
        build_store(args.db, args.profiles, rng, args.shuffled)
    rss_build = peak_rss()
    print(f"store: {args.profiles:,} profiles built in {built} "
          f"({os.path.getsize(args.db) / 2**20:,.0f} MiB), peak RSS so far {gib(rss_build)}")

    config = parse_config({
        "segments": [{"id": s, "name": f"Segment {s}", "createdAt": 1648553325000,
                      "updatedAt": 1648553330000} for s in SEGMENTS],
        "destinations": [{"name": "crm", "endpoint": "http://127.0.0.1:9/x",
                          "include_segment_names": True, "include_segment_timestamps": True}],
        "dataflows": [{"name": FLOW, "destination": "crm", "segments": MAPPED,
                       "attributes": ATTRIBUTES}],
    })
    flow = config.dataflow(FLOW)
    store = open_store(args.db)
    db = store.db  # a SqliteStore: the baseline reads through the store's own connection
    sync = pipeline.sync(store, config, flow)
    assert sync.created
    timer = time.process_time if args.profile == "cpu" else time.perf_counter

    # (c) the new dataflow's backfill: every qualified profile into the outbox
    (job,) = store.open_backfills(FLOW)
    prof_c = cProfile.Profile(timer) if args.profile else None
    with Phases(store) as phases_c, Clock() as backfill_t:
        if prof_c:
            prof_c.enable()
        backfilled = pipeline.backfill(store, flow, job, chunk=args.chunk)
        if prof_c:
            prof_c.disable()
    queued = store.pending_count(FLOW)
    assert queued == backfilled, (queued, backfilled)
    rss_backfill = peak_rss()
    with write_txn(db) as conn:  # as if delivered
        conn.execute("DELETE FROM outbox WHERE dataflow = ?", (FLOW,))
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # (d) baseline for (c): the same backfill for a second dataflow over the same segments,
    # each chunk's profiles through Python as until now; then that dataflow is dropped
    store.sync_dataflow(REF_FLOW, "crm", MAPPED, "ref")
    (ref_job,) = store.open_backfills(REF_FLOW)
    with Clock() as ref_t:
        ref_backfilled = per_profile_backfill(store, REF_FLOW, ref_job, MAPPED, REF_CHUNK)
    assert ref_backfilled == backfilled, (ref_backfilled, backfilled)
    same = db.conn.execute(
        "SELECT count(*) FROM dataflow_profiles a JOIN dataflow_profiles b USING (profile_id) "
        "WHERE a.dataflow = ? AND b.dataflow = ? AND a.qualified = b.qualified "
        "AND a.exported_seq = b.exported_seq", (FLOW, REF_FLOW)).fetchone()[0]
    assert same == backfilled, (same, backfilled)  # the same snapshots, row for row
    store.drop_dataflow(REF_FLOW)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # the micro-batch
    data = micro_batch(args.profiles, args.batch, rng)
    cursor = store.cursor(FLOW)
    with Clock() as ingest_t:
        result = ingest_stream(store, io.BytesIO(data), "bench", frozenset(SEGMENTS))
    assert result.ingested == args.batch and result.rejected == 0

    # (a) baseline, warm (the first read brings the pages into the cache for both)
    baseline(db.conn, cursor)
    runs = [baseline(db.conn, cursor) for _ in range(3)]
    base_t, base_rows = min(runs, key=lambda r: r[0].wall)

    # (b) ours
    prof_b = cProfile.Profile(timer) if args.profile else None
    exports = changes = 0
    with Phases(store) as phases_b, Clock() as ours_t:
        if prof_b:
            prof_b.enable()
        while (res := pipeline.decide_batch(store, flow, limit=args.batch)) is not None:
            exports += res.exports
            changes += res.changes
        if prof_b:
            prof_b.disable()
    assert changes == args.batch
    rss = peak_rss()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rate = backfilled / backfill_t.wall
    print(f"micro-batch: {args.batch:,} fragments ingested in {ingest_t} "
          f"({args.batch / ingest_t.wall:,.0f} fragments/s)")
    print(f"(a) baseline, touched rows into Polars: {base_t} ({base_rows:,} rows)")
    print(f"(b) ours, micro-batch -> outbox:       {ours_t}, {exports:,} exports, "
          f"{exports / ours_t.wall:,.0f} exports/s, {changes / ours_t.wall:,.0f} changes/s; "
          f"{ours_t.wall / base_t.wall:.1f}x the baseline (cpu "
          f"{ours_t.cpu / max(base_t.cpu, 1e-9):.1f}x)   "
          f"target <= {TARGET_BATCH_S} s: {verdict(ours_t.wall <= TARGET_BATCH_S)}")
    phases_b.report("(b)", ours_t)
    print(f"(c) backfill of {backfilled:,} qualified profiles: {backfill_t}, {rate:,.0f} "
          f"profiles/s (cpu-bound rate {backfilled / backfill_t.cpu:,.0f}/s)   "
          f"target >= {TARGET_BACKFILL:,}/s: {verdict(rate >= TARGET_BACKFILL)}")
    phases_c.report("(c)", backfill_t)
    ref_rate = ref_backfilled / ref_t.wall
    print(f"(d) baseline for (c), each chunk's {REF_CHUNK:,} profiles through Python "
          f"(qualified_after, backfill_rows, enqueue_exports): {ref_t}, {ref_rate:,.0f} "
          f"profiles/s; (c) is {rate / ref_rate:.2f}x this (cpu {ref_t.cpu / backfill_t.cpu:.2f}x)")
    print(f"peak RSS: {gib(rss)} (after build {gib(rss_build)}, after backfill "
          f"{gib(rss_backfill)})   target <= {gib(TARGET_RSS)}: {verdict(rss <= TARGET_RSS)}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          f"(other processes inflate wall times)")
    if prof_b:
        top(prof_b, "(b) decide_batch")
    if prof_c:
        top(prof_c, "(c) backfill")
    store.close()
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()

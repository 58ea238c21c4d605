"""Ingest benchmark: ``ingest_files`` against a bare sqlite3 baseline, in the same run.

    .venv/bin/python bench/ingest.py [--fragments N] [--profiles P] [--profile-cpu]

1. Generates N fragments of about 0.5 KB (nested attributes, 2 identities, 3 segment
   statuses; about 30 % of lines introduce a new profile, the rest update a known one)
   into a temporary NDJSON file, streamed to disk.
2. OURS: ``ingest_files`` into a fresh store, in a child process, so the peak RSS printed
   (``ru_maxrss``) is the ingest's own. Import time is not counted.
3. BASELINE: in another child, the same file read in batches of the same size; the rows
   ours writes (one ``changes`` row per fragment, one ``profiles`` upsert per profile per
   batch with its documents, one ``profile_segments`` upsert per profile and segment per
   batch) are precomputed untimed, and only ``BEGIN IMMEDIATE``, the three
   ``executemany`` calls and ``COMMIT`` are timed.

Targets: >= 50,000 fragments/s, >= 0.5 of the baseline, peak RSS <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_SEGMENTS = 20
SEGMENTS = [f"seg-{i:02d}" for i in range(N_SEGMENTS)]
FIRST = ["John", "Marie", "Ana", "Kenji", "Fatou", "Lars", "Priya", "Tomás", "Olga", "Wei"]
LAST = ["Doe", "Martin", "García", "Tanaka", "Diallo", "Berg", "Sharma", "Silva", "Novak", "Li"]
CITIES = [("Paris", "75002", "FR"), ("Lyon", "69001", "FR"), ("Berlin", "10115", "DE"),
          ("Madrid", "28001", "ES"), ("Oslo", "0150", "NO"), ("Austin", "73301", "US")]
STATUSES = ["realized", "existing", "exited"]
TARGET_RATE = 50_000
TARGET_RATIO = 0.5
TARGET_RSS = 1 << 30


# --- generation -------------------------------------------------------------------------


def generate(path: Path, n: int, n_profiles: int, seed: int = 7) -> tuple[int, int]:
    """Write n fragments to path; returns (bytes written, distinct profiles)."""
    import orjson

    rng = random.Random(seed)
    new_share = n_profiles / n
    known = 0
    size = 0
    base_ts = 1_768_000_000
    chunk: list[bytes] = []
    with path.open("wb") as out:
        for i in range(n):
            if known == 0 or (known < n_profiles and rng.random() < new_share):
                num = known
                known += 1
            else:
                num = rng.randrange(known)
            pid = f"p-{num:08d}"
            first, last = FIRST[num % 10], LAST[(num // 10) % 10]
            city, postcode, country = CITIES[rng.randrange(len(CITIES))]
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base_ts + i // 20))
            segs = rng.sample(SEGMENTS, 3)
            doc = {
                "profileId": pid,
                "timestamp": ts,
                "attributes": {
                    "person": {
                        "name": {"firstName": first, "lastName": last},
                        "birthDate": f"19{50 + num % 50}-0{1 + num % 9}-1{num % 10}",
                    },
                    "personalEmail": {"address": f"{first}.{last}.{num}@example.com".lower()},
                    "homeAddress": {"city": city, "postalCode": postcode, "country": country},
                    "loyalty": {"tier": rng.choice(["bronze", "silver", "gold"]),
                                "points": rng.randrange(100_000)},
                },
                "identityMap": {
                    "ecid": [{"id": f"{num * 7919 + 14575006536349:020d}"}],
                    "email": [{"id": f"{first}.{last}.{rng.randrange(3)}.{num}@example.com".lower()}],
                },
                "segmentMembership": {"ups": {
                    seg: {"status": rng.choice(STATUSES)} for seg in segs}},
            }
            # one explicit qualification time; the others default to the timestamp
            doc["segmentMembership"]["ups"][segs[0]]["lastQualificationTime"] = ts
            chunk.append(orjson.dumps(doc))
            if len(chunk) >= 10_000:
                data = b"\n".join(chunk) + b"\n"
                out.write(data)
                size += len(data)
                chunk = []
        if chunk:
            data = b"\n".join(chunk) + b"\n"
            out.write(data)
            size += len(data)
    return size, known


# --- the two measured children ----------------------------------------------------------


def run_ours(src: str, db_path: str, cpu_profile: bool) -> dict:
    from state import open_store
    from tasks.ingest import ingest_files

    store = open_store(db_path)
    catalogue = frozenset(SEGMENTS)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    profiler = None
    if cpu_profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    result = ingest_files(store, [src], catalogue)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        print(text.getvalue(), file=sys.stderr)
    store.close()
    counts = table_counts(db_path)
    return {"seconds": seconds, "cpu": cpu, "ingested": result.ingested, "rejected": result.rejected,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before": rss_before, "counts": counts}


def table_counts(db_path: str) -> dict[str, int]:
    """Rows in the tables an ingest writes, read on a connection of its own."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("changes", "profiles", "profile_segments")}
    finally:
        conn.close()


def run_baseline(src: str, db_path: str, batch: int) -> dict:
    """Bare sqlite3: the same rows, batches and statements; only the SQL is timed."""
    import orjson

    from state.db import now_ms, open_db, shard_of
    from state.model import leaf_paths

    conn = open_db(db_path).conn  # the same schema and pragmas; a plain sqlite3.Connection
    insert_changes = (
        "INSERT INTO changes (profile_id, shard, ts, committed_at, attr_paths, identities, "
        "identity_changed, segments) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
    upsert_profiles = (
        "INSERT INTO profiles (profile_id, shard, attributes, identity_map, created_at, "
        "updated_at, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id) DO UPDATE "
        "SET attributes = excluded.attributes, identity_map = excluded.identity_map, "
        "updated_at = excluded.updated_at, last_seq = excluded.last_seq")
    upsert_segments = (
        "INSERT INTO profile_segments (profile_id, segment_id, status, "
        "last_qualification_time) VALUES (?, ?, ?, ?) ON CONFLICT (profile_id, segment_id) "
        "DO UPDATE SET status = excluded.status, "
        "last_qualification_time = excluded.last_qualification_time")
    seq = 0
    sql_seconds = sql_cpu = 0.0
    n = 0

    def flush(lines: list[bytes]) -> None:
        nonlocal seq, sql_seconds, sql_cpu, n
        committed = now_ms()
        changes, profiles, segments = [], {}, {}
        for line in lines:  # untimed: build the rows
            doc = orjson.loads(line)
            pid = doc["profileId"]
            seq += 1
            ups = doc["segmentMembership"]["ups"]
            paths = "\n".join(leaf_paths(doc["attributes"]))
            changes.append((pid, shard_of(pid), committed, committed, paths,
                            orjson.dumps(doc["identityMap"]).decode(), 1,
                            orjson.dumps({s: v["status"] for s, v in ups.items()}).decode()))
            profiles[pid] = (pid, shard_of(pid), orjson.dumps(doc["attributes"]),
                             orjson.dumps(doc["identityMap"]), committed, committed, seq)
            for seg, entry in ups.items():
                segments[(pid, seg)] = (pid, seg, entry["status"],
                                        entry.get("lastQualificationTime", doc["timestamp"]))
        profile_rows, segment_rows = list(profiles.values()), list(segments.values())
        start, cpu = time.perf_counter(), time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert_changes, changes)
        conn.executemany(upsert_profiles, profile_rows)
        conn.executemany(upsert_segments, segment_rows)
        conn.execute("COMMIT")
        sql_seconds += time.perf_counter() - start
        sql_cpu += time.process_time() - cpu
        n += len(lines)

    pending: list[bytes] = []
    with open(src, "rb") as fh:
        for line in fh:
            pending.append(line)
            if len(pending) >= batch:
                flush(pending)
                pending = []
    if pending:
        flush(pending)
    conn.close()
    counts = table_counts(db_path)
    return {"seconds": sql_seconds, "cpu": sql_cpu, "ingested": n, "counts": counts,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(mode: str, *args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child={mode}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} child failed:\n{proc.stderr}")
    if proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fragments", type=int, default=1_000_000)
    parser.add_argument("--profiles", type=int, default=None,
                        help="distinct profiles (default: 30 %% of fragments, at most 300,000)")
    parser.add_argument("--profile-cpu", action="store_true",
                        help="run our ingest under cProfile and print where the time goes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run ours and the baseline alternately this many times; keep the "
                             "best of each (steadier on a shared machine)")
    parser.add_argument("--workdir", default=None, help="put the temporary files under here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.child == "ours":
        print(json.dumps(run_ours(opts.args[0], opts.args[1], opts.args[2] == "1")))
        return
    if opts.child == "baseline":
        print(json.dumps(run_baseline(opts.args[0], opts.args[1], int(opts.args[2]))))
        return

    from tasks.ingest import BATCH_LINES

    n = opts.fragments
    n_profiles = opts.profiles or max(1, min(300_000, int(n * 0.3)))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        src = work / "fragments.ndjson"
        start = time.perf_counter()
        size, distinct = generate(src, n, n_profiles)
        print(f"generated {n:,} fragments, {distinct:,} profiles, {size / n:.0f} B/fragment "
              f"({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")

        ours = base = None
        for _ in range(max(1, opts.repeats)):
            run = child("ours", str(src), str(work / "ours.db"), "1" if opts.profile_cpu else "0")
            ours = run if ours is None or run["seconds"] < ours["seconds"] else ours
            run = child("baseline", str(src), str(work / "baseline.db"), str(BATCH_LINES))
            base = run if base is None or run["seconds"] < base["seconds"] else base
            for db_file in work.glob("*.db*"):
                os.unlink(db_file)

    if ours["counts"] != base["counts"] or ours["ingested"] != n or ours["rejected"]:
        print(f"WARNING: row counts differ: ours {ours['counts']}, baseline {base['counts']}, "
              f"ingested {ours['ingested']}, rejected {ours['rejected']}")
    ours_rate = n / ours["seconds"]
    base_rate = n / base["seconds"]
    ratio = ours_rate / base_rate
    peak = ours["peak_rss"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "BELOW TARGET"

    print(f"rows: {ours['counts']}; load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (a busy machine slows both sides)")
    print(f"ours      {ours_rate:>10,.0f} fragments/s  ({ours['seconds']:.2f} s)"
          f"   target >= {TARGET_RATE:,}: {verdict(ours_rate >= TARGET_RATE)}")
    print(f"baseline  {base_rate:>10,.0f} fragments/s  ({base['seconds']:.2f} s of SQL, "
          f"bare sqlite3 executemany)")
    print(f"CPU time  ours {ours['cpu']:.2f} s, baseline {base['cpu']:.2f} s: ratio by CPU "
          f"{base['cpu'] / ours['cpu']:.2f} (steadier than wall time when the machine is shared)")
    print(f"ratio     {ratio:>10.2f} (ours / baseline)   target >= {TARGET_RATIO}: "
          f"{verdict(ratio >= TARGET_RATIO)}")
    print(f"peak RSS  {peak / 2**20:>10.0f} MiB (ingest process; {ours['rss_before'] / 2**20:.0f} "
          f"MiB before ingest)   target <= {TARGET_RSS / 2**20:.0f} MiB: "
          f"{verdict(peak <= TARGET_RSS)}")


if __name__ == "__main__":
    main()

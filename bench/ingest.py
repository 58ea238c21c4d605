"""Ingest benchmark: ``ingest_files`` against bare sqlite3 baselines, in the same run.

    .venv/bin/python bench/ingest.py [--fragments N] [--profiles P] [--profile-cpu]
    .venv/bin/python bench/ingest.py --wide [--wide-mib M]

1. Generates N fragments of about 0.5 KB (nested attributes, 2 identities, 3 segment
   statuses; about 30 % of lines introduce a new profile, the rest update a known one)
   into a temporary NDJSON file, streamed to disk.
2. OURS: ``ingest_files`` into a fresh store, in a child process, so the peak RSS printed
   (``ru_maxrss``) is the ingest's own. Import time is not counted.
3. BASELINE (new way): in another child, the same file in batches of the same size, and
   exactly the rows ours writes with the current schema (one ``changes`` row per fragment,
   and per profile per batch, in key order, one ``profiles`` INSERT or UPDATE with its
   merged attribute and identity documents, the segment statuses written (SQLite merges
   them into the stored ones) and its qualified segments), precomputed untimed with the
   same merge functions and the same statements; only ``BEGIN IMMEDIATE``, the
   ``executemany`` calls and ``COMMIT`` are timed. Both stores must end up holding the same bytes (checked), so the
   ratio is what our Python costs on top of the SQL.
4. OLD BASELINE, for comparison: the rows of the schema before migration 6 (a store made
   with migrations 1 to 5: the ``profiles`` upsert and one ``profile_segments`` upsert per
   profile and segment per batch), timed the same way: what SQLite itself allowed then.

``--wide``: instead, lines of about 100 KB (10,000 attribute leaves each, 100 profiles)
filling --wide-mib MiB, ingested by ours alone; prints the peak RSS against the largest
batch written (the memory target: the ingest's growth under 4x the batch).

Targets: >= 50,000 fragments/s, >= 0.8 of the new-way baseline; with --wide, peak RSS growth
< 4x the batch.
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
from collections.abc import Iterator
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
TARGET_RATIO = 0.8
TARGET_WIDE = 4.0  # peak RSS growth / bytes of the largest batch


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


def generate_wide(path: Path, target_bytes: int, seed: int = 7) -> tuple[int, int]:
    """Lines of about 100 KB (50 groups of 200 attributes, short strings and numbers, for
    100 profiles) up to ``target_bytes``; returns (bytes written, lines)."""
    import orjson

    rng = random.Random(seed)
    size = lines = 0
    with path.open("wb") as out:
        while size < target_bytes:
            attrs = {f"group{g:02d}": {f"f{k:03d}": rng.randrange(1000) if k % 2 else
                                       f"v{rng.randrange(100)}" for k in range(200)}
                     for g in range(50)}
            doc = {"profileId": f"w-{lines % 100:04d}", "attributes": attrs,
                   "segmentMembership": {"ups": {rng.choice(SEGMENTS): {"status": "realized"}}}}
            data = orjson.dumps(doc) + b"\n"
            out.write(data)
            size += len(data)
            lines += 1
    return size, lines


# --- the measured children -------------------------------------------------------------


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
    batches: list[int] = []
    start, cpu = time.perf_counter(), time.process_time()
    result = ingest_files(store, [src], catalogue, on_progress=batches.append)
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store.close()
    return {"seconds": seconds, "cpu": cpu, "ingested": result.ingested, "rejected": result.rejected,
            "peak_rss": peak, "rss_before": rss_before, "batch_bytes": max(batches, default=0),
            "batches": len(batches), "counts": table_counts(db_path),
            "digest": digest(db_path)}


def table_counts(db_path: str) -> dict[str, int]:
    """Rows in the tables an ingest writes, read on a connection of its own."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        tables = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('changes', 'profiles', 'profile_segments')")]
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sorted(tables)}
    finally:
        conn.close()


def digest(db_path: str) -> list[int]:
    """What the current schema's ingest wrote, summed: sizes of every document and column
    of the profiles, and of the change log's columns (ours and the new-way baseline must
    agree)."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    if not conn.execute("SELECT count(*) FROM pragma_table_info('profiles') "
                        "WHERE name = 'qualified'").fetchone()[0]:
        return []  # a store before migration 6 (this script run on an older checkout)
    try:
        profiles = conn.execute(
            "SELECT count(*), sum(length(attributes)), sum(length(identity_map)), "
            "sum(length(segments)), sum(length(qualified)), sum(last_seq), sum(shard) "
            "FROM profiles").fetchone()
        changes = conn.execute(
            "SELECT count(*), sum(length(attr_paths)), sum(length(identities)), "
            "sum(identity_changed), sum(length(segments)), sum(ts), sum(shard) FROM changes"
        ).fetchone()
        return [*profiles, *changes]
    finally:
        conn.close()


def _bare_connection(db_path: str, migrations: int | None = None):
    """A plain sqlite3 connection with the store's pragmas, on a store of the first
    ``migrations`` migrations (None: all of them)."""
    import sqlite3

    from state.db import configure, open_db, statements
    from state.schema import MIGRATIONS

    if migrations is None:
        return open_db(db_path).conn
    conn = sqlite3.connect(db_path, isolation_level=None)
    configure(conn)
    conn.execute("BEGIN")
    for script in MIGRATIONS[:migrations]:
        for statement in statements(script):
            conn.execute(statement)
    conn.execute("COMMIT")
    return conn


def _batches(src: str, batch: int) -> Iterator[list[bytes]]:
    pending: list[bytes] = []
    with open(src, "rb") as fh:
        for line in fh:
            pending.append(line)
            if len(pending) >= batch:
                yield pending
                pending = []
    if pending:
        yield pending


def _timed_sql(conn, statements: list[tuple[str, list]]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    conn.execute("BEGIN IMMEDIATE")
    for sql, rows in statements:
        conn.executemany(sql, rows)
    conn.execute("COMMIT")
    return time.perf_counter() - start, time.process_time() - cpu


def run_baseline(src: str, db_path: str, batch: int) -> dict:
    """Bare sqlite3, the current schema: exactly the rows ours writes, merged untimed with
    the same functions, one transaction per batch; only the SQL is timed (the same
    statements as ``state.profiles``: the change rows, an INSERT per new profile and an
    UPDATE per known one, in key order, SQLite merging the segment statuses written)."""
    import orjson

    from state.db import now_ms, shard_of
    from state.model import deep_merge, merge_identities
    from state.profiles import _INSERT_CHANGES, _INSERT_PROFILES, _UPDATE_PROFILES, _requalified
    from tasks.fragments import parse_fragment

    conn = _bare_connection(db_path)
    catalogue = frozenset(SEGMENTS)
    known: dict[str, tuple[bytes, bytes, int, str]] = {}  # as the store holds them
    seq = 0
    sql_seconds = sql_cpu = 0.0
    n = 0
    for lines in _batches(src, batch):
        committed = now = now_ms()
        changes, touched = [], {}
        for line in lines:  # untimed: build the rows
            frag = parse_fragment(line, catalogue, now)
            pid = frag.profile_id
            seq += 1
            state = touched.get(pid)
            if state is None:
                held = known.get(pid)
                state = touched[pid] = (
                    [{}, {}, committed, "", False, {}, 0] if held is None else
                    [orjson.loads(held[0]), orjson.loads(held[1]), held[2], held[3], True, {}, 0])
            deep_merge(state[0], frag.attributes)
            changed = merge_identities(state[1], frag.identities)
            state[5].update(frag.segments)
            state[6] = seq
            changes.append((pid, shard_of(pid), frag.ts, committed, "\n".join(frag.paths),
                            orjson.dumps(frag.identities).decode(), int(changed),
                            orjson.dumps({s: v[0] for s, v in frag.segments.items()}).decode()))
        inserts, updates = [], []
        for pid in sorted(touched):
            attrs, ids, created, qualified, exists, patch, last = touched[pid]
            attrs, ids = orjson.dumps(attrs), orjson.dumps(ids)
            qualified = _requalified(qualified, patch)
            known[pid] = (attrs, ids, created, qualified)
            patch_json = orjson.dumps(patch).decode()
            if exists:
                updates.append((attrs, ids, patch_json, qualified, committed, last, pid))
            else:
                inserts.append((pid, shard_of(pid), attrs, ids, patch_json, qualified, created,
                                committed, last))
        wall, cpu = _timed_sql(conn, [(_INSERT_CHANGES, changes), (_INSERT_PROFILES, inserts),
                                      (_UPDATE_PROFILES, updates)])
        sql_seconds += wall
        sql_cpu += cpu
        n += len(lines)
    conn.close()
    return {"seconds": sql_seconds, "cpu": sql_cpu, "ingested": n, "counts": table_counts(db_path),
            "digest": digest(db_path),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_old_baseline(src: str, db_path: str, batch: int) -> dict:
    """Bare sqlite3 on the schema before migration 6, the rows of the benchmark until
    2026-12-02 (attributes and identities as the fragment wrote them, one membership
    upsert per profile and segment per batch); only the SQL is timed."""
    import orjson

    from state.db import now_ms, shard_of
    from state.model import leaf_paths

    conn = _bare_connection(db_path, migrations=5)
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
    for lines in _batches(src, batch):
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
        wall, cpu = _timed_sql(conn, [(insert_changes, changes),
                                      (upsert_profiles, list(profiles.values())),
                                      (upsert_segments, list(segments.values()))])
        sql_seconds += wall
        sql_cpu += cpu
        n += len(lines)
    conn.close()
    return {"seconds": sql_seconds, "cpu": sql_cpu, "ingested": n, "counts": table_counts(db_path),
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


def wide(opts: argparse.Namespace) -> None:
    """The memory check: wide lines, ours alone; peak RSS against the largest batch."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-wide-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        src = work / "wide.ndjson"
        size, lines = generate_wide(src, opts.wide_mib << 20)
        print(f"generated {lines:,} wide lines ({size / lines / 1024:.0f} KiB each), "
              f"{size / 2**20:.1f} MiB")
        ours = child("ours", str(src), str(work / "ours.db"), "0")
    growth = ours["peak_rss"] - ours["rss_before"]
    batch = ours["batch_bytes"]
    ratio = growth / batch
    print(f"ingested {ours['ingested']:,} lines in {ours['seconds']:.2f} s, {ours['batches']} "
          f"batch(es), the largest {batch / 2**20:.1f} MiB")
    print(f"peak RSS  {ours['peak_rss'] / 2**20:.0f} MiB ({ours['rss_before'] / 2**20:.0f} MiB "
          f"before ingest): growth {growth / 2**20:.0f} MiB = {ratio:.2f}x the largest batch "
          f"(peak / batch {ours['peak_rss'] / batch:.2f})   target growth < {TARGET_WIDE:.0f}x: "
          f"{'ok' if ratio < TARGET_WIDE else 'BELOW TARGET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fragments", type=int, default=1_000_000)
    parser.add_argument("--profiles", type=int, default=None,
                        help="distinct profiles (default: 30 %% of fragments, at most 300,000)")
    parser.add_argument("--profile-cpu", action="store_true",
                        help="run our ingest under cProfile and print where the time goes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run ours and the baselines alternately this many times; keep the "
                             "best of each (steadier on a shared machine)")
    parser.add_argument("--no-old", action="store_true", help="skip the old-schema baseline")
    parser.add_argument("--wide", action="store_true",
                        help="the memory check: wide lines (about 100 KB), ours only")
    parser.add_argument("--wide-mib", type=int, default=35, help="size of the --wide file")
    parser.add_argument("--workdir", default=None, help="put the temporary files under here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.child == "ours":
        print(json.dumps(run_ours(opts.args[0], opts.args[1], opts.args[2] == "1")))
        return
    if opts.child in ("baseline", "old-baseline"):
        run = run_baseline if opts.child == "baseline" else run_old_baseline
        print(json.dumps(run(opts.args[0], opts.args[1], int(opts.args[2]))))
        return
    if opts.wide:
        wide(opts)
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

        best: dict[str, dict] = {}
        modes = ["ours", "baseline"] + ([] if opts.no_old else ["old-baseline"])
        for _ in range(max(1, opts.repeats)):
            for mode in modes:
                args = [str(src), str(work / f"{mode}.db"),
                        ("1" if opts.profile_cpu else "0") if mode == "ours" else str(BATCH_LINES)]
                run = child(mode, *args)
                if mode not in best or run["seconds"] < best[mode]["seconds"]:
                    best[mode] = run
                for db_file in work.glob("*.db*"):
                    os.unlink(db_file)
    ours, base, old = best["ours"], best["baseline"], best.get("old-baseline")

    if ours["digest"] != base["digest"] or ours["ingested"] != n or ours["rejected"]:
        print(f"WARNING: ours and the baseline wrote different data: ours {ours['digest']}, "
              f"baseline {base['digest']}, ingested {ours['ingested']}, rejected "
              f"{ours['rejected']}")
    ours_rate = n / ours["seconds"]
    base_rate = n / base["seconds"]
    ratio = ours_rate / base_rate

    def verdict(ok: bool) -> str:
        return "ok" if ok else "BELOW TARGET"

    print(f"rows: {ours['counts']} (the baseline wrote the same bytes); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a busy machine slows both sides)")
    print(f"ours          {ours_rate:>10,.0f} fragments/s  ({ours['seconds']:.2f} s, cpu "
          f"{ours['cpu']:.2f} s)   target >= {TARGET_RATE:,}: {verdict(ours_rate >= TARGET_RATE)}")
    print(f"baseline      {base_rate:>10,.0f} fragments/s  ({base['seconds']:.2f} s of SQL, cpu "
          f"{base['cpu']:.2f} s: bare sqlite3 executemany of the same rows, current schema)")
    if old is not None:
        print(f"old baseline  {n / old['seconds']:>10,.0f} fragments/s  ({old['seconds']:.2f} s "
              f"of SQL, cpu {old['cpu']:.2f} s: the schema before migration 6, rows "
              f"{old['counts']})")
    print(f"ratio         {ratio:>10.2f} (ours / baseline; by CPU time "
          f"{base['cpu'] / ours['cpu']:.2f})   target >= {TARGET_RATIO}: "
          f"{verdict(ratio >= TARGET_RATIO)}")
    print(f"peak RSS      {ours['peak_rss'] / 2**20:>10.0f} MiB (ingest process; "
          f"{ours['rss_before'] / 2**20:.0f} MiB before ingest; {ours['batches']} batches, the "
          f"largest {ours['batch_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

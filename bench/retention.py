"""Retention: a steady workload for a simulated month; the store's file stops growing.

    .venv/bin/python bench/retention.py [--days 30] [--profiles 10000]
                                        [--fragments-per-hour 500] [--retention-days 7]
                                        [--quick] [--workdir DIR]

The pipeline's own functions on a real SQLite store, delivering over real sockets to an
in-process endpoint on loopback. Every simulated hour: FRAGMENTS-PER-HOUR fragments rewrite a
mapped attribute of random profiles among PROFILES (the profile count stays flat), one pass
decides and delivers them, then the stream run's upkeep (``tasks.lifecycle.upkeep``: the
change log and delivery records past RETENTION-DAYS, in batches of 5,000 rows). The clock
is simulated (the store's ``now_ms`` moves an hour a step), not waited for.

The same workload runs twice in this script: with retention, and the baseline without any
pruning. It prints, per simulated day, the database file's size, the change-log and
delivery-log rows and the free pages, then the figures as ratios: the file with retention
against the baseline at the end, and the growth of each over the last weeks (a file that
reuses its space stops growing once the first RETENTION-DAYS have passed). It also times
every pruning transaction, the longest being how long an ingest could wait for one.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import yaml  # noqa: E402

import state.db  # noqa: E402
from config import load_config  # noqa: E402
from state import open_store  # noqa: E402
from tasks import lifecycle, pipeline  # noqa: E402
from tasks.ingest import ingest_stream  # noqa: E402
from testkit.servers import Endpoint  # noqa: E402

HOUR_MS = 3_600_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class SimulatedClock:
    """Stands in for the ``time`` module inside ``state.db``, whose ``now_ms`` every layer
    uses for commit, delivery and retention times."""

    def __init__(self) -> None:
        self.ms = START_MS

    def time_ns(self) -> int:
        return self.ms * 1_000_000


@dataclass
class Day:
    day: int
    file_mb: float
    wal_mb: float
    changes: int
    deliveries: int
    free_pages: int


@dataclass
class Run:
    days: list[Day] = field(default_factory=list)
    prune_ms: list[float] = field(default_factory=list)
    pruned: int = 0
    fragments: int = 0
    delivered: int = 0
    seconds: float = 0.0


def write_config(work: Path, url: str, retention_days: int) -> Path:
    doc = {"state": "relay.db", "retention_days": retention_days,
           "segments": [{"id": "seg-a"}],
           "destinations": [{"name": "crm", "endpoint": url, "timeout_seconds": 10}],
           "dataflows": [{"name": "crm-stream", "destination": "crm", "segments": ["seg-a"],
                          "attributes": ["personalEmail.address", "person.name.firstName"]}]}
    path = work / "relay.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def fragments(rng: random.Random, profiles: int, count: int, first: bool) -> bytes:
    lines = []
    pids = range(profiles) if first else (rng.randrange(profiles) for _ in range(count))
    for n in pids:
        doc = {"profileId": f"profile-{n:07d}",
               "attributes": {"person": {"name": {"firstName": rng.choice(["Ann", "Bo", "Cy"])}},
                              "personalEmail": {"address": f"p{n}@example.com"},
                              "loyalty": {"points": rng.randrange(10_000)}},
               "identityMap": {"ecid": [{"id": f"ecid-{n:09d}"}]}}
        if first:
            doc["segmentMembership"] = {"ups": {"seg-a": {"status": "realized"}}}
        lines.append(orjson.dumps(doc))
    return b"\n".join(lines) + b"\n"


async def workload(work: Path, args: argparse.Namespace, prune: bool) -> Run:
    clock = SimulatedClock()
    real_time = state.db.time
    state.db.time = clock  # type: ignore[assignment]
    run = Run()
    rng = random.Random(20260101)
    started = time.perf_counter()
    try:
        async with Endpoint(keep_requests=False) as endpoint:
            config = load_config(write_config(work, endpoint.url, args.retention_days))
            flow = config.dataflow("crm-stream")
            store = open_store(config.state_path)
            catalogue = frozenset({"seg-a"})
            ingest_stream(store, io.BytesIO(fragments(rng, args.profiles, 0, True)), "seed",
                          catalogue)
            for hour in range(args.days * 24):
                clock.ms = START_MS + hour * HOUR_MS
                data = fragments(rng, args.profiles, args.fragments_per_hour, False)
                run.fragments += ingest_stream(store, io.BytesIO(data), "hour", catalogue).ingested
                result = await pipeline.run_until_settled(store, config, flow)
                run.delivered += result.delivery.delivered
                if prune:
                    for _ in range(args.polls_per_hour):
                        tick = time.perf_counter()
                        done = lifecycle.upkeep(store, config)
                        count = sum(done.pruned.values())
                        run.pruned += count
                        if count:
                            # one upkeep is up to 3 x PRUNE_BATCHES_PER_POLL transactions
                            run.prune_ms.append((time.perf_counter() - tick) * 1000)
                if hour % 24 == 23:
                    run.days.append(measure(work, store, hour // 24 + 1))
            store.close()
    finally:
        state.db.time = real_time
    run.seconds = time.perf_counter() - started
    return run


def measure(work: Path, store: object, day: int) -> Day:
    db = work / "relay.db"
    wal = work / "relay.db-wal"
    conn = store.db.conn  # type: ignore[attr-defined]
    changes = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
    deliveries = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return Day(day, db.stat().st_size / 1e6, (wal.stat().st_size if wal.exists() else 0) / 1e6,
               changes, deliveries, free)


def growth(days: list[Day], start: int) -> float:
    """Relative growth of the file from the end of day ``start`` to the last day."""
    first = next(d for d in days if d.day == start)
    return days[-1].file_mb / first.file_mb - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--profiles", type=int, default=10_000)
    parser.add_argument("--fragments-per-hour", type=int, default=500)
    parser.add_argument("--retention-days", type=int, default=7)
    parser.add_argument("--polls-per-hour", type=int, default=2,
                        help="upkeep calls per simulated hour (a real stream polls every 2 s)")
    parser.add_argument("--quick", action="store_true",
                        help="10 days, 2 days' retention, 2,000 profiles, 200 fragments/hour")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.days, args.retention_days, args.profiles, args.fragments_per_hour = 10, 2, 2000, 200
    base = args.workdir or Path(tempfile.mkdtemp(prefix="relay-retention-"))
    runs: dict[str, Run] = {}
    for name, prune in (("retention", True), ("baseline", False)):
        work = base / name
        work.mkdir(parents=True, exist_ok=True)
        for old in work.glob("relay.db*"):
            old.unlink()
        print(f"{name}: {args.days} simulated days, {args.profiles:,} profiles, "
              f"{args.fragments_per_hour:,} fragments/hour, "
              + (f"retention {args.retention_days} days" if prune else "nothing pruned"),
              flush=True)
        runs[name] = run = asyncio.run(workload(work, args, prune))
        print(f"  {'day':>4} {'file MB':>8} {'WAL MB':>7} {'changes':>9} {'deliveries':>10} "
              f"{'free pages':>10}")
        for d in run.days:
            print(f"  {d.day:>4} {d.file_mb:>8.1f} {d.wal_mb:>7.1f} {d.changes:>9,} "
                  f"{d.deliveries:>10,} {d.free_pages:>10,}")
        print(f"  {run.fragments:,} fragments, {run.delivered:,} delivered, {run.pruned:,} rows "
              f"pruned, in {run.seconds:.0f} s ({run.fragments / run.seconds:,.0f} fragments/s "
              "with decide and delivery)", flush=True)
    kept, base_run = runs["retention"], runs["baseline"]
    settle = min(args.days, args.retention_days + 3)
    prune_ms = sorted(kept.prune_ms) or [0.0]
    print("\nfigures (retention against the baseline, same workload, same script):")
    print(f"  file at day {args.days}: {kept.days[-1].file_mb:.1f} MB against "
          f"{base_run.days[-1].file_mb:.1f} MB: ratio {kept.days[-1].file_mb / base_run.days[-1].file_mb:.2f}")
    print(f"  file growth from day {settle} to day {args.days}: with retention "
          f"{growth(kept.days, settle):+.1%}, baseline {growth(base_run.days, settle):+.1%}")
    print(f"  change-log rows at day {args.days}: {kept.days[-1].changes:,} against "
          f"{base_run.days[-1].changes:,} ({kept.days[-1].changes / base_run.days[-1].changes:.2f})")
    print(f"  throughput (ingest, decide, deliver, upkeep): "
          f"{kept.fragments / kept.seconds:,.0f} against "
          f"{base_run.fragments / base_run.seconds:,.0f} fragments/s: ratio "
          f"{(kept.fragments / kept.seconds) / (base_run.fragments / base_run.seconds):.2f}")
    print(f"  upkeep calls that pruned: {len(kept.prune_ms):,}; time per call p50 "
          f"{prune_ms[len(prune_ms) // 2]:.1f} ms, max {prune_ms[-1]:.1f} ms (each of its "
          f"transactions holds the write lock for at most {lifecycle.PRUNE_BATCH:,} rows)")
    print(f"work dir {base}")


if __name__ == "__main__":
    main()

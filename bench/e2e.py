"""End-to-end latency: ingest commit -> delivery at the endpoint, against a polling floor.

    .venv/bin/python bench/e2e.py [--seconds 60] [--rates 1000,5000] [--profiles 20000]
                                  [--interval 1] [--every 0.05] [--workdir DIR]

Per rate, everything in its own process, on loopback, one Prefect server for the run:
1. ENDPOINT: ``testkit.servers.Endpoint`` in its own process (``testkit.procs endpoint``);
   it answers 200 and records, per request, the receive time, ``X-Relay-Sequence``,
   ``Idempotency-Key`` and the profile (from the body's identity map).
2. STREAM: ``profile-relay stream --interval INTERVAL --run-seconds 3600`` with
   ``PREFECT_API_URL`` set to the shared server; it registers the dataflow on an empty
   store before ingest starts, so everything it sends is streamed, none backfilled.
3. INGEST: ``testkit.procs ingest`` calls ``tasks.ingest.ingest_stream`` with RATE x EVERY
   fragments every EVERY seconds (about 50 a commit at 1,000/s), each writing the mapped
   attribute ``person.name.firstName`` of one of PROFILES profiles, all members of the
   mapped segment. It runs for SECONDS.
4. FLOOR: ``testkit.procs poll`` reads ``changes`` after its cursor every INTERVAL seconds
   and notes, per row, read time - ``committed_at``. Nothing built on polling at that
   interval can see a change sooner, so this is the floor our latency is compared with.
   It runs at the same time as the stream, against the same file.

Latency of a delivered export = its first receive time at the endpoint - ``committed_at``
of the change whose seq it carries (read from the store afterwards). The stream's log
lines ("N change(s) -> M export(s), cursor C") say when each seq was queued, which splits
the latency into detection (commit -> in the outbox) and dispatch (outbox -> endpoint).

Target: p95 <= 5 s at 1,000 updates/s (our service level).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit import procs as P  # noqa: E402

TARGET_P95_MS = 5_000
TARGET_RATE = 1_000
_BATCH_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO .*: (\d+) change\(s\) -> "
                         r"(\d+) export\(s\), cursor (\d+)")


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "max": float("nan")}
    return {"n": len(values), "p50": P.percentile(values, 50), "p95": P.percentile(values, 95),
            "p99": P.percentile(values, 99), "max": max(values)}


def _log_ms(line: str, ref_ms: int) -> int | None:
    """Epoch ms of a Prefect console log line (local time of day; ``ref_ms`` fixes the
    date)."""
    m = re.match(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \|", line)
    if not m:
        return None
    ref = dt.datetime.fromtimestamp(ref_ms / 1000).astimezone()
    h, mi, s, ms = (int(x) for x in m.groups())
    moment = ref.replace(hour=h, minute=mi, second=s, microsecond=ms * 1000)
    if (moment - ref).total_seconds() < -43_200:
        moment += dt.timedelta(days=1)
    return int(moment.timestamp() * 1000)


def queued_times(stream_log: str, ref_ms: int) -> tuple[list[int], list[int]]:
    """(cursor, time queued in epoch ms) for each micro-batch the stream logged, in order."""
    cursors, times = [], []
    for line in stream_log.splitlines():
        m = _BATCH_LINE.match(line)
        at = _log_ms(line, ref_ms) if m else None
        if m and at is not None:
            cursors.append(int(m.group(3)))
            times.append(at)
    return cursors, times


def run_rate(api: str, server: P.Proc, work: Path, rate: int, seconds: float, profiles: int,
             interval: float, every: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    db = work / "relay.db"
    with P.procs(work / "logs", api) as group:
        ep = group.endpoint(work / "received.tsv")
        config = P.write_config(work, ep.url, timeout_seconds=10)
        stream = group.relay("stream", "stream", "-c", str(config), "--interval", str(interval),
                             "--run-seconds", "3600")
        P.wait_for(lambda: P.dataflow_cursor(db) is not None, 120, 0.1, "the stream to start")
        poller = group.poller(db, interval, seconds + 30, work / "floor.json")
        ingest = group.ingest(config, rate, seconds, profiles, every, stats=work / "ingest.json")
        who = {"stream": stream, "endpoint": ep.proc, "ingest": ingest, "floor poller": poller,
               "prefect server": server}
        cpu0 = {name: P.cpu_seconds(proc.pid) for name, proc in who.items()}
        t0 = time.monotonic()
        time.sleep(seconds * 0.95)
        cpu = {name: (P.cpu_seconds(proc.pid) - cpu0[name]) / (time.monotonic() - t0)
               for name, proc in who.items()}
        ingest.wait(seconds + 120)
        ingested = json.loads((work / "ingest.json").read_text())
        ended = time.time()
        poller.signal_group(15)
        poller.wait(30)
        last_seq = ingested["last_seq"]

        def drained() -> bool:
            if not stream.alive():
                raise RuntimeError(f"the stream exited: {stream.stderr()[-3000:]}")
            cur = P.dataflow_cursor(db) or 0
            left = P.query(db, "SELECT count(*) FROM outbox")[0][0]
            return cur >= last_seq and left == 0

        P.wait_for(drained, 300, 0.1, "the stream to drain")
        drain_s = time.time() - ended
        received = ep.stop()
        stream.stop(timeout=10)
        stream_log = stream.stderr()
    committed = dict(P.query(db, "SELECT seq, committed_at FROM changes"))
    first: dict[str, P.Received] = {}
    for r in received:
        if r.status == 200 and r.key not in first:
            first[r.key] = r
    lat = [r.at_ms - committed[r.seq] for r in first.values()]
    cursors, qtimes = queued_times(stream_log, int(ended * 1000))
    detect, dispatch = [], []
    for r in first.values():
        i = bisect.bisect_left(cursors, r.seq)
        if i < len(cursors):
            detect.append(qtimes[i] - committed[r.seq])
            dispatch.append(r.at_ms - qtimes[i])
    batches = [int(m.group(1)) for m in map(_BATCH_LINE.match, stream_log.splitlines()) if m]
    dispatch_done = [t for t in (_log_ms(line, int(ended * 1000)) for line in stream_log.splitlines()
                                 if "Task run 'dispatch " in line and "Finished" in line)
                     if t is not None]
    passes = [b - a for a, b in itertools.pairwise(dispatch_done)]
    span = (max(r.at_ms for r in first.values()) - min(r.at_ms for r in first.values())) / 1000
    return {
        "rate": rate,
        "interval": interval,
        "ingested": ingested["ingested"],
        "ingest_seconds": ingested["seconds"],
        "commits": ingested["commits"],
        "exports": len(first),
        "duplicates": len([r for r in received if r.status == 200]) - len(first),
        "delivered_per_s": len(first) / max(span, 1e-9),
        "drain_after_ingest_s": drain_s,
        "latency": stats(lat),
        "detect": stats(detect),
        "dispatch": stats(dispatch),
        "floor": stats(json.loads((work / "floor.json").read_text())),
        "batches": len(batches),
        "batch_changes_p50": P.percentile(batches, 50) if batches else 0,
        "batch_changes_max": max(batches) if batches else 0,
        "pass_s": stats([x / 1000 for x in passes]),
        "cpu": cpu,
    }


def fmt(s: dict[str, float]) -> str:
    return (f"p50 {s['p50']:>6,.0f}  p95 {s['p95']:>6,.0f}  p99 {s['p99']:>6,.0f}  "
            f"max {s['max']:>6,.0f} ms")


def report(r: dict) -> None:
    ratio = r["latency"]["p95"] / r["floor"]["p95"]
    print(f"\n== {r['rate']:,} fragments/s for {r['ingest_seconds']:.0f} s: "
          f"{r['ingested']:,} fragments in {r['commits']:,} commits -> {r['exports']:,} exports "
          f"delivered ({r['duplicates']} duplicate receipts)")
    print(f"  delivered rate   {r['delivered_per_s']:>8,.0f} exports/s; drained "
          f"{r['drain_after_ingest_s']:.1f} s after ingest ended; {r['batches']} micro-batches "
          f"(median {r['batch_changes_p50']:,} changes, max {r['batch_changes_max']:,})")
    print(f"  ours  commit->endpoint   {fmt(r['latency'])}")
    print(f"    detect commit->queued  {fmt(r['detect'])}")
    print(f"    dispatch queued->recv  {fmt(r['dispatch'])}")
    print(f"  floor commit->read back  {fmt(r['floor'])}  (polling reader, same interval)")
    print(f"  ratio p95 ours / floor   {ratio:>6.2f}")
    ps = r["pass_s"]
    print(f"  stream passes (dispatch to dispatch): median {ps['p50']:.2f} s, p95 "
          f"{ps['p95']:.2f} s, max {ps['max']:.2f} s (interval {r['interval']:g} s)")
    print("  CPU over the ingest window (cores): " + ", ".join(
        f"{name} {share:.2f}" for name, share in r["cpu"].items())
        + f"; total {sum(r['cpu'].values()):.2f} of {os.cpu_count()}")
    if r["rate"] <= TARGET_RATE:
        ok = r["latency"]["p95"] <= TARGET_P95_MS
        print(f"  target p95 <= {TARGET_P95_MS:,} ms at {TARGET_RATE:,}/s: "
              f"{'ok' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rates", default="1000,5000", help="fragments/s, comma separated")
    parser.add_argument("--rate", type=int, default=None, help="one rate (overrides --rates)")
    parser.add_argument("--profiles", type=int, default=20_000)
    parser.add_argument("--interval", type=float, default=1.0, help="stream --interval")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between commits")
    parser.add_argument("--workdir", default=None, help="keep the files here")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    opts = parser.parse_args()
    rates = [opts.rate] if opts.rate else [int(x) for x in opts.rates.split(",")]
    base = Path(opts.workdir) if opts.workdir else None
    with tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=base) as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        servers: list[P.Proc] = []
        with P.prefect_server(work / "prefect", lean=False, started=servers) as api:
            print(f"Prefect server up in {time.monotonic() - t0:.1f} s ({api})")
            results = []
            for rate in rates:
                results.append(run_rate(api, servers[0], work / f"rate-{rate}", rate, opts.seconds,
                                        opts.profiles, opts.interval, opts.every))
                report(results[-1])
        if opts.json:
            print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Memory soak: the stream flow under steady load for a long time, resident memory each minute.

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 1000] [--profiles 50000]
                                   [--sample-seconds 60] [--workdir DIR]

A real ``profile-relay stream`` process (interval 1 s, run time longer than the soak)
against a recording endpoint, fed at a steady RATE fragments/s by a separate ingest
process, everything on loopback with one Prefect server for the run. Every SAMPLE-SECONDS
it prints the stream process's resident memory (VmRSS) and how far delivery has got. At the
end it compares the last sample with the one at minute 5 (the baseline: by then caches,
imports and Prefect's client are warm) and exits 1 if memory grew by more than 10 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit import procs as P  # noqa: E402

GROWTH_LIMIT = 0.10
BASELINE_MINUTE = 5


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--profiles", type=int, default=50_000)
    parser.add_argument("--sample-seconds", type=float, default=60)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="relay-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    db = work / "relay.db"
    samples: list[tuple[float, float]] = []
    with P.prefect_server(work / "prefect-home") as api, P.procs(work / "logs", api) as group:
        ep = group.endpoint(work / "received.tsv")
        config = P.write_config(work, ep.url, timeout_seconds=10)
        stream = group.relay("stream", "stream", "-c", str(config), "--interval", "1",
                             "--run-seconds", str(seconds + 600))
        P.wait_for(lambda: P.dataflow_cursor(db) is not None, 120, 0.1, "the stream to start")
        group.ingest(config, args.rate, seconds, args.profiles)
        started = time.monotonic()
        print(f"soak: {args.minutes:g} min at {args.rate:g} fragments/s, work dir {work}")
        print(f"{'minute':>7} {'stream RSS MiB':>15} {'received':>10} {'lag (changes)':>14}")
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(args.sample_seconds, max(0.0, seconds - elapsed)))
            if not stream.alive():
                print(f"the stream process died:\n{stream.stderr()[-3000:]}")
                return 1
            minute = (time.monotonic() - started) / 60
            rss = rss_mib(stream.pid)
            samples.append((minute, rss))
            head = P.query(db, "SELECT coalesce(max(seq), 0) FROM changes")[0][0]
            cursor = P.dataflow_cursor(db) or 0
            received = ep.stats().get("received", "?")
            print(f"{minute:7.1f} {rss:15.1f} {received!s:>10} {head - cursor:14d}", flush=True)
    baseline = next((rss for minute, rss in samples if minute >= BASELINE_MINUTE), None)
    if baseline is None or len(samples) < 2:
        print(f"too short to judge: the baseline is the sample at minute {BASELINE_MINUTE}")
        return 0
    growth = samples[-1][1] / baseline - 1
    verdict = "ok" if growth <= GROWTH_LIMIT else "GREW"
    print(f"resident memory: minute {BASELINE_MINUTE} {baseline:.1f} MiB, end "
          f"{samples[-1][1]:.1f} MiB, growth {growth:+.1%} (limit +{GROWTH_LIMIT:.0%}): {verdict}")
    return 0 if growth <= GROWTH_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())

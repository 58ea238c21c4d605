"""Batching benchmark: profiles delivered per second with ``batch.max_profiles: 500``,
beside one export per request, measured in the same run against the same local endpoint.

    .venv/bin/python bench/batch.py [--n N] [--quick] [--repeats R] [--max-profiles M]
        [--concurrency C] [--no-uvloop]

1. ENDPOINT: the raw ``asyncio.Protocol`` HTTP/1.1 keep-alive server of
   ``bench/dispatch.py`` in its own process (pinned to the second CPU when there is one);
   it reads each body whole and answers ``200 ok``.
2. STORE: ``bench/dispatch.py``'s store: N profiles of about 1 KB each, one fragment each,
   ingested in an order shuffled against their ids, and the outbox holding one export per
   profile. Each run drains its own copy of that file.
3. Alternating, R times (medians shown), each in a fresh child process pinned to ONE CPU
   (``sched_setaffinity``), timed over the whole ``tasks.dispatch.drain``: claiming the
   outbox, loading and rendering each profile, framing the batches, sending, and
   recording every export's outcome (delivery log, outbox, delivered seq):
   - one per request: the default destination (``max_profiles: 1``), the seed's body;
   - batched: ``batch: {max_profiles: M, format: json_array}``;
   - batched, NDJSON: ``format: ndjson``;
   - batched + template: ``json_array`` with a template that reshapes each export (a CRM
     contact: id, email, names, segment ids), to show what the sandboxed Jinja costs.
   All keep the destination's default rate limit (10,000 requests/s) and
   ``max_in_flight: C``.

The table also splits each profile's wall-clock time: the store calls (claim, load,
record, timed around the Store's methods), rendering (``tasks.body.render``, template
included) and the rest (keys, framing, HTTP, garbage collection).

Checks after every run: each profile delivered exactly once (delivery log, outbox empty,
delivered_seq = exported_seq), and the endpoint served the expected number of requests.

Target (issue 15): >= 100,000 profiles/s with ``max_profiles: 500`` on one core.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dispatch as base  # noqa: E402  (bench/dispatch.py: endpoint, store, child plumbing)

TARGET = 100_000
TEMPLATE = ('{"id": {{ profile_id | tojson }}, '
            '"email": {{ profile.personalEmail.address | tojson }}, '
            '"firstName": {{ profile.person.name.firstName | tojson }}, '
            '"lastName": {{ profile.person.name.lastName | tojson }}, '
            '"segments": {{ profile.segmentMembership.ups | list | tojson }}}')


def config_for(url: str, concurrency: int, batch: dict | None, template: str | None) -> Any:
    from config import parse_config

    dest: dict[str, Any] = {"name": base.DEST, "endpoint": url, "max_in_flight": concurrency,
                            "timeout_seconds": 60, "rate_limit": 10_000}
    if batch:
        dest["batch"] = batch
    if template:
        dest["template"] = template
    return parse_config({
        "segments": [{"id": base.SEGMENT, "name": "Segment A"}],
        "destinations": [dest],
        "dataflows": [{"name": base.FLOW, "destination": base.DEST, "segments": [base.SEGMENT],
                       "attributes": base.ATTRIBUTES}],
    })


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def child(url: str, db_path: str, concurrency: int, use_uvloop: bool, batch: dict | None,
          template: str | None, barrier: Any, out: Any) -> None:
    pin(0)
    from destinations.ratelimit import TokenBucket, rate_limit_for
    from destinations.retry import RetryPolicy
    from destinations.sender import Sender
    from state import open_store
    from tasks import dispatch, pipeline
    from tasks.dispatch import drain

    config = config_for(url, concurrency, batch, template)
    flow = config.dataflow(base.FLOW)
    dest = config.destination(base.DEST)
    store = open_store(db_path)
    spec = pipeline.body_spec(store, config, flow)
    policy = RetryPolicy.for_destination(dest)
    requests = 0
    body_bytes = 0
    # where the time goes (wall clock, one core): the store calls and rendering
    phases = {"claim_due": 0.0, "load_profiles": 0.0, "record_outcomes": 0.0, "render": 0.0}
    base.time_calls(phases, store, ["claim_due", "load_profiles", "record_outcomes"])
    base.time_calls(phases, dispatch, ["render"])  # the one body builder, as drain calls it

    class Counting(Sender):
        async def send(self, body, idempotency_key, extra_headers=None, **kw):  # type: ignore[override]
            nonlocal requests, body_bytes
            requests += 1
            body_bytes += len(body)
            return await Sender.send(self, body, idempotency_key, extra_headers, **kw)

    async def run() -> dict:
        async with Counting(dest) as sender:
            bucket = TokenBucket(rate_limit_for(base.FLOW, dest))
            barrier.wait()
            cpu = base.cpu_seconds()
            start = time.monotonic()
            summary = await drain(store, base.FLOW, spec, policy, sender, bucket,
                                  dest.max_in_flight)
            end = time.monotonic()
            cpu = base.cpu_seconds() - cpu
        return {"start": start, "end": end, "sent": summary.sent, "ok": summary.delivered,
                "failed": summary.failed, "last_error": summary.last_error, "cpu": cpu,
                "requests": requests, "bytes": body_bytes, "phases": phases}

    with base._runner(use_uvloop) as runner:
        out.put(runner.run(run()))


def endpoint_main(conn: Any, use_uvloop: bool) -> None:
    pin(1)
    base.server_main(conn, use_uvloop)


class PinnedEndpoint(base.Endpoint):
    def __init__(self, ctx: Any, use_uvloop: bool) -> None:
        self._conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=endpoint_main, args=(theirs, use_uvloop), daemon=True)
        self.proc.start()
        self.port = self._conn.recv()
        self.url = f"http://127.0.0.1:{self.port}/ingest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="profiles per run (100,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N=20,000, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of alternating runs")
    parser.add_argument("--max-profiles", type=int, default=500, help="batch.max_profiles")
    parser.add_argument("--concurrency", type=int, default=64, help="max_in_flight")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument("--workdir", default=None, help="keep the files here")
    opts = parser.parse_args()
    n = 20_000 if opts.quick else opts.n
    repeats = 1 if opts.quick else opts.repeats
    m, c = opts.max_profiles, opts.concurrency
    use_uvloop = base.have_uvloop() and not opts.no_uvloop
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    ctx = mp.get_context("spawn")
    modes: list[tuple[str, dict | None, str | None]] = [
        ("one per request", None, None),
        (f"batched {m}, json_array", {"max_profiles": m}, None),
        (f"batched {m}, ndjson", {"max_profiles": m, "format": "ndjson"}, None),
        (f"batched {m} + template", {"max_profiles": m}, TEMPLATE),
    ]

    with tempfile.TemporaryDirectory(prefix="bench-batch-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        template_db = work / "template.db"
        t = time.perf_counter()
        mean_body = base.fill_store(template_db, n)
        print(f"outbox: {n:,} exports of {mean_body:.0f} B, filled in "
              f"{time.perf_counter() - t:.1f} s; {c} in flight; "
              f"{'uvloop' if use_uvloop else 'asyncio'}; client pinned to CPU 0, endpoint to "
              f"CPU 1 ({os.cpu_count()} CPUs)", flush=True)
        endpoint = PinnedEndpoint(ctx, use_uvloop)
        db_path = work / "run.db"
        runs: dict[str, list[dict]] = {}
        problems: list[str] = []
        for r in range(repeats):
            print(f"round {r + 1}/{repeats}", flush=True)
            for label, batch, template in modes:
                base.copy_store(template_db, db_path)
                before = endpoint.count()
                [res] = base.run_children(ctx, [(child, (endpoint.url, str(db_path), c,
                                                         use_uvloop, batch, template))])
                served = endpoint.count() - before
                seconds = res["end"] - res["start"]
                per = 1e6 / max(res["ok"], 1)
                row = {"pps": res["ok"] / seconds, "rps": res["requests"] / seconds,
                       "seconds": seconds, "cpu_us": res["cpu"] * per,
                       "requests": res["requests"], "mean_body": res["bytes"] / max(
                           res["requests"], 1),
                       **{f"{k}_us": v * per for k, v in res["phases"].items()}}
                runs.setdefault(label, []).append(row)
                if res["ok"] != n or res["failed"]:
                    problems.append(f"{label}: {res['ok']} delivered, {res['failed']} failed "
                                    f"({res['last_error']}), expected {n}")
                if served != res["requests"]:
                    problems.append(f"{label}: the endpoint served {served} requests, the "
                                    f"sender made {res['requests']}")
                if batch and res["requests"] > math.ceil(n / m) + 1:
                    problems.append(f"{label}: {res['requests']} requests for {n} exports "
                                    f"in batches of {m}")
                problems.extend(base.check_delivered(db_path, n, label))
                print(f"  {label:<28} {row['pps']:>9,.0f} profiles/s  {row['rps']:>7,.0f} "
                      f"req/s  {row['requests']:>6,} requests of {row['mean_body'] / 1024:,.0f} "
                      f"KiB  {row['cpu_us']:.1f} us CPU/profile  "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        endpoint.stop()

        def med(label: str, key: str) -> float:
            return statistics.median(x[key] for x in runs[label])

        one = med("one per request", "pps")
        print()
        print(f"{'':<28} {'':>10} {'':>7} {'':>7} {'':>11}  {'wall-clock us per profile':^34}")
        print(f"{'mode':<28} {'profiles/s':>10} {'x one':>7} {'req/s':>7} {'CPU us/prof':>11}  "
              + "".join(f"{h:>6} " for h in ("claim", "load", "render", "record", "rest"))
              + " runs (profiles/s)")
        for label, rows in runs.items():
            pps = med(label, "pps")
            spread = ", ".join(f"{x['pps']:,.0f}" for x in rows)
            parts = [med(label, f"{k}_us") for k in ("claim_due", "load_profiles", "render",
                                                      "record_outcomes")]
            rest = 1e6 / pps - sum(parts)
            print(f"{label:<28} {pps:>10,.0f} {pps / one:>7.1f} {med(label, 'rps'):>7,.0f} "
                  f"{med(label, 'cpu_us'):>11.1f}  "
                  + "".join(f"{x:>6.1f} " for x in (*parts, rest)) + f" {spread}")
        batched = med(f"batched {m}, json_array", "pps")
        print(f"medians of {repeats} run(s) of {n:,} profiles each, one client process on one "
              "CPU; CPU is that process's user + system time (SQLite included) per profile; "
              "claim, load and record are the store calls, render the body builder (template "
              "included), rest everything else (keys, framing, HTTP, garbage collection)")
        print(f"batched {m} / one per request: {batched / one:.1f}x; "
              f"batched {m}: {batched:,.0f} profiles/s   target >= {TARGET:,}: "
              f"{'ok' if batched >= TARGET else 'BELOW TARGET'}")
        if problems:
            print("PROBLEMS:")
            for p in problems:
                print(f"  {p}")
        else:
            print("checks: every run delivered each profile once (delivery log, outbox empty, "
                  "delivered_seq = exported_seq); the endpoint served every request made")


if __name__ == "__main__":
    main()

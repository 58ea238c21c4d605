"""Scaling benchmark: one dataflow streamed by 1, 2 and 4 shard groups on PostgreSQL, side
by side with the embedded SQLite store in one process, in the same run.

    .venv/bin/python bench/groups.py [--n N] [--quick] [--repeats R] [--groups 1,2,4]
        [--latency-ms 20] [--concurrency C] [--no-uvloop]

1. POSTGRESQL: a throwaway server (``testkit.postgres``, durability off as in the tests)
   with ``pg_stat_statements`` loaded, to count the statements the relay sends.
2. STORES: N profiles (one ~1 KB fragment each, ingested in an order shuffled against
   their ids) for a dataflow already synced, so all N are changes after its cursor: each
   run decides them (the stream's micro-batches) and delivers them, as a stream does in
   steady state. PostgreSQL: a template database, copied for each run; SQLite: a template
   file, copied for each run.
3. ENDPOINTS: the raw asyncio HTTP/1.1 endpoint of ``bench/dispatch.py`` in its own
   process, answering at once ("fast"), and the same answering each request after a fixed
   LATENCY-MS ("slow": a real endpoint's round trip, where one process's in-flight bound,
   not its CPU, sets the rate).
4. MODES, alternating, R times (medians shown): ``sqlite``, one process on the SQLite
   store (``pipeline.run_until_settled``, what ``stream`` does on one machine); ``pg xG``,
   G processes, each taking the lease of group i of G (``tasks.groups.Groups``: the leases
   renewed in the background, the rate share read at renewal) and running the same
   pipeline on its group's view of the store. The dataflow's ``rate_limit`` is the seed's
   10,000/s, shared between the groups.

Figures per mode: requests/s (wall time from the moment every process holds its lease to
the last one settled), CPU-seconds per 1,000 requests of the relay processes (user +
system, all threads) and of the PostgreSQL server (the postmaster's and its backends',
exited ones included), and PostgreSQL statements per request (``pg_stat_statements``
calls in the run's database, BEGIN and COMMIT included). Every run checks that each
profile was delivered exactly once (endpoint count, outbox empty).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for path in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dispatch as base  # noqa: E402  (bench/dispatch.py: endpoint, fragments, event loop)

STATEMENTS_SETTINGS = "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=10000"
RUN_DB = "run"
TEMPLATE_DB = "template_groups"
CPU_FLAT = 0.2  # the bar: CPU per request within 20 % from 1 to 4 groups


# --- filling the stores -----------------------------------------------------------------


def fill(store: Any, n: int) -> None:
    """n profiles, one fragment each, as changes after the cursor of a synced dataflow."""
    import io

    from tasks import pipeline
    from tasks.ingest import ingest_stream

    config = base.bench_config()
    flow = config.dataflow(base.FLOW)
    pipeline.sync(store, config, flow)
    for job in store.open_backfills(base.FLOW):
        pipeline.backfill(store, flow, job)  # an empty store: nothing to backfill
    numbers = base.profile_numbers(n)
    for start in range(0, n, base.FILL_BATCH):
        lines = b"".join(base.fragment_for(numbers[i])
                         for i in range(start, min(n, start + base.FILL_BATCH)))
        ingest_stream(store, io.BytesIO(lines), "bench", frozenset({base.SEGMENT}),
                      batch_lines=base.FILL_BATCH)
    assert store.head_seq() - (store.cursor(base.FLOW) or 0) == n


# --- the measured processes -------------------------------------------------------------


def relay_child(url: str, state: str, index: int, count: int, concurrency: int,
                use_uvloop: bool, ready: Any, go: Any, out: Any) -> None:
    """One relay process: the whole store (count 0) or group ``index`` of ``count``."""
    from state import open_store
    from tasks import pipeline
    from tasks.groups import Groups

    config = base.bench_config(url, concurrency)
    flow = config.dataflow(base.FLOW)
    store = open_store(state)
    logger = logging.getLogger("bench")
    # the stores were filled for another endpoint URL: sync says so at WARNING every run
    logging.getLogger("profile_relay").setLevel(logging.ERROR)

    async def run() -> dict:
        groups = renewer = None
        view = store
        if count:
            groups = Groups.plan(store, [base.FLOW], index, count, owner=f"bench-{os.getpid()}")
            if not await groups.take(30):
                raise RuntimeError(f"group {index} of {count}: its lease is held")
            renewer = asyncio.create_task(groups.keep_renewed(logger))
            view = groups.view(base.FLOW)
        await asyncio.to_thread(ready.wait)
        await asyncio.to_thread(go.wait)
        cpu = base.cpu_seconds()
        start = time.monotonic()
        result = await pipeline.run_until_settled(view, config, flow)
        end = time.monotonic()
        cpu = base.cpu_seconds() - cpu
        if groups is not None and renewer is not None:
            renewer.cancel()
            if groups.lost:
                raise RuntimeError(f"group {index} of {count} lost its lease: {groups.lost}")
            groups.release()
        return {"start": start, "end": end, "cpu": cpu, "sent": result.delivery.sent,
                "delivered": result.delivery.delivered, "pending": view.pending_count(base.FLOW)}

    with base._runner(use_uvloop) as runner:
        out.put(runner.run(run()))
    store.close()


def run_children(ctx: Any, specs: list[tuple], before_go: Any) -> list[dict]:
    """Start the processes; once all hold their leases, ``before_go()`` and release them."""
    ready, go, out = ctx.Barrier(len(specs) + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=relay_child, args=(*args, ready, go, out)) for args in specs]
    for p in procs:
        p.start()
    ready.wait(120)
    before_go()
    go.set()
    return base.collect(procs, out)


# --- the PostgreSQL server's side -------------------------------------------------------


def _ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` (the reaped children's CPU included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15])


def server_cpu(postmaster: int) -> float:
    """CPU-seconds of the PostgreSQL server so far: the postmaster, its live processes
    (backends, checkpointer, WAL writer...) and those it has reaped."""
    total = _ticks(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def statements(server: Any, database: str) -> int:
    """Statements ``pg_stat_statements`` has counted in ``database`` since its reset."""
    import psycopg

    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s "
                           "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                           (database,)).fetchone()
    return int(row[0]) if row else 0


def reset_statements(server: Any) -> None:
    server.execute("SELECT pg_stat_statements_reset()")


# --- the runs ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="profiles per run (default 20,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N=4,000, 1 repeat")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of the alternating runs; the table shows medians")
    parser.add_argument("--groups", default="1,2,4", help="group counts to run (default 1,2,4)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="the slow endpoint's fixed latency (default 20 ms)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="max_in_flight of the destination, per process (default 64)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    opts = parser.parse_args()
    n = 4_000 if opts.quick else opts.n
    repeats = 1 if opts.quick else opts.repeats
    counts = [int(g) for g in opts.groups.split(",")]
    c = opts.concurrency
    use_uvloop = base.have_uvloop() and not opts.no_uvloop
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    ctx = mp.get_context("spawn")

    from state import open_store
    from testkit.postgres import PostgresServer

    with tempfile.TemporaryDirectory(prefix="bench-groups-") as tmp, \
            PostgresServer(settings=STATEMENTS_SETTINGS) as server:
        work = Path(tmp)
        server.execute("CREATE EXTENSION pg_stat_statements")
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        t = time.perf_counter()
        sqlite_template = work / "template.db"
        store = open_store(sqlite_template)
        fill(store, n)
        store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        store = open_store(server.create_database(TEMPLATE_DB))
        fill(store, n)
        store.close()
        print(f"{n:,} profiles of ~1 KB as changes to stream, filled in both stores in "
              f"{time.perf_counter() - t:.1f} s; {c} in flight per process; "
              f"{'uvloop' if use_uvloop else 'asyncio'}; {os.cpu_count()} CPUs", flush=True)

        endpoints = {"fast": base.Endpoint(ctx, use_uvloop),
                     f"{opts.latency_ms:g} ms": base.Endpoint(ctx, use_uvloop,
                                                             opts.latency_ms / 1000)}
        runs: dict[tuple[str, str], list[dict]] = {}
        problems: list[str] = []

        def run(endpoint: str, mode: str, groups: int) -> None:
            ep = endpoints[endpoint]
            if groups:
                server.drop_database(RUN_DB)
                state = server.create_database(RUN_DB, template=TEMPLATE_DB)
                specs = [(ep.url, state, i, groups, c, use_uvloop) for i in range(groups)]
            else:
                state = str(work / "run.db")
                base.copy_store(sqlite_template, Path(state))
                specs = [(ep.url, state, 0, 0, c, use_uvloop)]
            marks: dict[str, float] = {}

            def before_go() -> None:
                if groups:
                    reset_statements(server)
                    marks["server"] = server_cpu(postmaster)

            served = ep.count()
            results = run_children(ctx, specs, before_go)
            served = ep.count() - served
            m = {"seconds": max(r["end"] for r in results) - min(r["start"] for r in results),
                 "sent": sum(r["sent"] for r in results), "cpu": sum(r["cpu"] for r in results)}
            m["rps"] = m["sent"] / m["seconds"]
            m["cpu_k"] = m["cpu"] / m["sent"] * 1000
            if groups:
                time.sleep(0.5)  # the backends of the closed pools are reaped
                m["server_k"] = (server_cpu(postmaster) - marks["server"]) / m["sent"] * 1000
                m["stmts"] = statements(server, RUN_DB) / m["sent"]
            delivered = sum(r["delivered"] for r in results)
            pending = sum(r["pending"] for r in results)
            if delivered != n or served != n or pending:
                problems.append(f"{endpoint} {mode}: {delivered:,} delivered, endpoint served "
                                f"{served:,}, {pending} pending; expected {n:,} once each")
            runs.setdefault((endpoint, mode), []).append(m)
            extra = (f"  server {m['server_k']:.2f} CPU-s/1k  {m['stmts']:.2f} stmts/req"
                     if groups else "")
            print(f"  {endpoint:<6} {mode:<7} {m['rps']:>7,.0f} req/s  relay {m['cpu_k']:.2f} "
                  f"CPU-s/1k{extra}  (load average {os.getloadavg()[0]:.1f})", flush=True)

        for r in range(repeats):
            print(f"round {r + 1}/{repeats}", flush=True)
            for endpoint in endpoints:
                run(endpoint, "sqlite", 0)
                for g in counts:
                    run(endpoint, f"pg x{g}", g)
        for ep in endpoints.values():
            ep.stop()

    def med(key: tuple[str, str], field: str) -> float:
        return statistics.median(m[field] for m in runs[key])

    print()
    print(f"{'endpoint':<8} {'mode':<7} {'req/s':>7} {'x sqlite':>8} {'relay CPU-s/1k':>14} "
          f"{'x 1 group':>9} {'PG CPU-s/1k':>11} {'stmts/req':>9}  runs (req/s)")
    verdicts = []
    for endpoint in endpoints:
        sqlite_rps = med((endpoint, "sqlite"), "rps")
        first = (endpoint, f"pg x{counts[0]}")
        for (ep, mode), ms in runs.items():
            if ep != endpoint:
                continue
            key = (ep, mode)
            spread = ", ".join(f"{m['rps']:,.0f}" for m in ms)
            pg = mode != "sqlite"
            print(f"{ep:<8} {mode:<7} {med(key, 'rps'):>7,.0f} {med(key, 'rps') / sqlite_rps:>8.2f} "
                  f"{med(key, 'cpu_k'):>14.2f} "
                  f"{(med(key, 'cpu_k') / med(first, 'cpu_k') if pg else float('nan')):>9.2f} "
                  f"{(med(key, 'server_k') if pg else float('nan')):>11.2f} "
                  f"{(med(key, 'stmts') if pg else float('nan')):>9.2f}  {spread}")
        ratios = [med((endpoint, f"pg x{g}"), "cpu_k") / med(first, "cpu_k") for g in counts]
        flat = all(abs(r - 1) <= CPU_FLAT for r in ratios)
        verdicts.append(f"{endpoint}: relay CPU per request with {counts} groups is "
                        f"{', '.join(f'{r:.2f}' for r in ratios)} times that of {counts[0]} "
                        f"group(s) (target within {CPU_FLAT:.0%}): {'ok' if flat else 'NOT FLAT'}")
    print(f"medians of {repeats} run(s) of {n:,} profiles each; relay CPU is the relay "
          "processes' user + system time; PG CPU the server's; statements counted by "
          "pg_stat_statements (BEGIN/COMMIT included)")
    for v in verdicts:
        print(v)
    if problems:
        print("PROBLEMS:")
        for p in problems:
            print(f"  {p}")
        sys.exit(1)
    print("checks: in every run each profile was delivered once (endpoint count, delivered "
          "count, nothing pending)")


if __name__ == "__main__":
    main()

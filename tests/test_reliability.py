"""Crash, outage and concurrency checks with real processes (the README's "Guarantees").

Every check runs `profile-relay` as child processes against one SQLite file, with a
recording endpoint in its own process and a steady ingest driver (``testkit.procs``), all
talking to ONE Prefect server started for this module. Afterwards the endpoint's record
and the store are compared with the export rules:

* every eligible profile's latest state reached the endpoint (its last 200-answered
  ``X-Relay-Sequence`` equals the profile's last mapped-write seq, which the dataflow
  exported and recorded as delivered);
* per profile, the sequences the endpoint saw never went backwards;
* an ``Idempotency-Key`` arrives twice only where a kill could have cut that request off;
* the outbox is empty, and the failed store is empty or fully resolved by replay.

The default run keeps one short case of each kind; ``-m slow`` runs the long ones (20+
kills, the issue's 2 min + 1 min outage, several minutes of concurrent processes).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit import procs as P

pytestmark = pytest.mark.timeout(1800)

MAX_IN_FLIGHT = 64


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect server for every process of this module."""
    with P.prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@dataclass
class Run:
    dir: Path
    group: P.Procs
    ep: P.EndpointProc
    config: Path
    db: Path

    def cursor(self) -> int:
        return P.dataflow_cursor(self.db) or 0

    def outbox_left(self) -> int:
        return P.query(self.db, "SELECT count(*) FROM outbox")[0][0]

    def max_seq(self) -> int:
        return P.query(self.db, "SELECT coalesce(max(seq), 0) FROM changes")[0][0]

    def stream(self, interval: float = 0.5) -> P.Proc:
        return self.group.relay("stream", "stream", "-c", str(self.config), "--interval",
                                str(interval), "--run-seconds", "900")

    def wait_working(self, proc: P.Proc, timeout: float = 60) -> None:
        """Until a (re)started stream has done something: moved the cursor or sent."""
        c0, n0 = self.cursor(), self.ep.stats()["received"]

        def working() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited: {proc.stderr()[-3000:]}")
            return self.cursor() > c0 or self.ep.stats()["received"] > n0

        P.wait_for(working, timeout, 0.05, f"{proc.name} to start working")

    def wait_drained(self, proc: P.Proc, timeout: float = 120) -> None:
        def drained() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited: {proc.stderr()[-3000:]}")
            return self.cursor() >= self.max_seq() and self.outbox_left() == 0

        P.wait_for(drained, timeout, 0.1, "the stream to catch up")

    def once(self, name: str = "final") -> P.Proc:
        proc = self.group.run_relay(name, "stream", "-c", str(self.config), "--once",
                                    timeout=300)
        assert proc.popen.returncode == 0, proc.stderr()[-3000:]
        return proc

    def replay(self, name: str = "replay", endpoint_flapping: bool = False) -> dict:
        """Run `profile-relay replay`: exit 0, or 3 (exports back in the failed store)
        while the endpoint is told to fail now and then."""
        proc = self.group.run_relay(name, "replay", "-c", str(self.config), "--dataflow",
                                    P.FLOW, timeout=300)
        allowed = (0, 3) if endpoint_flapping else (0,)
        assert proc.popen.returncode in allowed, proc.stderr()[-3000:]
        return json.loads(_last_json(proc.stdout()))


def _last_json(text: str) -> str:
    """The JSON object `print_json` wrote last (it may span lines)."""
    text = text.rstrip()
    start = text.rfind("\n{")
    return text[start + 1:] if start >= 0 else text


def register(config: Path) -> None:
    """Create the dataflow on the empty store, as a first stream run would, so every
    fragment ingested afterwards is streamed (none backfilled)."""
    from config import load_config
    from state import open_store
    from tests.relay_fixtures import decide

    cfg = load_config(config)
    db = open_store(cfg.state_path)
    try:
        decide(db, cfg)
    finally:
        db.close()


@contextmanager
def relay_run(api: str, directory: Path, mode: str = "ok", **dest: object) -> Iterator[Run]:
    with P.procs(directory / "logs", api) as group:
        ep = group.endpoint(directory / "received.tsv", mode=mode)
        config = P.write_config(directory, ep.url, max_in_flight=MAX_IN_FLIGHT, **dest)
        register(config)
        yield Run(directory, group, ep, config, directory / "relay.db")


# --- checks -------------------------------------------------------------------------------


def eligible_profiles(db: Path) -> dict[str, int]:
    """Members of the mapped segment -> the seq of their last mapped-attribute write."""
    last_write = dict(P.query(db, "SELECT profile_id, max(seq) FROM changes WHERE attr_paths "
                                  "LIKE '%person.name.firstName%' GROUP BY profile_id"))
    members = [pid for (pid,) in P.query(
        db, "SELECT profile_id FROM profile_segments WHERE segment_id = ? AND status IN "
            "('realized', 'existing')", P.SEGMENT)]
    return {pid: last_write[pid] for pid in members}


def check_decided(run: Run) -> dict[str, int]:
    """No lost change: the cursor reached the end of the change log, and each eligible
    profile's last mapped write was exported. Returns the eligible profiles."""
    eligible = eligible_profiles(run.db)
    assert eligible, "nothing was ingested"
    assert run.cursor() == run.max_seq()
    exported = dict(P.query(run.db, "SELECT profile_id, exported_seq FROM dataflow_profiles "
                                    "WHERE dataflow = ?", P.FLOW))
    behind = {p: (s, exported.get(p)) for p, s in eligible.items() if exported.get(p) != s}
    assert not behind, f"{len(behind)} profile(s) whose last change was not exported: " \
                       f"{list(behind.items())[:5]}"
    return eligible


def check_delivered(run: Run, records: list[P.Received], eligible: dict[str, int],
                    max_duplicates: int | None) -> dict[str, int]:
    """Latest state delivered to the endpoint and recorded so; order per profile; keys;
    duplicates; nothing left in the outbox or failed."""
    assert run.outbox_left() == 0
    open_failed = P.query(run.db, "SELECT count(*) FROM failed_requests WHERE state = 'failed'")
    assert open_failed[0][0] == 0
    ok = [r for r in records if r.status == 200]
    seen: dict[str, list[int]] = defaultdict(list)
    for r in ok:
        seen[r.profile].append(r.seq)
    missing = {p: (s, seen[p][-1] if seen.get(p) else None)
               for p, s in eligible.items() if not seen.get(p) or seen[p][-1] != s}
    assert not missing, f"{len(missing)} profile(s) whose latest state is not the last one " \
                        f"the endpoint got (want, got): {list(missing.items())[:5]}"
    backwards = {p: seqs for p, seqs in seen.items()
                 if any(b < a for a, b in itertools.pairwise(seqs))}
    assert not backwards, f"{len(backwards)} profile(s) went backwards at the endpoint: " \
                          f"{[(p, s[-8:]) for p, s in list(backwards.items())[:3]]}"
    exports_of_key: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for r in records:
        exports_of_key[r.key].add((r.profile, r.seq))
    shared = {k: v for k, v in exports_of_key.items() if len(v) > 1 or k == "-"}
    assert not shared, f"an Idempotency-Key used for several exports: {list(shared.items())[:3]}"
    delivered = dict(P.query(run.db, "SELECT profile_id, delivered_seq FROM dataflow_profiles "
                                     "WHERE dataflow = ?", P.FLOW))
    unrecorded = {p: s for p, s in eligible.items() if delivered.get(p) != s}
    assert not unrecorded, f"delivered but not recorded: {list(unrecorded.items())[:5]}"
    keys: dict[str, int] = defaultdict(int)
    for r in ok:
        keys[r.key] += 1
    duplicates = sum(n - 1 for n in keys.values())
    if max_duplicates is not None:
        assert duplicates <= max_duplicates, (
            f"{duplicates} duplicate deliveries, more than the {max_duplicates} that requests "
            "in flight at the kills could explain")
    return {"profiles": len(eligible), "requests": len(records), "delivered": len(ok),
            "duplicates": duplicates}


def no_locked_errors(run: Run) -> None:
    for proc in run.group.started:
        text = proc.stderr()
        assert "database is locked" not in text.lower(), f"{proc.name}: {text[-3000:]}"


# --- crash: kill -9 the stream under steady ingest ---------------------------------------


def crash_run(api: str, directory: Path, kills: int, rate: float, profiles: int,
              seed: int) -> dict:
    rng = random.Random(seed)
    with relay_run(api, directory, retry_backoff_seconds=0.1) as run:
        ingest = run.group.ingest(run.config, rate, 1200, profiles, seed=seed)
        moments = []
        for i in range(kills):
            stream = run.stream()
            run.wait_working(stream)
            delay = rng.uniform(0.3, 3.0)
            time.sleep(delay)
            before = run.ep.stats()
            stream.kill9()
            gap_ms = time.time_ns() // 1_000_000 - before["last_ms"]
            moments.append({"kill": i + 1, "after_s": round(delay, 2),
                            "last_request_ms_before": gap_ms, "cursor": run.cursor(),
                            "outbox": run.outbox_left()})
        stream = run.stream()  # the restart after the last kill, still under ingest
        run.wait_working(stream)
        time.sleep(1.0)
        ingest.stop()
        assert ingest.popen.returncode == 0, ingest.stderr()[-2000:]
        run.wait_drained(stream)
        stream.stop()
        run.once()
        records = run.ep.stop()
        no_locked_errors(run)
        eligible = check_decided(run)
        summary = check_delivered(run, records, eligible,
                                  max_duplicates=kills * MAX_IN_FLIGHT)
        assert P.query(run.db, "SELECT count(*) FROM failed_requests")[0][0] == 0
        summary["kills"] = kills
        summary["kills_with_requests_in_last_100ms"] = sum(
            m["last_request_ms_before"] <= 100 for m in moments)
        summary["kills_with_outbox_nonempty"] = sum(m["outbox"] > 0 for m in moments)
        print(json.dumps({"summary": summary, "kills": moments}))
        return summary


def test_kill9_once_and_restart(prefect_api: str, tmp_path: Path) -> None:
    """One kill -9 at a random moment of a working stream, a restart, then --once."""
    crash_run(prefect_api, tmp_path, kills=1, rate=2000, profiles=3000, seed=11)


@pytest.mark.slow
def test_kill9_many_times_under_ingest(prefect_api: str, tmp_path: Path) -> None:
    """At least 20 kills -9 at random moments (0.3-3 s into the work), restarting each time."""
    summary = crash_run(prefect_api, tmp_path, kills=24, rate=2000, profiles=5000, seed=7)
    assert summary["kills_with_requests_in_last_100ms"] >= 1


# --- outage: refused, then 500, then recovered ------------------------------------------


_BREAKER_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| WARNING .*delivery (paused|resumed)")


def breaker_lines(text: str) -> list[tuple[int, str]]:
    """(epoch ms, "paused" or "resumed") of the stream's breaker WARNING lines (Prefect
    prints UTC wall-clock times of today)."""
    day = int(time.time() // 86_400) * 86_400_000
    return [(day + ((int(h) * 60 + int(m)) * 60 + int(sec)) * 1000 + int(ms), what)
            for h, m, sec, ms, what in
            (mt.groups() for mt in map(_BREAKER_LINE.match, text.splitlines()) if mt)]


def outage_run(api: str, directory: Path, refuse_s: float, error_s: float, rate: float,
               profiles: int, backoff: float, probe_s: float,
               redeliver_after: list[float]) -> dict:
    """Steady ingest and a stream; the endpoint refuses connections, then answers 500,
    then recovers. The breaker pauses delivery (probes only), the failed store is
    redelivered on its schedule, and after recovery every profile's latest state arrives
    in order with nothing left anywhere, without a replay by hand."""
    with relay_run(api, directory, retry_backoff_seconds=backoff, timeout_seconds=2,
                   max_retry_after_seconds=5, probe_seconds=probe_s,
                   redeliver_after=redeliver_after) as run:
        ingest = run.group.ingest(run.config, rate, 1200, profiles, seed=3)
        stream = run.stream(interval=1.0)
        run.wait_working(stream)
        P.wait_for(lambda: run.ep.stats()["ok"] > 0, 60, what="a first delivery")
        down_at = time.time()
        run.ep.set_mode("refuse")
        time.sleep(refuse_s)
        run.ep.set_mode("error")
        time.sleep(error_s)
        received_in_outage = run.ep.stats()["error"]
        run.ep.set_mode("ok")
        up_at = time.time()
        time.sleep(2.0)  # steady load goes on a little after the recovery
        ingest.stop()

        def settled() -> bool:
            if not stream.alive():
                raise AssertionError(f"stream exited: {stream.stderr()[-3000:]}")
            return (run.cursor() >= run.max_seq() and run.outbox_left() == 0 and P.query(
                run.db, "SELECT count(*) FROM failed_requests WHERE state = 'failed'")[0][0] == 0)

        P.wait_for(settled, 600, 0.2, "everything delivered, the failed store redelivered")
        drained_s = time.time() - up_at
        log = stream.stderr() + stream.stdout()
        stream.stop()
        no_locked_errors(run)
        eligible = check_decided(run)
        records = run.ep.stop()
        summary = check_delivered(run, records, eligible, max_duplicates=None)
        states = dict(P.query(run.db, "SELECT state, count(*) FROM failed_requests GROUP BY state"))
        # the outage filled the failed store, and each entry was redelivered, or closed
        # because a newer state of its profile was delivered first (under a steady load,
        # most are)
        assert states.get("redelivered", 0) + states.get("superseded", 0) > 0, states
        assert states.get("failed", 0) == 0, states
        # While paused, nothing but a probe every probe_seconds: from the pause to the
        # first success after it, the endpoint saw at most one request per probe_seconds.
        changes = breaker_lines(log)
        pauses = [at for at, what in changes if what == "paused"]
        assert pauses, f"the breaker never paused delivery: {log[-3000:]}"
        probes = 0
        for paused_at in pauses:
            resumed_at = min((r.at_ms for r in records if r.status == 200 and r.at_ms > paused_at),
                             default=None)
            assert resumed_at is not None
            during = [r for r in records if paused_at < r.at_ms < resumed_at]
            assert len(during) <= (resumed_at - paused_at) / 1000 / probe_s + 1, (
                f"{len(during)} request(s) in {(resumed_at - paused_at) / 1000:.1f} s paused")
            probes += len(during)
        assert [what for _, what in changes][-1] == "resumed"
        summary.update(outage_s=round(up_at - down_at, 1), requests_in_outage=received_in_outage,
                       pauses=len(pauses), probes=probes, drained_after_recovery_s=round(drained_s, 1),
                       redelivered=states.get("redelivered", 0),
                       superseded=states.get("superseded", 0))
        print(json.dumps(summary))
        return summary


def test_outage_short_nothing_lost(prefect_api: str, tmp_path: Path) -> None:
    """2 s refused, 3 s of 500s, recovery: paused, probed, resumed, redelivered."""
    outage_run(prefect_api, tmp_path, refuse_s=2, error_s=3, rate=500, profiles=5000,
               backoff=0.1, probe_s=1.0, redeliver_after=[1, 2, 4, 8, 16])


@pytest.mark.slow
def test_outage_three_minutes_under_load(prefect_api: str, tmp_path: Path) -> None:
    """The endpoint down for 3 minutes (1 refusing connections, 2 answering 500) under a
    steady 1,000 updates/s, then back: nothing lost, probes only while paused."""
    outage_run(prefect_api, tmp_path, refuse_s=60, error_s=120, rate=1000, profiles=20_000,
               backoff=1.0, probe_s=5.0, redeliver_after=[10, 30, 60, 120, 240])


# --- concurrent ingest, stream and replay on one file ------------------------------------


def concurrent_run(api: str, directory: Path, seconds: float, rate: float,
                   profiles: int) -> dict:
    with relay_run(api, directory, retry_backoff_seconds=0.05, timeout_seconds=2) as run:
        ingest = run.group.ingest(run.config, rate, seconds + 600, profiles, seed=5)
        stream = run.stream(interval=1.0)
        stop = threading.Event()
        replays: list[dict] = []
        errors: list[BaseException] = []

        def flap() -> None:  # 500s for 1 s in every 4, so replay has something to do
            while not stop.wait(3.0):
                run.ep.set_mode("error")
                stop.wait(1.0)
                run.ep.set_mode("ok")

        def replay_loop() -> None:
            try:
                for i in range(1000):
                    if stop.is_set():
                        return
                    replays.append(run.replay(f"replay-{i}", endpoint_flapping=True))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=flap, daemon=True),
                   threading.Thread(target=replay_loop, daemon=True)]
        try:
            for t in threads:
                t.start()
            time.sleep(seconds)
        finally:
            stop.set()
            for t in threads:
                t.join(300)
        run.ep.set_mode("ok")
        assert not errors, errors
        ingest.stop()
        run.wait_drained(stream, timeout=300)
        stream.stop()
        run.once()
        final = run.replay("replay-final")
        run.once("final-2")
        no_locked_errors(run)
        eligible = check_decided(run)
        records = run.ep.stop()
        summary = check_delivered(run, records, eligible, max_duplicates=None)
        summary.update(replay_runs=len(replays), resent=sum(r["resent"] for r in replays),
                       final_replay=final)
        print(json.dumps(summary))
        return summary


@pytest.mark.slow  # the concurrency check; the default run keeps the crash and outage ones
def test_concurrent_ingest_stream_replay_short(prefect_api: str, tmp_path: Path) -> None:
    concurrent_run(prefect_api, tmp_path, seconds=6, rate=1000, profiles=5000)


@pytest.mark.slow
def test_concurrent_ingest_stream_replay_minutes(prefect_api: str, tmp_path: Path) -> None:
    concurrent_run(prefect_api, tmp_path, seconds=240, rate=1000, profiles=20_000)

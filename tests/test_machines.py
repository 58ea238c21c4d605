"""Two "machines" on one host: the README's "Running on more than one machine" commands, run
as written against a real Prefect server and PostgreSQL, with two Prefect workers as
separate process groups and steady ingest. Once some group has its standby on the other
machine than its active run, that run's machine is killed (``kill -9`` on its process
group): such groups must be taken over by those standbys, the others by new runs. Then a
group run on the other is frozen (SIGSTOP) until its group has been taken over (by its
standby, as a rule), and thawed. Every profile's latest state must arrive, no profile's
sequence may go backwards at the receiver, and the thawed run must end without another
write."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from state.leases import machine_of as owner_machine
from state.model import RANGE_LEASES, ShardScope
from state.postgres_store import PostgresStore
from tasks.ingest import ingest_stream
from tasks.supervise import ownerless
from testkit.postgres import PostgresServer
from testkit.procs import FLOW, SEGMENT, SEGMENTS, prefect_server, wait_for
from tests.conftest import PG_DATABASE
from tests.test_deployments import ROOT, Shell, cli_env, copy_checkout

GROUPS = 4
PROFILES = 300


def readme_commands() -> list[str]:
    """The shell block of the README's "Running on more than one machine", comments cut."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on more than one machine", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def owners(store: PostgresStore) -> dict[int, tuple[str, int]]:
    """group -> (owner, pid) of the live group leases."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT grp, owner FROM leases WHERE grp >= %s AND expires_at > "
            "(extract(epoch FROM clock_timestamp()) * 1000)::bigint", (RANGE_LEASES,)).fetchall()
    return {grp: (owner, int(owner.split(":")[1])) for grp, owner in rows}


def standbys(store: PostgresStore) -> dict[int, str]:
    """group -> owner of its live standby."""
    found = {}
    for i in range(GROUPS):
        key = ShardScope.of_group(FLOW, i, GROUPS, "").lease_group
        if owner := store.standby_owner(FLOW, key):
            found[key] = owner
    return found


def apart(store: PostgresStore, workers: list[int]) -> tuple | None:
    """The machine with the most groups whose standby is on the other machine, if any:
    (its worker, those groups, the owners, the standbys)."""
    held, standing = owners(store), standbys(store)
    best: tuple | None = None
    for worker in workers:
        covered = [g for g, (owner, pid) in held.items() if machine_of(pid, workers) == worker
                   and g in standing and owner_machine(standing[g]) != owner_machine(owner)]
        if covered and (best is None or len(covered) > len(best[1])):
            best = (worker, covered, held, standing)
    return best


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is gone for our purpose
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def machine_of(pid: int, workers: list[int]) -> int | None:
    """The worker whose process tree ``pid`` is in (a process worker starts each flow
    run in a process group of its own)."""
    seen = 0
    while pid and pid not in workers and seen < 20:
        pid, seen = parent(pid) or 0, seen + 1
    return pid if pid in workers else None


def kill_machine(worker: int, workers: list[int]) -> None:
    """``kill -9`` on the worker's process group and on the group of every process it
    started (each flow run, active or standby, has a group of its own), at once."""
    groups = {worker}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and machine_of(pid := int(entry.name), workers) == worker:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


class Ingest(threading.Thread):
    """Steady ingest: a batch of 20 fragments every 0.1 s, each profile's lastName its
    latest counter, until stopped."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(daemon=True)
        self.store, self.stop, self.count = store, threading.Event(), 0
        self.latest: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set() and self.count < 200_000:
            lines = []
            for _ in range(20):
                pid = f"p-{self.count % PROFILES:04d}"
                value = f"v{self.count}"
                lines.append(orjson.dumps({
                    "profileId": pid, "attributes": {"person": {"name": {
                        "firstName": pid, "lastName": value}}},
                    "segmentMembership": {"ups": {SEGMENT: {"status": "realized"}}}}) + b"\n")
                self.latest[pid] = value
                self.count += 1
            ingest_stream(self.store, io.BytesIO(b"".join(lines)), "test", frozenset([SEGMENT]))
            self.stop.wait(0.1)


def test_two_machines_one_killed_one_frozen(tmp_path: Path, pg_server: PostgresServer) -> None:
    commands = readme_commands()
    pg_url = pg_server.create_schema(PG_DATABASE, "machines")
    store = PostgresStore(pg_url)
    with prefect_server(tmp_path / "server-home") as api_url:
        checkout = copy_checkout(tmp_path / "checkout")
        env = cli_env(api_url, tmp_path / "cli-home")
        shell = Shell(checkout, env, tmp_path / "logs")
        ingest = Ingest(store)
        try:
            record = shell.logs / "receiver.ndjson"
            log = shell.start("receiver", f"profile-relay receiver --port 0 --record {record}")
            url = wait_for(lambda: re.search(r"listening on (http://127\.0\.0\.1:\d+)",
                                             log.read_text()), 30, 0.1, "the receiver").group(1)
            (checkout / "relay.yaml").write_text(yaml.safe_dump({
                "state": "${DATABASE_URL}", "segments": list(SEGMENTS),
                "destinations": [{"name": "crm", "endpoint": f"{url}/hook",
                                  "timeout_seconds": 5, "retry_backoff_seconds": 0}],
                "dataflows": [{"name": FLOW, "destination": "crm", "segments": [SEGMENT],
                               "attributes": ["person.name.firstName",
                                              "person.name.lastName"]}]}), encoding="utf-8")
            workers = []
            for command in commands:
                if command.startswith("export "):
                    name, _, value = command.removeprefix("export ").partition("=")
                    env[name] = pg_url if name == "DATABASE_URL" else value
                elif command.startswith("prefect worker start"):
                    for machine in ("a", "b"):  # "on each machine"
                        shell.start(f"worker-{machine}", command)
                        workers.append(shell.children[-1])
                elif command.startswith("profile-relay supervise"):
                    ingest.start()
                    shell.start("supervise", command)
                else:
                    shell.run(command)
            assert workers and ingest.is_alive(), commands

            wait_for(lambda: not ownerless(store, [FLOW], GROUPS), 120, 0.5, "4 live groups")
            # the machine to kill: one with groups whose standbys are on the other (placement
            # is by the workers' polls, so by chance; supervise retries misplaced standbys)
            pids = [w.pid for w in workers]
            placing = time.monotonic()
            victim, covered, held, standing = wait_for(
                lambda: apart(store, pids), 180, 0.5, "a standby on the other machine")
            placing = time.monotonic() - placing
            survivor = next(w for w in pids if w != victim)
            killed = [g for g, (_, pid) in held.items() if machine_of(pid, pids) == victim]
            kill_machine(victim, pids)
            killed_at = time.monotonic()
            wait_for(lambda: all(owners(store).get(g, ("",))[0] == standing[g] for g in covered),
                     60, 0.2, "the standbys to take their groups over")
            by_standby = time.monotonic() - killed_at

            def taken_over() -> bool:
                now = owners(store)
                return len(now) == GROUPS and all(alive(pid) for _, pid in now.values())

            wait_for(taken_over, 120, 0.2, "the killed machine's other groups taken over")
            takeover = time.monotonic() - killed_at
            assert all(machine_of(pid, pids) == survivor for _, pid in owners(store).values())

            # freeze a group run that has a standby until its group is taken over, then
            # thaw; a standby started since the kill (one from before may yet leave, having
            # seen the killed machine's worker heartbeat since it started)
            def with_standby() -> tuple | None:
                now, standing_now = owners(store), standbys(store)
                ready = sorted(g for g in now if g in standing_now and alive(now[g][1])
                               and standing_now[g] not in standing.values())
                return (ready[0], now[ready[0]], standing_now[ready[0]]) if ready else None

            group, (frozen_owner, frozen), its_standby = wait_for(
                with_standby, 150, 0.5, "a group run with a live standby")
            # the group's standbys while it is frozen; the taker is usually one of them, but
            # a standby may leave meanwhile and a new run take the group: either way the
            # thawed run must write nothing (the standby path is asserted at the kill above)
            stood_by = {its_standby}

            def moved() -> str | None:
                if standby := standbys(store).get(group):
                    stood_by.add(standby)
                now = owners(store).get(group, ("",))[0]
                return now if now not in ("", frozen_owner) else None

            os.kill(frozen, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                taker = wait_for(moved, 120, 0.2, "the frozen run's group taken over")
                refrozen = time.monotonic() - stopped_at
                by = "its standby" if taker in stood_by else "a new run"
            finally:
                os.kill(frozen, signal.SIGCONT)
            wait_for(lambda: not alive(frozen), 60, 0.2, "the thawed run to end")

            ingest.stop.set()
            ingest.join(30)

            def arrived() -> dict[str, list[dict[str, Any]]]:
                seen: dict[str, list[dict[str, Any]]] = {}
                for line in record.read_bytes().splitlines():
                    entry = orjson.loads(line)
                    pid = entry["body"]["person"]["name"]["firstName"]
                    seen.setdefault(pid, []).append(entry)
                return seen

            wait_for(lambda: (lambda seen: all(
                seen.get(pid, [{}])[-1].get("body", {}).get("person", {}).get("name", {})
                .get("lastName") == value for pid, value in ingest.latest.items()))(arrived()),
                120, 0.5, "every profile's latest state at the receiver")
            seen = arrived()
            supervise_log = (shell.logs / "supervise.log").read_text(errors="replace")
        finally:
            ingest.stop.set()
            shell.stop_all()

    assert sorted(seen) == sorted(ingest.latest)  # every profile
    backwards = {pid: seqs for pid, entries in seen.items()
                 if (seqs := [int(e["headers"]["X-Relay-Sequence"]) for e in entries])
                 != sorted(seqs)}
    assert not backwards, f"a sequence went backwards at the receiver: {backwards}"
    stats = store.stats(FLOW)
    assert stats.pending == 0 and stats.failed == 0, stats
    assert "Traceback" not in supervise_log, supervise_log[-3000:]
    requests = sum(len(v) for v in seen.values())
    print(f"\nmachines: a standby apart in {placing:.1f} s; {len(killed)} group(s) killed, "
          f"{len(covered)} taken over by their standbys in {by_standby:.1f} s, all in "
          f"{takeover:.1f} s; a frozen run's group taken over by {by} in "
          f"{refrozen:.1f} s; {ingest.count} fragments "
          f"over {PROFILES} profiles, {requests} requests, "
          f"{requests - len(set((p, e['headers']['X-Relay-Sequence']) for p, v in seen.items() for e in v))} "
          f"repeated (same state, same key)")

"""Process helpers for the reliability tests and the end-to-end and soak benchmarks.

Everything here runs real processes on loopback: one shared Prefect server, a recording
endpoint in its own process (``testkit.servers.Endpoint``; it can be told to refuse
connections or answer 500), a steady ingest driver, and a polling reader used as the
latency floor. Each child runs in its own session, so a kill reaches its whole process
group and nothing is orphaned. ``write_config`` writes the relay config they all use.

The children are this module run as a script:

    python -m testkit.procs endpoint --ready FILE --record FILE [--mode ok|error|refuse]
    python -m testkit.procs ingest -c CONFIG --rate N --seconds S [--profiles P] [--every T]
    python -m testkit.procs poll --db FILE --interval T --seconds S --out FILE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
RELAY = str(BIN / "profile-relay")
PREFECT = str(BIN / "prefect")
FLOW = "crm-stream"
SEGMENT = "seg-a"
ID_NAMESPACE = "crm"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


# --- child processes ----------------------------------------------------------------------


class Proc:
    """A child in its own session (process group); output goes to files in ``logs``."""

    def __init__(self, name: str, args: list[str], logs: Path, env: dict[str, str],
                 stdin: int | None = None) -> None:
        self.name = name
        self.args = args
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with self.out_path.open("ab") as out, self.err_path.open("ab") as err:
            self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err,
                                          stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill9(self) -> None:
        """kill -9 the whole group and reap the child."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; always leaves the group dead."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.signal_group(signal.SIGKILL)  # stragglers in the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@dataclass
class Procs:
    """Tracks every child started, so one ``finally`` stops them all."""

    logs: Path
    env: dict[str, str]
    started: list[Proc] = field(default_factory=list)
    counter: int = 0

    def start(self, name: str, args: list[str], **kw: Any) -> Proc:
        self.counter += 1
        proc = Proc(f"{self.counter:03d}-{name}", args, self.logs, self.env, **kw)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop(timeout=5)

    def stderr_of(self, prefix: str) -> dict[str, str]:
        return {p.name: p.stderr() for p in self.started if p.name[4:].startswith(prefix)}

    # the commands ------------------------------------------------------------------------

    def relay(self, name: str, *args: str) -> Proc:
        return self.start(name, [RELAY, *args])

    def run_relay(self, name: str, *args: str, timeout: float = 120) -> Proc:
        """Run a `profile-relay` command to completion (bounded)."""
        proc = self.relay(name, *args)
        proc.wait(timeout)
        return proc

    def endpoint(self, record: Path, mode: str = "ok") -> EndpointProc:
        ready = self.logs / f"endpoint-{self.counter + 1}.ready"
        ready.unlink(missing_ok=True)
        proc = self.start("endpoint", [PYTHON, "-m", "testkit.procs", "endpoint", "--ready",
                                       str(ready), "--record", str(record), "--mode", mode])
        info = wait_for(lambda: _read_json(ready) if proc.alive() else
                        _raise(RuntimeError(f"endpoint died: {proc.stderr()[-2000:]}")),
                        30, what="the endpoint to listen")
        return EndpointProc(proc, info["port"], info["control"], record)

    def ingest(self, config: Path, rate: float, seconds: float, profiles: int,
               every: float = 0.05, seed: int = 1, stats: Path | None = None) -> Proc:
        args = [PYTHON, "-m", "testkit.procs", "ingest", "-c", str(config), "--rate", str(rate),
                "--seconds", str(seconds), "--profiles", str(profiles), "--every", str(every),
                "--seed", str(seed)]
        if stats is not None:
            args += ["--stats", str(stats)]
        return self.start("ingest", args)

    def poller(self, db: Path, interval: float, seconds: float, out: Path) -> Proc:
        return self.start("poll", [PYTHON, "-m", "testkit.procs", "poll", "--db", str(db),
                                   "--interval", str(interval), "--seconds", str(seconds),
                                   "--out", str(out)])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _raise(exc: Exception) -> Any:
    raise exc


@contextlib.contextmanager
def procs(logs: Path, api_url: str | None) -> Iterator[Procs]:
    env = quiet_env(**({"PREFECT_API_URL": api_url} if api_url else {}))
    group = Procs(logs, env)
    try:
        yield group
    finally:
        group.stop_all()


# --- the shared Prefect server ------------------------------------------------------------


LEAN_SERVER = {  # background services the relay does not use; off in tests to spare CPU
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
    for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "TRIGGERS", "PAUSE_EXPIRATIONS",
                 "REPOSSESSOR", "CANCELLATION_CLEANUP")
}


def _template_dir() -> Path:
    import tempfile
    from importlib.metadata import version

    return Path(tempfile.gettempdir()) / f"profile-relay-prefect-{version('prefect')}-{os.getuid()}"


@contextlib.contextmanager
def prefect_server(home: Path, startup_timeout: float = 120, lean: bool = True,
                   reuse_migrated: bool = True,
                   started: list[Proc] | None = None) -> Iterator[str]:
    """One local Prefect server for a whole module or bench run; yields its API URL.

    A fresh ``PREFECT_HOME`` spends about 15 s on database migrations. With
    ``reuse_migrated`` the first run keeps a copy of the empty, migrated database in the
    temp directory and later runs start from a copy of it (about 5 s)."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    template = _template_dir() / "prefect.db"
    if reuse_migrated and template.is_file() and not (home / "prefect.db").exists():
        shutil.copyfile(template, home / "prefect.db")
    port = free_port()
    env = quiet_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                    PREFECT_SERVER_LOGGING_LEVEL="WARNING", **(LEAN_SERVER if lean else {}))
    env.pop("PREFECT_API_URL", None)
    proc = Proc("prefect-server", [PREFECT, "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], home, env)
    url = f"http://127.0.0.1:{port}/api"
    if started is not None:
        started.append(proc)

    def healthy() -> bool:
        if not proc.alive():
            raise RuntimeError(f"prefect server exited: {proc.stderr()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, startup_timeout, 0.25, "the Prefect server")
        if reuse_migrated and not template.is_file():
            _save_template(home / "prefect.db", template)
        yield url
    finally:
        proc.stop(timeout=10)


def _save_template(db: Path, template: Path) -> None:
    """Copy the just-migrated, still empty database (a consistent SQLite backup)."""
    import sqlite3

    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_suffix(f".{os.getpid()}.tmp")
    src = sqlite3.connect(str(db), timeout=30)
    dst = sqlite3.connect(str(tmp))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    os.replace(tmp, template)


# --- the recording endpoint ---------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    at_ms: int
    seq: int
    key: str
    profile: str
    status: int


@dataclass
class EndpointProc:
    proc: Proc
    port: int
    control: int
    record: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _call(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}{path}", timeout=10) as r:
            return json.loads(r.read())

    def set_mode(self, mode: str) -> None:
        """``ok`` (200), ``error`` (500) or ``refuse`` (no listener; open connections cut)."""
        self._call(f"/mode?set={mode}")

    def stats(self) -> dict[str, Any]:
        return self._call("/stats")

    def stop(self) -> list[Received]:
        """Stop the process (it flushes its record on SIGTERM) and read the record."""
        self.proc.stop(timeout=10)
        return read_record(self.record)


def read_record(path: Path) -> list[Received]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 5:
            out.append(Received(int(parts[0]), int(parts[1]), parts[2], parts[3], int(parts[4])))
    return out


async def _serve_endpoint(ready: Path, record: Path, mode: str) -> None:
    """``testkit.servers.Endpoint`` in this process, appending one line per answered request
    to ``record`` and keeping no request in memory; a control port sets the mode and reads
    the counts."""
    import asyncio

    import orjson
    from aiohttp import web

    from testkit.servers import Endpoint, LoopbackServer, Recorded

    out = record.open("a", buffering=1 << 16)
    counts: dict[str, Any] = {"mode": mode, "received": 0, "ok": 0, "error": 0, "last_ms": 0}

    class Recording(Endpoint):
        def answered(self, request: Recorded, status: int) -> None:
            now = time.time_ns() // 1_000_000
            try:
                profile = orjson.loads(request.body)["identityMap"][ID_NAMESPACE][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                profile = "-"
            out.write(f"{now}\t{request.headers.get('X-Relay-Sequence', '-1')}\t"
                      f"{request.headers.get('Idempotency-Key', '-')}\t{profile}\t{status}\n")
            counts["received"] += 1
            counts["ok" if status == 200 else "error"] += 1
            counts["last_ms"] = now

    endpoint = Recording(keep_requests=False)

    async def set_mode(new: str) -> None:
        if new == "refuse":
            await endpoint.refuse()
        else:
            endpoint.always(500 if new == "error" else 200)
            await endpoint.accept()
        counts["mode"] = new

    async def control(request: web.Request) -> web.Response:
        if request.path == "/mode":
            new = request.query["set"]
            if new not in ("ok", "error", "refuse"):
                raise web.HTTPBadRequest(text=f"unknown mode {new}")
            await set_mode(new)
        out.flush()
        return web.json_response({**counts, "cut": endpoint.dropped})

    class Control(LoopbackServer):
        def _app(self) -> web.Application:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", control)
            return app

    async with endpoint, Control() as ctl:
        await set_mode(mode)
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": endpoint.port, "control": ctl.port}))
        tmp.rename(ready)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            out.flush()
    out.close()  # both servers are down: nothing more to write


# --- config and store ---------------------------------------------------------------------


SEGMENTS = ({"id": SEGMENT, "name": "A"}, {"id": "seg-b", "name": "B"})


def write_config(directory: Path, endpoint: str, *, file: str = "config.yaml",
                 segments: Sequence[dict[str, Any]] = SEGMENTS,
                 attributes: Sequence[str] = ("person.name.firstName",), **dest: Any) -> Path:
    """``directory/file``: the ``segments`` catalogue, one destination ``crm`` at ``endpoint``
    (``dest``: its options; a 5 s timeout unless given), one dataflow ``FLOW`` mapping
    ``seg-a`` and ``attributes``; the store is ``relay.db`` beside it."""
    import yaml

    doc = {
        "state": "relay.db",
        "segments": list(segments),
        "destinations": [{"name": "crm", "endpoint": endpoint, "timeout_seconds": 5, **dest}],
        "dataflows": [{"name": FLOW, "destination": "crm", "segments": [SEGMENT],
                       "attributes": list(attributes)}],
    }
    path = directory / file
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def query(db_path: Path, sql: str, *args: Any) -> list[tuple]:
    """A read on its own short-lived connection (the store is in WAL mode)."""
    import sqlite3

    conn = sqlite3.connect(str(db_path), timeout=60)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def dataflow_cursor(db_path: Path) -> int | None:
    """The dataflow's cursor, or None while no stream run has registered it."""
    from state import open_store

    if not db_path.exists():
        return None
    store = open_store(db_path)
    try:
        return store.cursor(FLOW)
    except KeyError:
        return None
    finally:
        store.close()


# --- the ingest driver --------------------------------------------------------------------


def fragment(pid: str, value: str) -> bytes:
    import orjson

    return orjson.dumps({
        "profileId": pid,
        "attributes": {"person": {"name": {"firstName": value}}},
        "identityMap": {ID_NAMESPACE: [{"id": pid}]},
        "segmentMembership": {"ups": {SEGMENT: {"status": "realized"}}},
    }) + b"\n"


def profile_id(n: int) -> str:
    return f"p-{n:06d}"


def _ingest(config: Path, rate: float, seconds: float, profiles: int, every: float,
            seed: int, stats: Path | None) -> None:
    import io

    from config import load_config
    from state import open_store
    from tasks.ingest import ingest_stream

    cfg = load_config(config)
    db = open_store(cfg.state_target)
    catalogue = frozenset(s.id for s in cfg.segments)
    rng = random.Random(seed)
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sent = commits = last_seq = 0
    started = time.monotonic()
    tick = 0
    while not stopping and time.monotonic() - started < seconds:
        tick += 1
        due = int(rate * min(tick * every, seconds)) - sent
        if due > 0:
            lines = b"".join(fragment(profile_id(rng.randrange(profiles)), f"v{sent + i}")
                             for i in range(due))
            result = ingest_stream(db, io.BytesIO(lines), "driver", catalogue,
                                   batch_lines=due + 1)
            sent += due
            commits += 1
            last_seq = result.last_seq or last_seq
        pause = started + tick * every - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.monotonic() - started
    summary = {"ingested": sent, "commits": commits, "seconds": round(elapsed, 3),
               "last_seq": last_seq}
    print(json.dumps(summary), flush=True)
    if stats is not None:
        stats.write_text(json.dumps(summary))


# --- the polling reader (latency floor) ---------------------------------------------------


POLL_PAGE = 100_000


def _poll(db_path: Path, interval: float, seconds: float, out_path: Path) -> None:
    from state import open_store

    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    wait_for(db_path.exists, 60, what="the state file")
    store = open_store(db_path)
    cursor = store.head_seq()
    latencies: list[int] = []
    started = time.monotonic()
    while not stopping and time.monotonic() - started < seconds:
        tick = time.monotonic()
        rows: list[tuple] = []
        while page := store.read_changes(cursor, POLL_PAGE):  # (seq, profile, committed_at, ...)
            rows += page
            cursor = page[-1][0]
            if len(page) < POLL_PAGE:
                break
        now = time.time_ns() // 1_000_000
        latencies.extend(now - row[2] for row in rows)
        time.sleep(max(0.0, interval - (time.monotonic() - tick)))
    store.close()
    out_path.write_text(json.dumps(latencies))


# --- figures ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc), 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testkit.procs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("endpoint")
    e.add_argument("--ready", type=Path, required=True)
    e.add_argument("--record", type=Path, required=True)
    e.add_argument("--mode", default="ok", choices=["ok", "error", "refuse"])
    i = sub.add_parser("ingest")
    i.add_argument("-c", "--config", type=Path, required=True)
    i.add_argument("--rate", type=float, required=True)
    i.add_argument("--seconds", type=float, required=True)
    i.add_argument("--profiles", type=int, default=20_000)
    i.add_argument("--every", type=float, default=0.05)
    i.add_argument("--seed", type=int, default=1)
    i.add_argument("--stats", type=Path)
    p = sub.add_parser("poll")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "endpoint":
        import asyncio

        try:
            import uvloop
        except ImportError:
            asyncio.run(_serve_endpoint(args.ready, args.record, args.mode))
        else:
            uvloop.run(_serve_endpoint(args.ready, args.record, args.mode))
    elif args.cmd == "ingest":
        _ingest(args.config, args.rate, args.seconds, args.profiles, args.every, args.seed,
                args.stats)
    else:
        _poll(args.db, args.interval, args.seconds, args.out)


if __name__ == "__main__":
    main()

"""What the PostgreSQL store promises beyond the contract suite: seqs that a cursor never
skips under concurrent ingest, migrations safe when processes start at once, a sender's
lock that dies with its process, index-driven micro-batch reads, VACUUM after a forget,
and a URL whose password shows nowhere. Each test runs on a real server (conftest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psycopg
import pytest
import yaml

from config import load_config
from state import StateUnavailable, open_store
from state.db import now_ms
from state.model import Fragment
from state.pg_schema import MIGRATIONS as PG_MIGRATIONS
from state.postgres_store import KEYS, LOAD_PROFILES, PROBE, PostgresStore, _keys
from state.sqlite_store import SqliteStore
from state.target import describe, identity, redact, without_password
from testkit.procs import wait_for

ROOT = Path(__file__).resolve().parent.parent


def frag(pid: str, **attrs: object) -> Fragment:
    return Fragment(pid, now_ms(), attributes=dict(attrs) or {"a": 1}, paths=sorted(attrs) or ["a"])


def test_open_store_picks_the_engine_by_the_target(pg_url: str, tmp_path: Path) -> None:
    pg = open_store(pg_url)
    assert isinstance(pg, PostgresStore)
    pg.close()
    alias = open_store("postgres" + pg_url.removeprefix("postgresql"))
    assert isinstance(alias, PostgresStore)
    alias.close()
    lite = open_store(tmp_path / "relay.db")
    assert isinstance(lite, SqliteStore)
    lite.close()


def test_concurrent_ingest_never_lets_a_cursor_skip_a_seq(pg_url: str) -> None:
    """Two writers ingest while a reader follows the log with a cursor, as a stream run
    does; every seq committed is read exactly once."""
    writers = [open_store(pg_url) for _ in range(2)]
    reader = open_store(pg_url)
    done = threading.Event()
    read: list[int] = []

    def ingest(store: PostgresStore, name: str) -> None:
        for batch in range(40):
            store.append_changes([frag(f"{name}-{batch}-{i}") for i in range(5)])

    def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            rows = reader.read_changes(cursor, 1000)
            if rows:
                read.extend(r[0] for r in rows)
                cursor = rows[-1][0]
            elif finished:
                return

    threads = [threading.Thread(target=ingest, args=(w, f"w{n}")) for n, w in enumerate(writers)]
    follower = threading.Thread(target=follow)
    follower.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    follower.join()
    committed = [r[0] for r in reader.read_changes(0, 10_000)]
    assert len(committed) == 2 * 40 * 5
    assert read == committed  # in order, none skipped, none twice
    for store in (*writers, reader):
        store.close()


def test_ingest_waits_for_an_ingest_in_flight(pg_url: str) -> None:
    """The ingest lock is held across the whole write transaction: a second ingest
    queues behind it instead of taking seqs that could commit first."""
    store = open_store(pg_url)
    holder = psycopg.connect(pg_url, autocommit=True)
    try:
        with holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", store._lock("ingest"))
            worker = threading.Thread(target=store.append_changes, args=([frag("p-1")],))
            worker.start()
            wait_for(lambda: holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0], timeout=30, what="the ingest to wait on the lock")
            assert store.head_seq() == 0
        worker.join()
        assert store.head_seq() == 1
    finally:
        holder.close()
        store.close()


def test_two_processes_migrating_at_once_apply_each_migration_once(pg_url: str) -> None:
    barrier = threading.Barrier(3)
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            opened.append(PostgresStore(pg_url, pool_max=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 3
    with psycopg.connect(pg_url) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
    assert versions == [(v,) for v in range(1, len(PG_MIGRATIONS) + 1)]  # each one once
    for store in opened:
        store.close()


def test_a_killed_senders_lock_is_released_by_the_server(pg_url: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from state import open_store
            lock = open_store({pg_url!r}).lock_sending("flow-1")
            print("held" if lock else "refused", flush=True)
            time.sleep(600)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    store = open_store(pg_url)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert store.lock_sending("flow-1") is None
        other = store.lock_sending("flow-2")  # another dataflow's lock is its own
        assert other is not None
        other.release()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        lock = wait_for(lambda: store.lock_sending("flow-1"), timeout=30,
                        what="the server to drop the killed process's session")
        lock.release()
        lock.release()  # twice is harmless
    finally:
        if child.poll() is None:
            child.kill()
        store.close()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(pg_url: str) -> None:
    store = open_store(pg_url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{socket.gethostname()}:{dead.pid}:run-1"
    assert store.acquire_lease("flow-1", 0, owner, ttl_ms=600_000) == 1
    assert store.acquire_lease("flow-1", 0, "elsewhere:1:run-2", ttl_ms=600_000) == 2
    assert store.acquire_lease("flow-1", 0, "other-host:1:run-3", ttl_ms=600_000) is None
    store.close()


def test_micro_batch_reads_probe_the_index_however_many_ids(pg_url: str) -> None:
    """10,000 ids out of 50,000 profiles: the planner would scan the table for
    ``profile_id = ANY(..)``; the store's pair join is index probes only."""
    store = open_store(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO profiles SELECT 'p-' || i, i % 256, '{}', '{}', 0, 0, i "
                     "FROM generate_series(1, 50000) AS i")
        conn.execute("ANALYZE profiles")
        keys = _keys(f"p-{i}" for i in range(1, 50_001, 5))
        with conn.transaction():
            conn.execute(PROBE)
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + LOAD_PROFILES, keys))
    assert "Index Scan" in plan and "Seq Scan on profiles" not in plan, plan
    assert "unnest" in KEYS
    store.close()


def test_forget_vacuums_the_tables_it_touched(pg_url: str) -> None:
    store = open_store(pg_url)
    store.append_changes([frag("p-1"), frag("p-2")])
    done = store.forget(["p-1"])
    assert done.counts["profiles"] == 1 and done.counts["change log rows"] == 1
    with psycopg.connect(pg_url) as conn:
        vacuumed = dict(conn.execute(
            "SELECT relname, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema() AND relname IN ('profiles', 'changes', 'outbox')"
        ).fetchall())
    assert vacuumed == {"profiles": True, "changes": True, "outbox": False}  # outbox: no rows
    store.close()


# -- the URL's password --------------------------------------------------------------------------

SECRET = "s3cr3t-pw"


def test_redaction_of_urls() -> None:
    url = f"postgresql://relay:{SECRET}@db.example:5432/relay?sslmode=require"
    assert redact(url) == "postgresql://relay:***@db.example:5432/relay?sslmode=require"
    assert SECRET not in redact(f"postgres://db/relay?user=relay&password={SECRET}")
    assert without_password(url) == "postgresql://relay@db.example:5432/relay?sslmode=require"
    assert identity(url) == identity(url.replace(SECRET, "another"))
    assert describe(Path("relay.db")) == "relay.db"


def write_config(folder: Path, state: str) -> Path:
    doc = {"state": state, "segments": [{"id": "seg-a"}],
           "destinations": [{"name": "d", "endpoint": "https://example.com/hook"}],
           "dataflows": [{"name": "f", "destination": "d", "segments": ["seg-a"]}]}
    path = folder / "relay.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_state_from_database_url_keeps_the_password_out_of_sight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.report import config_tag

    url = f"postgresql://relay:{SECRET}@127.0.0.1:1/relay"
    monkeypatch.setenv("DATABASE_URL", url)
    config = load_config(write_config(tmp_path, "${DATABASE_URL}"))
    assert config.state_target == url
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump()),
                 describe(config.state_target), config_tag(config)):
        assert SECRET not in text
    monkeypatch.setenv("DATABASE_URL", url.replace(SECRET, "rotated"))
    assert config_tag(load_config(write_config(tmp_path, "${DATABASE_URL}"))) == config_tag(config)
    sqlite = load_config(write_config(tmp_path, "data/relay.db"))
    assert sqlite.state_target == tmp_path.resolve() / "data" / "relay.db"


def test_an_unreachable_state_is_one_line_naming_state(tmp_path: Path) -> None:
    with pytest.raises(StateUnavailable) as caught:
        open_store(f"postgresql://relay:{SECRET}@127.0.0.1:1/relay?connect_timeout=5")
    message = str(caught.value)
    assert message.startswith("state: ") and "\n" not in message and SECRET not in message
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "profile-relay"), "status", "-c",
         str(write_config(tmp_path, f"postgresql://relay:{SECRET}@127.0.0.1:1/relay"))],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: state: cannot open the PostgreSQL store")
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout


def test_the_columnar_reader_gives_the_rows_the_cursor_gives(pg_url: str) -> None:
    from state.postgres_store import READ_CHANGES
    from tasks.diff import CHANGE_SCHEMA

    store = open_store(pg_url)
    store.append_changes([frag("p-1", name="x"), Fragment("p-2", now_ms()), frag("p,\"3\"")])
    frame = store._frame(READ_CHANGES, (0, 10), schema=CHANGE_SCHEMA)
    assert frame.rows() == store.read_changes(0, 10)
    assert frame.get_column("attr_paths").to_list() == ["name", None, "a"]
    store.close()


def test_figures_compare_with_the_sqlite_store(pg_url: str, tmp_path: Path) -> None:
    """The same deliveries give the same figures on both engines (latency percentiles are
    read at their rank in PostgreSQL rather than computed in Python)."""
    from state.model import Attempt, Export

    figures = []
    for store in (open_store(pg_url), open_store(tmp_path / "relay.db")):
        store.append_changes([frag(f"p-{i}") for i in range(7)])
        store.sync_dataflow("flow-1", "dest", ["seg-a"], "h")
        store.enqueue_exports("flow-1", [Export(f"p-{i}", i + 1, "attribute", 1_000, "seg-a")
                                         for i in range(7)])
        items = sorted(store.claim_due("flow-1", 2**62, 10), key=lambda p: p.profile_id)
        store.record_outcomes("flow-1", [Attempt(p, p.seq, "k", 200, None, 1_000 + 10 * i**2)
                                         for i, p in enumerate(items)], [], [])
        stats = store.stats("flow-1", since_ms=0)
        figures.append((stats.delivered, stats.latency_p50_ms, stats.latency_p95_ms,
                        stats.delivered_per_s, stats.pending, stats.lag_changes))
        store.close()
    assert figures[0] == figures[1] == (7, 90, 360, 19.4, 0, 0)


def test_a_process_frozen_in_a_transaction_loses_its_locks(pg_url: str) -> None:
    """A process stopped (SIGSTOP, a stalled VM) inside a transaction would keep its row
    locks until it resumed, and every shard group writes the dataflow's row: the server ends
    such a session after the store's idle-in-transaction timeout, so the others go on."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from state.postgres_store import PostgresStore
            store = PostgresStore({pg_url!r}, idle_in_transaction_ms=1000)
            with store.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT version FROM schema_version WHERE version = 1 FOR UPDATE")
                print("locked", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    other = psycopg.connect(pg_url, autocommit=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        other.execute("SET lock_timeout = '20s'")  # without the timeout: LockNotAvailable
        with other.transaction():  # waits for the frozen session to be ended, then locks
            other.execute("SELECT version FROM schema_version WHERE version = 1 FOR UPDATE")
    finally:
        child.kill()
        child.wait(timeout=30)
        other.close()

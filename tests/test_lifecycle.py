"""The profile lifecycle (the README's "Data lifecycle"), end to end through the command line
against real loopback endpoints and real SQLite files: identities that change, exits while a
segment was unmapped, dataflows that come and go, forget (checked as an auditor would, on the
database file's bytes), retention, profiles nobody could identify, big profiles. Then a
property test: whatever happens, each receiver ends up holding what the export rules make of
the final store."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
from typer.testing import CliRunner

from app.cli import app
from config import load_config
from state import open_store
from tasks import lifecycle, pipeline
from tasks.pipeline import PassResult
from testkit.servers import Endpoint
from tests.relay_fixtures import ingest as ingest_lines

CATALOGUE = [{"id": "seg-a", "name": "A"}, {"id": "seg-b", "name": "B"}, {"id": "seg-c"}]
EMAIL = "personalEmail.address"
DAY_MS = 86_400_000


# --- the harness ---------------------------------------------------------------------------

def flow(name: str, destination: str, segments: list[str],
         attributes: tuple[str, ...] = (EMAIL, "person.name.firstName")) -> dict[str, Any]:
    return {"name": name, "destination": destination, "segments": segments,
            "attributes": list(attributes)}


def write_config(directory: Path, endpoints: dict[str, str], flows: list[dict[str, Any]],
                 segments: list[dict[str, Any]] = CATALOGUE, **top: Any) -> Path:
    """A config with one destination per ``endpoints`` entry (name -> URL)."""
    doc = {"state": "relay.db", **top, "segments": segments,
           "destinations": [{"name": name, "endpoint": url, "timeout_seconds": 10,
                             "retry_backoff_seconds": 0} for name, url in endpoints.items()],
           "dataflows": flows}
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def person(pid: str, segs: dict[str, str] | None = None, email: bool = True,
           ids: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"profileId": pid, **extra}
    if email:
        doc["attributes"] = {"personalEmail": {"address": f"{pid}@x.com"}}
    if ids is not None:
        doc["identityMap"] = ids
    if segs:
        doc["segmentMembership"] = {"ups": {s: {"status": v} for s, v in segs.items()}}
    return doc


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


async def cli(*args: str | Path) -> Any:
    """The command line in a thread, so this test's loop keeps serving the endpoints."""
    return await asyncio.to_thread(run_cli, *map(str, args))


async def ingest(config: Path, *docs: dict[str, Any] | bytes) -> Any:
    data = config.parent / "fragments.ndjson"
    data.write_bytes(b"".join(d if isinstance(d, bytes) else orjson.dumps(d) + b"\n"
                              for d in docs))
    return await cli("ingest", "-c", config, data)


async def stream(config: Path, expect: int = 0) -> Any:
    result = await cli("stream", "-c", config, "--once")
    assert result.exit_code == expect, result.output
    return result


def bodies(endpoint: Endpoint) -> dict[str, dict[str, Any]]:
    """The last body each profile's requests carried, by the profile's email."""
    out = {}
    for request in endpoint.requests:
        body = orjson.loads(request.body)
        out[body["personalEmail"]["address"].split("@")[0]] = body
    return out


async def flow_run_logs() -> list[tuple[int, str]]:
    """(level, message) of the newest flow run, once its last line reached the API."""
    async with get_client() as client:
        [run] = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1,
                                            flow_run_filter=FlowRunFilter())
        for _ in range(100):  # up to 10 s
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if any("Finished in state" in log.message for log in logs):
                break
            await asyncio.sleep(0.1)
    return [(log.level, log.message) for log in logs]


def query(db: Path, sql: str, *args: Any) -> list[tuple]:
    conn = sqlite3.connect(str(db), timeout=60, isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


prefect = pytest.mark.prefect


@pytest.fixture
def harness(prefect_harness: None) -> None:
    """The session's Prefect harness, for the tests that run flows through the CLI."""


# --- 1. identities change, not only grow ---------------------------------------------------

@prefect
async def test_identities_are_added_updated_and_removed(tmp_path: Path, endpoint: Endpoint,
                                                        harness: None) -> None:
    config = write_config(tmp_path, {"crm": endpoint.url}, [flow("f", "crm", ["seg-a"])])
    email = {"id": "ann@x.com", "authenticatedState": "authenticated"}
    assert (await ingest(config, person("p-1", {"seg-a": "realized"},
                                        ids={"ecid": [{"id": "e1"}], "email": [email]}))).exit_code == 0
    await stream(config)
    assert bodies(endpoint)["p-1"]["identityMap"] == {"ecid": [{"id": "e1"}], "email": [email]}
    steps: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        # a field on a later write of a known id is kept (it was dropped before)
        ({"ecid": [{"id": "e1", "primary": True}]},
         {"ecid": [{"id": "e1", "primary": True}], "email": [email]}),
        ({"ecid": [{"id": "e1"}]}, None),                    # nothing changes: no export
        ({"ecid": [{"id": "e1", "primary": True}]}, None),   # the same value again: no export
        ({"ecid": [{"id": "e1", "primary": False}]},         # the latest value wins
         {"ecid": [{"id": "e1", "primary": False}], "email": [email]}),
        ({"ecid": [{"id": "e1", "removed": True}], "crm": [{"id": "c-1"}]},
         {"email": [email], "crm": [{"id": "c-1"}]}),        # removed, and the namespace with it
        ({"email": None}, {"crm": [{"id": "c-1"}]}),          # a namespace written as null
        ({"crm": [{"id": "c-9", "removed": True}]}, None),   # removing what is not there
    ]
    for ids, expected in steps:
        endpoint.reset()
        assert (await ingest(config, {"profileId": "p-1", "identityMap": ids})).exit_code == 0
        await stream(config)
        if expected is None:
            assert endpoint.requests == [], ids
        else:
            [request] = endpoint.requests
            assert orjson.loads(request.body)["identityMap"] == expected, ids
    reasons = {"removed": '"removed": "yes"', "primary": '"primary": 1',
               "authenticatedState": '"authenticatedState": "maybe"'}
    bad = [f'{{"profileId": "p-1", "identityMap": {{"ecid": [{{"id": "e1", {v}}}]}}}}\n'.encode()
           for v in reasons.values()]
    bad.append(b'{"profileId": "p-1", "identityMap": {"ecid": "e1"}}\n')
    result = await ingest(config, *bad)
    assert result.exit_code == 1
    assert "identityMap.ecid[0].removed must be true (remove this identity) or false" in result.stderr
    assert "identityMap.ecid[0].primary must be true or false" in result.stderr
    assert "identityMap.ecid[0].authenticatedState must be one of ambiguous, authenticated, " \
           "loggedOut" in result.stderr
    assert "identityMap.ecid must be a list" in result.stderr and "or null" in result.stderr


# --- 2. exits are never missed --------------------------------------------------------------

@prefect
async def test_a_remapped_segment_exports_the_exits_that_happened_while_unmapped(
        tmp_path: Path, endpoint: Endpoint, harness: None) -> None:
    both = [flow("f", "crm", ["seg-a", "seg-b"])]
    config = write_config(tmp_path, {"crm": endpoint.url}, both)
    await ingest(config, person("p-1", {"seg-a": "realized"}),
                 person("p-2", {"seg-a": "realized", "seg-b": "realized"}),
                 person("p-3", {"seg-a": "realized"}))
    await stream(config)
    assert set(bodies(endpoint)) == {"p-1", "p-2", "p-3"}

    write_config(tmp_path, {"crm": endpoint.url}, [flow("f", "crm", ["seg-b"])])  # unmap seg-a
    await stream(config)
    endpoint.reset()
    await ingest(config,
                 {"profileId": "p-1", "segmentMembership": {"ups": {"seg-a": {"status": "exited"}}}},
                 {"profileId": "p-2", "segmentMembership": {"ups": {"seg-a": {"status": "exited"}}}},
                 person("p-2"),                    # p-2 is exported (seg-b): it shows seg-a exited
                 person("p-4", {"seg-a": "realized"}))
    await stream(config)
    assert set(bodies(endpoint)) == {"p-2"}
    assert bodies(endpoint)["p-2"]["segmentMembership"]["ups"]["seg-a"]["status"] == "exited"

    endpoint.reset()
    write_config(tmp_path, {"crm": endpoint.url}, both)  # seg-a mapped again
    await stream(config)
    got = bodies(endpoint)
    # like a new mapping (p-3, p-4 qualified), and the exit p-1's receiver has not seen;
    # not p-2, whose last export showed its exit already
    assert set(got) == {"p-1", "p-3", "p-4"}
    assert got["p-1"]["segmentMembership"]["ups"]["seg-a"]["status"] == "exited"
    logs = [m for _, m in await flow_run_logs()]
    assert any("f: mapped again seg-a" in m for m in logs), logs
    endpoint.reset()
    await stream(config)  # and nothing twice
    assert endpoint.requests == []


# --- 3. dataflows come and go ----------------------------------------------------------------

@prefect
async def test_removed_dataflow_stops_shows_resumes_and_is_dropped(
        tmp_path: Path, endpoint: Endpoint, harness: None) -> None:
    async with Endpoint() as other:
        flows_ab = [flow("f1", "crm", ["seg-a"]), flow("f2", "erp", ["seg-a"])]
        urls = {"crm": endpoint.url, "erp": other.url}
        config = write_config(tmp_path, urls, flows_ab)
        db = tmp_path / "relay.db"
        await ingest(config, person("p-1", {"seg-a": "realized"}),
                     person("p-2", {"seg-a": "realized"}))
        other.fail(1, 400)
        await stream(config, expect=3)  # f2: one export refused for good
        assert len(endpoint.requests) == 2 and len(other.requests) == 2

        write_config(tmp_path, urls, flows_ab[:1])  # f2 removed from the config
        await ingest(config, person("p-3", {"seg-a": "realized"}))
        await stream(config)
        assert set(bodies(endpoint)) == {"p-1", "p-2", "p-3"} and len(other.requests) == 2
        logs = [m for _, m in await flow_run_logs()]
        assert any("f2: no longer in the config: stopped, its state kept (0 pending, 1 failed)"
                   in m for m in logs), logs
        result = await cli("status", "-c", config, "--json")
        figures = {d["dataflow"]: d for d in orjson.loads(result.stdout)["dataflows"]}
        assert figures["f2"]["state"] == "removed" and figures["f1"]["state"] == "active"
        assert (figures["f2"]["pending"], figures["f2"]["failed"]) == (0, 1)
        table = await cli("status", "-c", config)
        assert "removed from the config, state kept: f2" in table.stdout, table.stdout
        refused = await cli("dataflows", "drop", "-c", config, "f1")
        assert refused.exit_code == 2 and "'f1' is still in the config" in refused.stderr

        write_config(tmp_path, urls, flows_ab)  # f2 is back: it resumes where it stopped
        await stream(config)
        assert [orjson.loads(r.body)["personalEmail"]["address"] for r in other.requests[2:]] == [
            "p-3@x.com"]  # the change made while it was away, and nothing again
        logs = [m for _, m in await flow_run_logs()]
        assert any("f2: back in the config: resuming where it stopped" in m for m in logs), logs

        write_config(tmp_path, urls, flows_ab[:1])
        await stream(config)
        dropped = await cli("dataflows", "drop", "-c", config, "f2")
        assert dropped.exit_code == 0, dropped.output
        assert "dropped dataflow 'f2'" in dropped.stdout and "failed requests 1" in dropped.stdout
        for table_, column in (("dataflows", "name"), ("dataflow_segments", "dataflow"),
                               ("dataflow_profiles", "dataflow"), ("outbox", "dataflow"),
                               ("deliveries", "dataflow"), ("failed_requests", "dataflow"),
                               ("backfills", "dataflow"), ("leases", "dataflow")):
            assert query(db, f"SELECT count(*) FROM {table_} WHERE {column} = 'f2'") == [(0,)]
        gone = await cli("dataflows", "drop", "-c", config, "f2")
        assert gone.exit_code == 2 and "no dataflow named 'f2'" in gone.stderr

        # f1 moves to another endpoint: a WARNING, the URL stored without its query string,
        # nothing sent again; the next change goes to the new endpoint
        write_config(tmp_path, {"crm": f"{other.url}?token=q-s3cret-77"}, flows_ab[:1])
        sent = len(other.requests)
        await stream(config)
        warnings = [m for level, m in await flow_run_logs() if level >= 30]
        assert any(f"f1: destination changed from crm ({endpoint.url}) to crm ({other.url})"
                   in m and "nothing is re-sent" in m for m in warnings), warnings
        assert query(db, "SELECT endpoint FROM dataflows WHERE name = 'f1'") == [(other.url,)]
        assert len(other.requests) == sent
        await ingest(config, person("p-1", {"seg-a": "existing"}))
        await stream(config)
        assert len(other.requests) == sent + 1
        assert other.requests[-1].query == [("token", "q-s3cret-77")]
    store_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*") if p.is_file())
    assert b"q-s3cret-77" not in store_bytes


# --- 4. forget ------------------------------------------------------------------------------

SECRET = "forget-me-7c1e0b9a44d2"


def store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("relay.db*") if p.is_file()}


@prefect
async def test_forget_leaves_no_byte_and_sends_nothing(tmp_path: Path, endpoint: Endpoint,
                                                       harness: None) -> None:
    config = write_config(tmp_path, {"crm": endpoint.url}, [flow("f", "crm", ["seg-a"])])
    crowd = [person(f"p-{i:04d}", {"seg-a": "realized"}) for i in range(400)]
    mine = [{**person(SECRET, {"seg-a": "realized"}, ids={"ecid": [{"id": f"{SECRET}-ecid"}]}),
             "attributes": {"personalEmail": {"address": f"{SECRET}@x.com"},
                            "notes": SECRET * n}} for n in (1, 5, 2)]
    await ingest(config, *crowd[:200], *mine, *crowd[200:], person("p-0007", {"seg-b": "realized"}))
    await stream(config)
    endpoint.fail(1, 400)  # its next state is refused: an entry in the failed store
    await ingest(config, person(SECRET, {"seg-a": "existing"}))
    await stream(config, expect=3)
    # a queued export too: decided, not yet sent
    await ingest(config, person(SECRET), person("p-0007"))
    cfg = load_config(config)
    store = open_store(cfg.state_path)
    pipeline.decide_pass(store, cfg, cfg.dataflow("f"), PassResult())
    assert store.pending_count("f") == 2
    store.close()
    assert SECRET.encode() in b"".join(store_files(tmp_path).values())

    ids = tmp_path / "ids.txt"
    ids.write_text("p-0007\n\nnot-a-profile\n", encoding="utf-8")
    result = await cli("forget", "-c", config, SECRET, "--file", ids)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "forgot 2 of 3 profile(s); 1 not in the store" in out
    for kind, count in (("profiles", 2), ("memberships", 3), ("queued exports", 2),
                        ("dataflow snapshots", 2), ("failed requests", 1)):
        assert f"{kind:<20} {count}\n" in out, (kind, out)
    assert "change log rows      8" in out and "delivery records     2" in out
    for name, data in store_files(tmp_path).items():  # as the files are now...
        assert SECRET.encode() not in data and b"p-0007" not in data, name
    query(tmp_path / "relay.db", "PRAGMA wal_checkpoint(TRUNCATE)")
    for name, data in store_files(tmp_path).items():  # ...and once the log is checkpointed
        assert SECRET.encode() not in data and b"p-0007" not in data, name

    endpoint.reset()
    await ingest(config, person("p-0001", {"seg-a": "existing"}))
    await stream(config)  # nothing is delivered for them afterwards
    assert set(bodies(endpoint)) == {"p-0001"}
    status = orjson.loads((await cli("status", "-c", config, "--json")).stdout)
    assert status["dataflows"][0]["pending"] == 0 and status["dataflows"][0]["failed"] == 0

    endpoint.reset()  # a later fragment for the same id starts a new profile
    await ingest(config, {"profileId": SECRET, "attributes": {"personalEmail": {"address": "new@x"}},
                          "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}})
    await stream(config)
    [request] = endpoint.requests
    body = orjson.loads(request.body)
    assert body["personalEmail"] == {"address": "new@x"} and body["identityMap"] == {}
    assert request.headers["X-Relay-Sequence"] == str(
        query(tmp_path / "relay.db", "SELECT max(seq) FROM changes")[0][0])


def free_pages(path: Path) -> list[bytes]:
    """The pages on an SQLite file's free list (trunk and leaf pages), read from the file."""
    data = path.read_bytes()
    size = int.from_bytes(data[16:18], "big") or 65536
    page = lambda n: data[(n - 1) * size:n * size]  # noqa: E731
    out, trunk = [], int.from_bytes(data[32:36], "big")
    while trunk:
        body = page(trunk)
        leaves = int.from_bytes(body[4:8], "big")
        out.append(body)
        out += [page(int.from_bytes(body[8 + 4 * i:12 + 4 * i], "big")) for i in range(leaves)]
        trunk = int.from_bytes(body[:4], "big")
    return out


def test_forget_zeroes_free_pages_holding_old_copies(tmp_path: Path) -> None:
    """Rows zeroed as they are deleted are not enough: moving cells between pages (a b-tree
    rebalancing as the outbox drains) frees whole pages with copies in them. Forget
    overwrites the free list too."""
    import random

    from state.model import Attempt, Export, Fragment

    rng = random.Random(1)
    secret = f"p-01500-{SECRET}"  # amid the others, in every b-tree
    store = open_store(tmp_path / "relay.db")
    store.sync_dataflow("f", "crm", ["seg-a"], "h")
    pids = [f"p-{i:05d}" for i in range(3000)]
    pids.insert(1500, secret)
    # rounds of ingest, export and delivery until a page on the free list holds a copy (how
    # many depends on the schema's page layout; a few suffice)
    for _ in range(12):
        fragments = []
        for pid in pids:
            fragment = Fragment(pid, 0, attributes={"email": f"{pid}@x.com",
                                                    "n": "x" * rng.randint(1, 50)},
                                identities={"email": [{"id": f"{pid}@x.com"}]},
                                segments={"seg-a": ("realized", "2026-01-01T00:00:00Z")})
            fragment.paths = ["email", "n"]
            fragments.append(fragment)
        last = store.append_changes(fragments)
        store.enqueue_exports("f", [Export(pid, last, "attribute", 0, "seg-a") for pid in pids])
        items = store.claim_due("f", 2**62, 100_000)
        store.record_outcomes("f", [Attempt(i, i.seq, "k", 200, None, 0) for i in items], [], [])
        store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if any(secret.encode() in page for page in free_pages(tmp_path / "relay.db")):
            break
    else:
        raise AssertionError("no free page ever held a copy of the id")
    done = store.forget([secret])
    assert done.counts["profiles"] == 1 and done.free_pages_zeroed > 0 and done.wal_truncated
    assert not any(secret.encode() in data for data in store_files(tmp_path).values())
    assert store.profile_count() == 3000
    store.close()


def test_forget_rewrites_a_store_from_an_earlier_version_once(tmp_path: Path) -> None:
    """A store whose deletes were never zeroed (made by an earlier version) may hold old
    copies anywhere: its first forget rewrites the file."""
    config = write_config(tmp_path, {"crm": "http://127.0.0.1:9/x"}, [flow("f", "crm", ["seg-a"])])
    store = open_store(tmp_path / "relay.db")
    store.db.conn.execute("PRAGMA secure_delete = OFF")  # as an earlier version wrote
    store.db.conn.execute("UPDATE store_flags SET value = 0")
    cfg = load_config(config)
    ingest_lines(store, cfg, *(orjson.dumps({**person(SECRET), "attributes": {"n": "x" * i}}) + b"\n"
                               for i in range(1, 40)))
    store.prune_changes(2**62, 1000)  # old versions of its rows go to free space, unzeroed
    first = lifecycle.forget_profiles(store, [SECRET])
    assert first.rewritten and first.counts["profiles"] == 1
    assert SECRET.encode() not in b"".join(store_files(tmp_path).values())
    assert not lifecycle.forget_profiles(store, ["nobody"]).rewritten
    store.close()


# --- 5. retention ---------------------------------------------------------------------------

@prefect
async def test_retention_prunes_what_every_dataflow_read(tmp_path: Path, endpoint: Endpoint,
                                                         harness: None) -> None:
    db = tmp_path / "relay.db"
    both = [flow("f1", "crm", ["seg-a"]), flow("f2", "crm", ["seg-a"])]
    config = write_config(tmp_path, {"crm": endpoint.url}, both, retention_days=7)
    await ingest(config, *(person(f"p-{i}", {"seg-a": "realized"}) for i in range(10)))
    endpoint.fail(1, 400)  # one failed-store entry, kept until replayed
    await stream(config, expect=3)
    write_config(tmp_path, {"crm": endpoint.url}, both[:1], retention_days=7)
    await ingest(config, *(person(f"q-{i}", {"seg-a": "realized"}) for i in range(10)))
    await stream(config)  # f2, removed, has not read the q-* changes
    cursors = dict(query(db, "SELECT name, cursor FROM dataflows"))
    assert cursors == {"f1": 20, "f2": 10}
    # eight days pass
    for sql in ("UPDATE changes SET committed_at = committed_at - 8 * 86400000",
                "UPDATE deliveries SET delivered_at = delivered_at - 8 * 86400000",
                "UPDATE failed_requests SET first_attempt_at = first_attempt_at - 8 * 86400000, "
                "last_attempt_at = last_attempt_at - 8 * 86400000"):
        query(db, sql)
    await stream(config)
    assert query(db, "SELECT min(seq), count(*) FROM changes") == [(11, 10)]  # f2 holds them
    assert query(db, "SELECT count(*) FROM deliveries") == [(0,)]
    assert query(db, "SELECT count(*) FROM failed_requests WHERE state = 'failed'") == [(1,)]
    assert (await cli("dataflows", "drop", "-c", config, "f2")).exit_code == 0
    await stream(config)
    assert query(db, "SELECT seq FROM changes") == [(20,)]  # the newest row stays
    await ingest(config, person("p-1", {"seg-a": "existing"}))
    await stream(config)
    assert query(db, "SELECT seq FROM changes") == [(21,)]  # 20, old, is no longer the newest

    for bad in (0, "a week", 99999):
        write_config(tmp_path, {"crm": endpoint.url}, both[:1], retention_days=bad)
        result = await cli("validate", "-c", config)
        assert result.exit_code == 2 and "retention_days" in result.stderr, (bad, result.output)


def test_upkeep_prunes_a_backlog_a_few_small_transactions_per_poll(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(lifecycle, "PRUNE_BATCH", 10)
    monkeypatch.setattr(lifecycle, "PRUNE_BATCHES_PER_POLL", 3)
    config = load_config(write_config(tmp_path, {"crm": "http://127.0.0.1:9/x"},
                                      [flow("f", "crm", ["seg-a"])], retention_days=1))
    store = open_store(config.state_path)
    ingest_lines(store, config, *(orjson.dumps(person(f"p-{i}")) + b"\n" for i in range(100)))
    pipeline.decide_pass(store, config, config.dataflow("f"), PassResult())
    later = time.time_ns() // 1_000_000 + 2 * DAY_MS
    polls = []
    for _ in range(10):
        polls.append(lifecycle.upkeep(store, config, now=later).pruned["changes"])
    assert polls[:4] == [30, 30, 30, 9] and set(polls[4:]) == {0}  # the newest row stays
    store.close()


# --- 6. a unique identifier -----------------------------------------------------------------

@prefect
async def test_profiles_nobody_could_identify_are_not_sent_and_counted(
        tmp_path: Path, endpoint: Endpoint, harness: None) -> None:
    config = write_config(tmp_path, {"crm": endpoint.url},
                          [flow("f", "crm", ["seg-a"], attributes=("person.name.firstName",))])
    result = await cli("validate", "-c", config)
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: dataflows[0] (f) maps no identity-bearing attribute (a path "
                        "with email, phone or an id); its receivers can tell profiles apart "
                        "only by their identity map, and a profile without identities is not "
                        "sent"]
    await ingest(config,
                 {"profileId": "p-anon", "attributes": {"loyalty": {"tier": "gold"}},
                  "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}},
                 {"profileId": "p-named", "attributes": {"person": {"name": {"firstName": "Ann"}}},
                  "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}},
                 {"profileId": "p-known", "identityMap": {"ecid": [{"id": "e-9"}]},
                  "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}})
    await stream(config)
    sent = [orjson.loads(r.body) for r in endpoint.requests]
    assert len(sent) == 2 and all(b.get("person") or b["identityMap"] for b in sent)
    status = orjson.loads((await cli("status", "-c", config, "--json")).stdout)["dataflows"][0]
    assert status["skipped"] == {"no identity and no mapped attribute": 1}
    table = (await cli("status", "-c", config)).stdout
    assert "f: skipped (closed without a request): 1 no identity and no mapped attribute" in table

    mapped = write_config(tmp_path, {"crm": endpoint.url}, [flow("f", "crm", ["seg-a"])])
    result = await cli("validate", "-c", mapped)
    assert result.exit_code == 0 and "warning" not in result.stderr


# --- 7. big profiles ------------------------------------------------------------------------

@prefect
async def test_a_413_names_the_body_size(tmp_path: Path, endpoint: Endpoint,
                                         harness: None) -> None:
    catalogue = [{"id": f"seg-{i:05d}", "name": f"Segment {i:05d} of a large catalogue, with a "
                  "long name"} for i in range(9_000)]
    config = write_config(tmp_path, {"crm": endpoint.url}, [flow("f", "crm", ["seg-00000"])],
                          segments=catalogue)
    doc = yaml.safe_load(config.read_text())
    doc["destinations"][0]["include_segment_names"] = True
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    await ingest(config, person("p-big", {s["id"]: "realized" for s in catalogue}))
    result = await stream(config, expect=3)
    store = open_store(tmp_path / "relay.db")
    [failed] = store.open_failures("f")
    store.close()
    assert failed.last_status == 413
    size = int(failed.last_error.split("request body of ")[1].split(" bytes")[0].replace(",", ""))
    assert 1_048_576 < size < 1_500_000, failed.last_error
    assert failed.last_error.startswith("HTTP 413 ") and "request body of" in result.output


def test_validate_a_large_config_warns_once_per_dataflow(tmp_path: Path) -> None:
    """5,000 segments and 200 dataflows (its speed is measured by bench/validate.py)."""
    segments = [{"id": f"seg-{i:05d}", "name": f"Segment {i}", "createdAt": 1648553325000}
                for i in range(5_000)]
    flows = [flow(f"f-{i:03d}", "crm", [f"seg-{j:05d}" for j in range(i * 25, i * 25 + 25)],
                  attributes=("person.name.firstName",)) for i in range(200)]
    config = write_config(tmp_path, {"crm": "http://127.0.0.1:9/x"}, flows, segments=segments)
    result = run_cli("validate", "-c", config)
    assert result.exit_code == 0
    assert "5000 segment(s), 1 destination(s), 200 dataflow(s)" in result.stdout
    assert result.stderr.count("maps no identity-bearing attribute") == 200


# --- the property: receivers hold what the rules make of the final store ---------------------

MAPPED_SEGMENTS = ("seg-a", "seg-b")  # remaps toggle these; seg-c is never mapped
PIDS = ("p-1", "p-2", "p-3")

fragment_ops = st.one_of(
    st.tuples(st.just("attr"), st.sampled_from(PIDS), st.sampled_from(["x", "y", None])),
    st.tuples(st.just("unmapped"), st.sampled_from(PIDS), st.sampled_from(["u", "v"])),
    st.tuples(st.just("id"), st.sampled_from(PIDS), st.sampled_from(["ecid", "email"]),
              st.sampled_from(["1", "2"]), st.sampled_from([None, True, False, "removed"])),
    st.tuples(st.just("ns_null"), st.sampled_from(PIDS), st.sampled_from(["ecid", "email"])),
    st.tuples(st.just("seg"), st.sampled_from(PIDS), st.sampled_from(["seg-a", "seg-b", "seg-c"]),
              st.sampled_from(["realized", "existing", "exited"])),
)
# A round: a few fragments, maybe a new mapping, maybe a forget, then the pipeline runs.
rounds = st.lists(st.tuples(
    st.lists(fragment_ops, max_size=3),
    st.sampled_from([None, None, ("seg-a",), ("seg-b",), MAPPED_SEGMENTS]),
    st.sampled_from([None, None, None, *PIDS]),
), min_size=1, max_size=6)


def ops_of(script: list[tuple]) -> list[tuple]:
    out: list[tuple] = []
    for fragments, remap, forget in script:
        out += fragments
        if remap is not None:
            out.append(("remap", remap))
        if forget is not None:
            out.append(("forget", forget))
        out.append(("run",))
    return out


def fragment_of(op: tuple) -> dict[str, Any] | None:
    """The fragment an operation writes. Each carries a ``crm`` identity that the
    operations never remove, so every profile can be identified (a profile that cannot is
    not sent at all: ``test_profiles_nobody_could_identify_are_not_sent_and_counted``)."""
    kind = op[0]
    if kind not in ("attr", "unmapped", "id", "ns_null", "seg"):
        return None
    doc: dict[str, Any] = {"profileId": op[1], "identityMap": {"crm": [{"id": op[1]}]}}
    if kind == "attr":
        doc["attributes"] = {"a": {"x": op[2]}}
    elif kind == "unmapped":
        doc["attributes"] = {"b": op[2]}
    elif kind == "id":
        entry: dict[str, Any] = {"id": op[3]}
        if op[4] == "removed":
            entry["removed"] = True
        elif op[4] is not None:
            entry["primary"] = op[4]
        doc["identityMap"][op[2]] = [entry]
    elif kind == "ns_null":
        doc["identityMap"][op[2]] = None
    else:
        doc["segmentMembership"] = {"ups": {op[2]: {"status": op[3]}}}
    return doc


def project(body: dict[str, Any], mapped: tuple[str, ...]) -> tuple:
    """What the export rules promise a receiver knows: the mapped attributes, the identity
    map, and which mapped segments the profile is qualified for."""
    ups = body["segmentMembership"]["ups"]
    return (body.get("a"), body["identityMap"],
            {s for s in mapped if ups.get(s, {}).get("status") in ("realized", "existing")})


async def play(directory: Path, script: list[tuple]) -> None:
    from tasks.body import render

    async with Endpoint() as endpoint:
        def configure(segments: tuple[str, ...]) -> Any:
            path = write_config(directory, {"crm": endpoint.url},
                                [flow("f", "crm", list(segments), attributes=("a",))])
            return load_config(path)

        mapping = MAPPED_SEGMENTS
        config = configure(mapping)
        store = open_store(config.state_path)
        await pipeline.run_until_settled(store, config, config.dataflow("f"))  # both mapped once
        owner: dict[int, str] = {}        # change seq -> profile
        since: dict[str, int] = {}        # profile -> requests seen before its last forget

        async def settle() -> None:
            await pipeline.run_until_settled(store, config, config.dataflow("f"))

        for op in [*script, ("run",)]:
            if (doc := fragment_of(op)) is not None:
                ingest_lines(store, config, orjson.dumps(doc) + b"\n")
                owner[store.head_seq()] = op[1]
            elif op[0] == "remap":
                mapping = op[1]
                config = configure(mapping)
            elif op[0] == "forget":
                await settle()  # what is in flight lands first; then nothing more may
                lifecycle.forget_profiles(store, [op[1]])
                since[op[1]] = len(endpoint.requests)
            else:
                await settle()
        last: dict[str, dict[str, Any]] = {}
        for index, request in enumerate(endpoint.requests):
            pid = owner[int(request.headers["X-Relay-Sequence"])]
            if index >= since.get(pid, 0):
                last[pid] = orjson.loads(request.body)
        spec = pipeline.body_spec(store, config, config.dataflow("f"))
        for pid, profile in store.load_profiles(list(PIDS)).items():
            want = project(orjson.loads(render(profile, spec)), mapping)
            if want[2]:  # qualified now: the receiver holds this state
                assert pid in last and project(last[pid], mapping) == want, (pid, script)
            else:        # not qualified: the receiver knows it, or never heard of it
                assert pid not in last or not project(last[pid], mapping)[2], (pid, script)
        store.close()


def seg(pid: str, segment: str, status: str) -> tuple:
    return ("seg", pid, segment, status)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(rounds)
# exits while a segment was unmapped: p-1 seen by no export; p-2 and p-3 exported while it
# was unmapped (showing it still qualified), exiting after
@example([([seg("p-1", "seg-a", "realized"), seg("p-2", "seg-a", "realized"),
            seg("p-3", "seg-a", "realized")], None, None),
          ([seg("p-3", "seg-b", "realized")], ("seg-b",), None),
          ([("attr", "p-3", "x"), seg("p-1", "seg-a", "exited"),
            seg("p-2", "seg-b", "realized")], None, None),
          ([seg("p-2", "seg-a", "exited"), seg("p-3", "seg-a", "exited")], None, None),
          ([], MAPPED_SEGMENTS, None)])
# a profile forgotten, and started again with the same id
@example([([seg("p-1", "seg-a", "realized"), ("id", "p-1", "ecid", "1", True)], None, "p-1"),
          ([seg("p-1", "seg-b", "existing"), ("attr", "p-1", "y")], ("seg-b",), None)])
# identities added, changed, removed, a namespace removed; unmapped writes
@example([([seg("p-2", "seg-b", "realized"), ("id", "p-2", "email", "1", None)], None, None),
          ([("id", "p-2", "email", "1", False), ("unmapped", "p-2", "u")], None, None),
          ([("id", "p-2", "email", "1", "removed"), ("id", "p-2", "ecid", "2", None)], None, None),
          ([("ns_null", "p-2", "ecid")], None, None)])
def test_receivers_hold_what_the_rules_make_of_the_final_store(script: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(play(Path(directory), ops_of(script)))

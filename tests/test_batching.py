"""Batching (`batch:` on a destination) against a real endpoint on loopback, mostly through
the command line (`stream --once`, `backfill`, `replay` run by typer's CliRunner in a
thread beside the endpoint, on the session's Prefect harness): batch sizes and counts in
both formats, the byte cut, per-profile order across batches under retries and newer
states, one key and one signature per request, failing batches in the failed store, the
rate and in-flight limits counting requests, and the wait to fill a batch."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import app
from config import load_config
from tasks import pipeline
from tasks.body import render
from tasks.dispatch import BATCH_SIZE_HEADER, SEQUENCE_HEADER
from testkit.procs import write_config
from testkit.servers import Endpoint, Recorded, verify_signature
from tests.relay_fixtures import FAST, FLOW, decide, fragment, ingest, store

pytestmark = pytest.mark.prefect


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """The CLI's flows run on the session's Prefect harness."""


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def relay(tmp_path: Path, *args: str) -> Any:
    """`profile-relay COMMAND -c config.yaml ARGS...` in a thread: the endpoint keeps serving."""
    command, *rest = args
    return await asyncio.to_thread(cli, command, "-c", str(tmp_path / "config.yaml"), *rest)


def names(request: Recorded) -> list[str]:
    """The first names in a JSON-array or NDJSON batch, in body order."""
    if request.headers["Content-Type"] == "application/x-ndjson":
        docs = [orjson.loads(line) for line in request.body.split(b"\n") if line]
    else:
        docs = orjson.loads(request.body)
    return [d["person"]["name"]["firstName"] for d in docs]


def failed_rows(db) -> list[dict]:
    return list(db.db.query("SELECT * FROM failed_requests ORDER BY id"))


class StatusEndpoint(Endpoint):
    """Records the status of each answer; ``on_first`` runs once, as the first request is
    answered (while the relay is mid-run)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []
        self.on_first: Any = None

    def answered(self, request: Recorded, status: int) -> None:
        self.statuses.append(status)
        if self.on_first is not None:
            hook, self.on_first = self.on_first, None
            hook()


# --- sizes, counts and formats ------------------------------------------------------------


async def test_json_array_batches_sizes_counts_and_headers(tmp_path, endpoint):
    secret = "whsec_" + "YmF0Y2gtc2lnbmluZy1rZXk="
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 3},
                       signing_secret=secret)
    ingest(db, config, *(fragment(f"p-{i}", f"n{i}") for i in range(7)))
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 0, result.output

    sizes = [len(names(r)) for r in endpoint.requests]
    assert sorted(sizes, reverse=True) == [3, 3, 1]
    assert sorted(n for r in endpoint.requests for n in names(r)) == sorted(
        f"n{i}" for i in range(7))  # each profile once, never two of one profile in a batch
    profiles = db.load_profiles([f"p-{i}" for i in range(7)])
    spec = pipeline.body_spec(db, config, config.dataflow(FLOW))
    seed = {render(p, spec) for p in profiles.values()}
    keys = set()
    for r in endpoint.requests:
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers[BATCH_SIZE_HEADER] == str(len(names(r)))
        assert SEQUENCE_HEADER not in r.headers  # a batch carries many states
        # the members are the seed's objects, byte for byte, in a JSON array
        assert r.body.startswith(b"[") and r.body.endswith(b"]")
        parts = [orjson.dumps(doc) for doc in orjson.loads(r.body)]
        assert r.body == b"[" + b",".join(parts) + b"]" and set(parts) <= seed
        # one key and one signature per request; the signature checks out
        assert verify_signature(secret, r.headers, r.body)
        assert r.headers["webhook-id"] == r.headers["Idempotency-Key"]
        keys.add(r.headers["Idempotency-Key"])
    assert len(keys) == 3
    rows = list(db.db.query("SELECT profile_id, idempotency_key, attempts FROM deliveries"))
    assert len(rows) == 7 and {r["idempotency_key"] for r in rows} == keys
    assert {r["attempts"] for r in rows} == {1}
    assert db.pending_count(FLOW) == 0


async def test_ndjson_batches(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 4, "format": "ndjson"})
    ingest(db, config, *(fragment(f"p-{i}", f"n{i}") for i in range(10)))
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 0, result.output
    assert sorted(len(names(r)) for r in endpoint.requests) == [2, 4, 4]
    for r in endpoint.requests:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        lines = r.body.split(b"\n")
        assert lines[-1] == b""  # every line ends with a newline, the last one too
        assert all(orjson.dumps(orjson.loads(line)) == line for line in lines[:-1])
        assert r.headers[BATCH_SIZE_HEADER] == str(len(lines) - 1)
    assert db.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 10


async def test_max_bytes_cuts_before_the_limit_and_sends_a_big_export_alone(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    names_in_order = [f"n{i:02d}" for i in range(12)]
    names_in_order[5] = "B" + "x" * 3000  # one export larger than max_bytes
    ingest(db, config, *(fragment(f"p-{i:02d}", n) for i, n in enumerate(names_in_order)))
    spec = pipeline.body_spec(db, config, config.dataflow(FLOW))
    part = len(render(db.load_profiles(["p-00"])["p-00"], spec))
    max_bytes = 3 * part + 4 + part // 2  # three parts fit ([a,b,c]), four do not
    write_config(tmp_path, endpoint.url, **FAST, batch={"max_profiles": 100,
                                                         "max_bytes": max_bytes})
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 0, result.output

    batches = sorted((names(r) for r in endpoint.requests),
                     key=lambda batch: names_in_order.index(batch[0]))
    assert batches == [names_in_order[0:3], names_in_order[3:5], names_in_order[5:6],
                       names_in_order[6:9], names_in_order[9:12]]
    for r in endpoint.requests:
        if len(names(r)) > 1:
            assert len(r.body) <= max_bytes
        if len(names(r)) == 3:
            assert len(r.body) + 1 + part > max_bytes  # a fourth would not have fitted
        elif len(names(r)) == 1:
            assert len(r.body) > max_bytes  # the big one, alone
    assert db.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 12


async def test_backfill_is_batched_too(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 3})
    ingest(db, config, *(fragment(f"p-{i}", f"n{i}") for i in range(7)))
    result = await relay(tmp_path, "stream", "--once")  # the stream's exports first
    assert result.exit_code == 0, result.output
    endpoint.reset()
    result = await relay(tmp_path, "backfill", "--dataflow", FLOW)
    assert result.exit_code == 0, result.output
    assert sorted(len(names(r)) for r in endpoint.requests) == [1, 3, 3]
    assert sorted(n for r in endpoint.requests for n in names(r)) == [f"n{i}" for i in range(7)]
    assert db.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 14


# --- order, retries, failures ---------------------------------------------------------------


async def test_order_per_profile_across_batches_under_retries(tmp_path):
    async with StatusEndpoint() as endpoint:
        config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 3})
        pids = [f"p-{i}" for i in range(9)]
        ingest(db, config, *(fragment(pid, f"{pid}/v1") for pid in pids))
        endpoint.fail(2, 503)  # two of the three batches are refused once

        def newer_state() -> None:  # mid-run, while batches wait for their retry
            ingest(db, config, fragment("p-0", "p-0/v2"))

        endpoint.on_first = newer_state
        result = await relay(tmp_path, "stream", "--once")
        assert result.exit_code == 0, result.output
        assert endpoint.statuses.count(503) == 2

        # each profile's states in the order they reached the endpoint, with the answer
        seen: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for request, status in zip(endpoint.requests, endpoint.statuses, strict=True):
            for name in names(request):
                pid, version = name.split("/")
                seen[pid].append((version, status))
        for pid in pids:
            versions = [v for v, _ in seen[pid]]
            assert versions == sorted(versions), (pid, seen[pid])  # never v1 after v2
            assert [s for _, s in seen[pid]].count(200) >= 1
            newest = "v2" if pid == "p-0" else "v1"
            assert [v for v, s in seen[pid] if s == 200][-1] == newest
        # a refused batch whose members did not change goes again as it was: same members,
        # same body, same key
        for request, status in zip(endpoint.requests, endpoint.statuses, strict=True):
            if status == 503 and not any(n.startswith("p-0/") for n in names(request)):
                again = [r for r in endpoint.requests
                         if r.headers["Idempotency-Key"] == request.headers["Idempotency-Key"]]
                assert len(again) == 2 and again[0].body == again[1].body
        by_profile: dict[str, list[int]] = defaultdict(list)
        for row in db.db.query("SELECT profile_id, seq FROM deliveries ORDER BY id"):
            by_profile[row["profile_id"]].append(row["seq"])
        current = {pid: p.last_seq for pid, p in db.load_profiles(pids).items()}
        assert {pid: seqs[-1] for pid, seqs in by_profile.items()} == current
        assert all(seqs == sorted(seqs) for seqs in by_profile.values())
        assert db.pending_count(FLOW) == 0 and failed_rows(db) == []


async def test_a_retried_batch_repeats_its_key_and_a_failed_one_fills_the_failed_store(
        tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 3})
    ingest(db, config, *(fragment(f"p-{i}", f"n{i}") for i in range(7)))
    endpoint.always(503)
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 3, result.output
    assert "7 export(s) ended in the failed store" in result.output
    by_key: dict[str, list[bytes]] = defaultdict(list)
    for r in endpoint.requests:
        by_key[r.headers["Idempotency-Key"]].append(r.body)
    # three batches, each tried three times as a unit: same members, same body, same key
    assert sorted(len(bodies) for bodies in by_key.values()) == [3, 3, 3]
    assert all(len(set(bodies)) == 1 for bodies in by_key.values())
    rows = failed_rows(db)
    assert len(rows) == 7  # each export of each failed batch, on its own row
    assert {r["profile_id"] for r in rows} == {f"p-{i}" for i in range(7)}
    assert {(r["attempts"], r["last_status"]) for r in rows} == {(3, 503)}
    assert {r["idempotency_key"] for r in rows} == set(by_key)  # the request's key
    keys = defaultdict(set)
    for r in rows:
        keys[r["idempotency_key"]].add(r["profile_id"])
    assert sorted(len(v) for v in keys.values()) == [1, 3, 3]

    endpoint.reset()  # replay: the failed exports go out again, batched
    result = await relay(tmp_path, "replay", "--dataflow", FLOW)
    assert result.exit_code == 0, result.output
    assert sorted(len(names(r)) for r in endpoint.requests) == [1, 3, 3]
    assert {r["state"] for r in failed_rows(db)} == {"requeued"}
    assert db.db.execute("SELECT count(DISTINCT profile_id) FROM deliveries").fetchone()[0] == 7


async def test_a_refused_batch_is_not_retried_and_each_export_is_kept(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 5})
    ingest(db, config, *(fragment(f"p-{i}", f"n{i}") for i in range(5)))
    endpoint.fail(1, 422)
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 3, result.output
    [request] = endpoint.requests
    rows = failed_rows(db)
    assert [r["profile_id"] for r in rows] == [f"p-{i}" for i in range(5)]
    assert {(r["attempts"], r["last_status"], r["idempotency_key"]) for r in rows} == {
        (1, 422, request.headers["Idempotency-Key"])}
    assert all("HTTP 422" in r["last_error"] for r in rows)


# --- limits count requests -------------------------------------------------------------------


async def test_rate_limit_counts_requests(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, rate_limit=5, batch={"max_profiles": 5})
    ingest(db, config, *(fragment(f"p-{i}") for i in range(20)))
    decide(db, config)
    started = time.monotonic()
    await pipeline.deliver(db, config, config.dataflow(FLOW))
    elapsed = time.monotonic() - started
    assert len(endpoint.requests) == 4
    # 4 requests at 5/s (burst 1) take at least 0.6 s; 20 exports counted one by one would
    # take at least 3.8 s
    assert 0.55 <= elapsed < 3.0


async def test_in_flight_limit_counts_requests(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, max_in_flight=2, batch={"max_profiles": 2})
    ingest(db, config, *(fragment(f"p-{i}") for i in range(12)))
    decide(db, config)
    endpoint.delay = 0.1
    await pipeline.deliver(db, config, config.dataflow(FLOW))
    assert len(endpoint.requests) == 6
    assert endpoint.max_in_flight == 2


# --- waiting to fill a batch -----------------------------------------------------------------


async def test_a_streaming_pass_waits_to_fill_a_batch(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url,
                       batch={"max_profiles": 10, "max_wait_ms": 3000})
    flow = config.dataflow(FLOW)
    ingest(db, config, *(fragment(f"p-{i}") for i in range(4)))
    started = time.monotonic()
    pass_ = asyncio.create_task(pipeline.run_pass(db, config, flow, fill_wait=True))
    await asyncio.sleep(0.3)
    assert endpoint.requests == []  # waiting for more
    ingest(db, config, *(fragment(f"p-{i}") for i in range(4, 10)))
    result = await pass_
    assert time.monotonic() - started < 2.5  # sent as soon as the batch was full
    [request] = endpoint.requests
    assert len(orjson.loads(request.body)) == 10
    assert result.delivery.delivered == 10 and result.exports == 10


async def test_the_wait_is_bounded_and_settling_runs_never_wait(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, batch={"max_profiles": 10, "max_wait_ms": 500})
    flow = config.dataflow(FLOW)
    ingest(db, config, *(fragment(f"p-{i}") for i in range(3)))
    started = time.monotonic()
    result = await pipeline.run_pass(db, config, flow, fill_wait=True)
    assert 0.45 <= time.monotonic() - started < 3.0
    assert result.delivery.delivered == 3 and len(endpoint.requests) == 1
    ingest(db, config, *(fragment(f"p-{i}") for i in range(3, 5)))
    started = time.monotonic()
    result = await pipeline.run_pass(db, config, flow)  # --once, backfill, replay
    assert time.monotonic() - started < 0.45
    assert result.delivery.delivered == 2


def test_batch_options_are_validated(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:9/hook",
                          batch={"max_profiles": 10001, "max_bytes": 0, "format": "xml",
                                 "max_wait_ms": -1})
    result = cli("validate", "-c", str(config))
    assert result.exit_code == 2
    for path in ("destinations[0].batch.max_profiles", "destinations[0].batch.max_bytes",
                 "destinations[0].batch.format", "destinations[0].batch.max_wait_ms"):
        assert path in result.stderr, result.stderr
    assert load_config(write_config(tmp_path, "http://127.0.0.1:9/hook")).destinations[
        0].batch.max_profiles == 1  # the default: unbatched

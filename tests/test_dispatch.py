"""Delivery against a real endpoint on loopback: retries, failed store, replay, order,
rate and concurrency limits, and secrets kept out of everything we store."""

from __future__ import annotations

import time

import orjson
import pytest

from tasks import pipeline
from tasks.dispatch import SEQUENCE_HEADER
from tests.relay_fixtures import FLOW, decide, fragment, ingest, store


async def run_drain(config, st) -> None:
    """One attempt for each export due, as a stream pass makes it."""
    await pipeline.deliver(st, config, config.dataflow(FLOW))


def replay(config, st) -> pipeline.ReplayPlan:
    return pipeline.replay(st, config.dataflow(FLOW))


async def failed_for_good(tmp_path, endpoint):
    """p-1 sent three times against a 500: (config, store, the first request sent)."""
    config, st = store(tmp_path, endpoint.url)
    ingest(st, config, fragment("p-1", "old"))
    decide(st, config)
    endpoint.always(500)
    for _ in range(3):
        await run_drain(config, st)
    return config, st, endpoint.requests[0]


def failed_rows(st):
    return list(st.db.query("SELECT * FROM failed_requests ORDER BY id"))


async def test_delivers_with_headers_query_and_idempotency_key(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url + "?x=1", headers="h1:v1,h2:v2",
                       query_parameters="p1=a&p2=b")
    ingest(db, config, fragment("p-1"), fragment("p-2"))
    decide(db, config)
    await run_drain(config, db)
    assert len(endpoint.requests) == 2
    for req in endpoint.requests:
        assert req.method == "POST"
        assert req.headers["Content-Type"] == "application/json"
        assert (req.headers["h1"], req.headers["h2"]) == ("v1", "v2")
        assert dict(req.query) == {"x": "1", "p1": "a", "p2": "b"}
        assert req.headers["Idempotency-Key"]
        assert req.headers["User-Agent"].startswith("profile-relay/")
        assert int(req.headers[SEQUENCE_HEADER]) > 0
    assert db.pending_count(FLOW) == 0
    assert db.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2


async def test_success_after_two_failures(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.fail(2, 503)
    for _ in range(3):
        await run_drain(config, db)
    keys = {r.headers["Idempotency-Key"] for r in endpoint.requests}
    assert len(endpoint.requests) == 3 and len(keys) == 1  # same key on every retry
    delivered = list(db.db.query("SELECT attempts, status FROM deliveries"))
    assert delivered == [{"attempts": 3, "status": 200}]
    assert failed_rows(db) == []


async def test_failed_store_after_three_attempts(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.always(500)
    for _ in range(5):
        await run_drain(config, db)
    assert len(endpoint.requests) == 3  # never a fourth attempt
    [row] = failed_rows(db)
    assert (row["profile_id"], row["attempts"], row["last_status"]) == ("p-1", 3, 500)
    assert row["idempotency_key"] == endpoint.requests[0].headers["Idempotency-Key"]
    assert row["first_attempt_at"] <= row["last_attempt_at"]
    assert db.pending_count(FLOW) == 0


async def test_no_retry_on_400(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.fail(1, 400)
    await run_drain(config, db)
    await run_drain(config, db)
    assert len(endpoint.requests) == 1
    [row] = failed_rows(db)
    assert (row["attempts"], row["last_status"]) == (1, 400)


async def test_connection_drop_is_retried(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.drop(1)
    await run_drain(config, db)
    await run_drain(config, db)
    assert db.db.execute("SELECT attempts FROM deliveries").fetchone()[0] == 2


async def test_retry_after_sets_the_next_attempt(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.retry_after("2")
    before = time.time() * 1000
    await run_drain(config, db)
    row = db.db.execute("SELECT attempts, next_attempt_at, last_status FROM outbox").fetchone()
    assert row[0] == 1 and row[2] == 429
    assert row[1] >= before + 2000  # not due before Retry-After has passed
    await run_drain(config, db)
    assert len(endpoint.requests) == 1  # still waiting


async def test_order_per_profile_kept_under_retries(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1", "v1"))
    decide(db, config)
    endpoint.fail(1, 503)
    await run_drain(config, db)  # v1 failed once, waits for its retry
    ingest(db, config, fragment("p-1", "v2"))
    decide(db, config)  # the newer export replaces the waiting one
    for _ in range(3):
        await run_drain(config, db)
    seqs = [int(r.headers[SEQUENCE_HEADER]) for r in endpoint.requests]
    names = [orjson.loads(r.body)["person"]["name"]["firstName"] for r in endpoint.requests]
    assert seqs == sorted(seqs)
    assert names == ["v1", "v2"]
    assert db.pending_count(FLOW) == 0


async def test_replay_of_the_same_state_repeats_its_key(tmp_path, endpoint):
    config, db, failed = await failed_for_good(tmp_path, endpoint)
    endpoint.reset()
    plan = replay(config, db)
    assert [e.profile_id for e in plan.resent] == ["p-1"] and plan.superseded == []
    await run_drain(config, db)
    [req] = endpoint.requests
    # the same state: the same body, the same key, so a receiver may drop it as a duplicate
    assert req.body == failed.body
    assert req.headers["Idempotency-Key"] == failed.headers["Idempotency-Key"]
    assert [r["state"] for r in failed_rows(db)] == ["requeued"]
    again = replay(config, db)
    assert again.resent == [] and again.superseded == []  # nothing open any more


async def test_replay_sends_the_current_state_under_a_new_key(tmp_path, endpoint):
    config, db, failed = await failed_for_good(tmp_path, endpoint)
    # an unmapped write exports nothing, but it is a newer state: a replay sends it, and a
    # receiver that drops duplicate keys must not drop it
    ingest(db, config, b'{"profileId": "p-1", "attributes": {"loyalty": "gold"}}\n')
    ingest(db, config, fragment("p-1", "new", status=None))
    db.db.conn.execute("UPDATE dataflows SET cursor = (SELECT max(seq) FROM changes)")
    endpoint.reset()
    replay(config, db)
    await run_drain(config, db)
    [req] = endpoint.requests
    assert orjson.loads(req.body)["person"]["name"]["firstName"] == "new"
    assert req.headers["Idempotency-Key"] != failed.headers["Idempotency-Key"]
    assert int(req.headers[SEQUENCE_HEADER]) > int(failed.headers[SEQUENCE_HEADER])


async def test_replay_supersedes_entries_delivered_since(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1", "old"), fragment("p-2", "x"))
    decide(db, config)
    endpoint.fail(2, 400)
    await run_drain(config, db)
    assert len(failed_rows(db)) == 2
    ingest(db, config, fragment("p-1", "new"))  # a newer state of p-1 is delivered
    decide(db, config)
    await run_drain(config, db)
    endpoint.reset()
    plan = replay(config, db)
    assert [e.profile_id for e in plan.superseded] == ["p-1"]
    assert [e.profile_id for e in plan.resent] == ["p-2"]
    await run_drain(config, db)
    assert [orjson.loads(r.body)["person"]["name"]["firstName"] for r in endpoint.requests] == ["x"]
    states = {r["profile_id"]: r["state"] for r in failed_rows(db)}
    assert states == {"p-1": "superseded", "p-2": "requeued"}


async def test_rate_limit_held(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, rate_limit=50)
    ingest(db, config, *(fragment(f"p-{i}") for i in range(40)))
    decide(db, config)
    started = time.monotonic()
    await run_drain(config, db)
    elapsed = time.monotonic() - started
    assert len(endpoint.requests) == 40
    # 40 requests at 50/s with a burst of 1 cannot finish in much under 0.78 s
    assert elapsed >= 0.7


async def test_in_flight_limit_held(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url, max_in_flight=3)
    ingest(db, config, *(fragment(f"p-{i}") for i in range(12)))
    decide(db, config)
    endpoint.delay = 0.1  # each request is held, so the sender would open more if it could
    await run_drain(config, db)
    assert len(endpoint.requests) == 12
    assert endpoint.max_in_flight == 3


@pytest.mark.parametrize("status", [401, 500])
async def test_no_secret_in_database_or_failed_store(tmp_path, endpoint, monkeypatch, status,
                                                     caplog):
    token = "s3cr3t-bearer-value-XYZ"
    monkeypatch.setenv("CRM_TOKEN", token)
    config, db = store(tmp_path, endpoint.url, auth={"type": "bearer", "token": "${CRM_TOKEN}"},
                       signing_secret="whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU=")
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.always(status, {"X-Echo": token})
    for _ in range(3):
        await run_drain(config, db)
    assert endpoint.requests[0].headers["Authorization"] == f"Bearer {token}"
    assert failed_rows(db)
    db.db.conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    for secret in (token, "c2lnbmluZy1zZWNyZXQtdmFsdWU="):
        assert secret.encode() not in raw
        assert secret not in caplog.text


async def test_status_json_matches_the_store_after_a_known_run(tmp_path, endpoint):
    """`profile-relay status --json` after 3 delivered, 1 failed and 1 waiting export."""
    from typer.testing import CliRunner

    from app.cli import app

    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"), fragment("p-2"), fragment("p-3"), fragment("p-4"))
    decide(db, config)
    endpoint.fail(1, 400)  # the first request sent is refused for good
    await run_drain(config, db)
    ingest(db, config, fragment("p-5"))
    decide(db, config)  # queued, not sent
    result = CliRunner().invoke(app, ["status", "-c", str(tmp_path / "config.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    [stats] = orjson.loads(result.stdout)["dataflows"]
    assert stats["dataflow"] == FLOW and stats["known"]
    assert (stats["delivered"], stats["failed"], stats["pending"]) == (3, 1, 1)
    assert stats["lag_changes"] == 0
    latencies = [r[0] for r in db.db.execute("SELECT latency_ms FROM deliveries ORDER BY 1")]
    assert stats["latency_p50_ms"] == latencies[1] and stats["latency_p95_ms"] == latencies[2]
    assert stats["last_error"] == db.db.execute("SELECT last_error FROM failed_requests").fetchone()[0]

"""The flows under a real Prefect harness: the stream flow's --once pass, the dispatch
task's own retries, backfill by hand, replay, and status figures after a known run."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from flows.backfill import backfill_flow
from flows.replay import replay_flow
from flows.stream import stream_flow
from state.stats import dataflow_stats
from tasks.dispatch import dispatch_task
from tests.relay_fixtures import FLOW, decide, fragment, ingest, store

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=60):
        yield


async def test_dispatch_task_retries_until_delivered(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.fail(2, 503)

    @flow
    async def run() -> dict:
        return await dispatch_task(db, FLOW, config.destination("crm"))

    result = await run()
    assert result["delivered"] == 1  # the third task run delivered it
    assert len(endpoint.requests) == 3
    assert db.execute("SELECT attempts FROM deliveries").fetchone()[0] == 3


async def test_dispatch_task_gives_up_into_the_failed_store(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.always(502)

    @flow
    async def run() -> dict:
        return await dispatch_task(db, FLOW, config.destination("crm"))

    await run()
    assert len(endpoint.requests) == 3
    row = db.execute("SELECT attempts, last_status FROM failed_requests").fetchone()
    assert tuple(row) == (3, 502)


async def test_stream_once_backfills_streams_and_reports(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"), fragment("p-2"), fragment("p-3", status="exited"),
           fragment("p-4", status=None))
    totals = await stream_flow(config_path, once=True)
    assert totals[FLOW]["changes"] == 4 and totals[FLOW]["exports"] == 2
    assert sorted(r.headers["Idempotency-Key"] for r in endpoint.requests) == sorted(
        {r.headers["Idempotency-Key"] for r in endpoint.requests})
    assert len(endpoint.requests) == 2
    stats = dataflow_stats(db, FLOW)
    assert (stats.delivered, stats.pending, stats.failed, stats.lag_changes) == (2, 0, 0, 0)
    assert stats.latency_p95_ms is not None and stats.latency_p95_ms >= stats.latency_p50_ms
    # an empty poll makes no export and sends nothing
    totals = await stream_flow(config_path, once=True)
    assert totals[FLOW] == {"changes": 0, "exports": 0, "backfilled": 0}
    assert len(endpoint.requests) == 2


async def test_backfill_by_hand_and_replay(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"), fragment("p-2"))
    decide(db, config)
    endpoint.always(500)
    await stream_flow(config_path, once=True)
    assert db.execute("SELECT count(*) FROM failed_requests").fetchone()[0] == 2
    endpoint.reset()
    result = await replay_flow(config_path, FLOW)
    assert result == {"resent": 2, "superseded": 0}
    assert len(endpoint.requests) == 2
    endpoint.reset()
    result = await backfill_flow(config_path, FLOW, "seg-a")
    assert result["exported"] == 2
    assert {r.headers["X-Relay-Sequence"] for r in endpoint.requests} == {"1", "2"}

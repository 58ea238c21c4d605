"""The flows under a real Prefect harness: the stream flow's --once pass, the dispatch
task's own retries, backfill by hand, replay, and status figures after a known run."""

from __future__ import annotations

import pytest
from prefect import flow

from flows.backfill import backfill_flow
from flows.replay import replay_flow
from flows.stream import stream_flow
from tasks.flow_tasks import dispatch
from tasks.pipeline import PassResult
from tests.relay_fixtures import FLOW, decide, fragment, ingest, store

pytestmark = pytest.mark.prefect


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """Every test here runs flows on the session's Prefect harness."""


async def test_dispatch_task_retries_until_delivered(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.fail(2, 503)

    totals = PassResult()

    @flow
    async def run() -> None:
        await dispatch(db, config, config.dataflow(FLOW), totals)

    await run()
    assert totals.delivery.delivered == 1  # the third task run (the second retry) delivered it
    assert totals.delivery.retrying == 2
    assert len(endpoint.requests) == 3
    assert db.db.execute("SELECT attempts FROM deliveries").fetchone()[0] == 3


async def test_dispatch_task_gives_up_into_the_failed_store(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-1"))
    decide(db, config)
    endpoint.always(502)

    @flow
    async def run() -> None:
        await dispatch(db, config, config.dataflow(FLOW), PassResult())

    await run()
    assert len(endpoint.requests) == 3
    row = db.db.execute("SELECT attempts, last_status FROM failed_requests").fetchone()
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
    stats = db.stats(FLOW)
    assert (stats.delivered, stats.pending, stats.failed, stats.lag_changes) == (2, 0, 0, 0)
    assert stats.latency_p95_ms is not None and stats.latency_p95_ms >= stats.latency_p50_ms
    # an empty poll makes no export and sends nothing
    totals = await stream_flow(config_path, once=True)
    assert totals[FLOW] == {"changes": 0, "exports": 0, "backfilled": 0, "redelivered": 0,
                            "delivered": 0, "retrying": 0, "failed": 0}
    assert len(endpoint.requests) == 2


async def test_backfill_by_hand_and_replay(tmp_path, endpoint):
    config, db = store(tmp_path, endpoint.url)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"), fragment("p-2"))
    decide(db, config)
    endpoint.always(500)
    state = await stream_flow(config_path, once=True, return_state=True)
    assert state.is_failed() and "2 export(s) ended in the failed store" in state.message
    assert db.db.execute("SELECT count(*) FROM failed_requests").fetchone()[0] == 2
    endpoint.reset()
    result = await replay_flow(config_path, FLOW)
    assert (result["resent"], result["superseded"], result["delivered"]) == (2, 0, 2)
    assert len(endpoint.requests) == 2
    endpoint.reset()
    result = await backfill_flow(config_path, FLOW, "seg-a")
    assert result["exported"] == 2
    assert {r.headers["X-Relay-Sequence"] for r in endpoint.requests} == {"1", "2"}


async def test_stream_wakes_on_new_changes_instead_of_sleeping_the_interval(tmp_path, endpoint):
    """A change committed while the stream sleeps is decided and delivered at once: with an
    interval longer than the whole run, only the wake-up can deliver it."""
    import asyncio

    config, db = store(tmp_path, endpoint.url)
    ingest(db, config, fragment("p-0"))
    run = asyncio.create_task(stream_flow(str(tmp_path / "config.yaml"), interval=600.0,
                                          run_seconds=8.0))
    for _ in range(300):  # the first pass delivers p-0; then the stream waits
        if endpoint.requests or run.done():
            break
        await asyncio.sleep(0.05)
    assert len(endpoint.requests) == 1
    ingest(db, config, fragment("p-1"))
    for _ in range(300):
        if len(endpoint.requests) == 2 or run.done():
            break
        await asyncio.sleep(0.05)
    assert not run.done(), "delivered by the end of the run, not by the wake-up"
    assert endpoint.requests[1].headers["X-Relay-Sequence"] == "2"
    await run

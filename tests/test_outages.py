"""Endpoints that go down and come back: the circuit breaker, redelivery of the failed
store on its schedule, and reading the failed store (`failed`, `deliveries`, selective
`replay`). Real endpoint on loopback, the command line on the session's Prefect harness."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import app, parse_since
from tasks.report import config_tag
from tests.relay_fixtures import FLOW, fragment, ingest, store

pytestmark = pytest.mark.prefect

TOKEN = "s3cr3t-bearer-token-for-outage-tests"


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """The CLI's flows run on the session's Prefect harness."""


async def relay(tmp_path: Path, *args: str) -> Any:
    """`profile-relay COMMAND -c config.yaml ARGS...` in a thread: the endpoint keeps serving."""
    command, *rest = args
    return await asyncio.to_thread(CliRunner().invoke, app,
                                   [command, "-c", str(tmp_path / "config.yaml"), *rest])


def open_failed(db: Any) -> list[dict]:
    return list(db.db.query("SELECT * FROM failed_requests WHERE state = 'failed' ORDER BY id"))


def probe_due_now(db: Any) -> None:
    """Move the paused breaker's next probe to now (instead of waiting probe_seconds)."""
    state = db.breaker(FLOW)
    state.next_probe_at = int(time.time() * 1000)
    db.save_breaker(FLOW, state)


async def test_the_breaker_pauses_probes_and_resumes(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, pause_after_failures=3, probe_seconds=600,
                       redeliver_after=[])
    ingest(db, config, *(fragment(f"p-{i}") for i in range(10)))
    endpoint.always(400)
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 3, result.output
    # three failed for good, then delivery paused: the rest stays queued, none is failed
    assert len(open_failed(db)) == 3
    assert db.pending_count(FLOW) == 7
    sent_when_paused = len(endpoint.requests)
    assert sent_when_paused <= 3 + 64  # the three, and at most what was in flight
    status = orjson.loads((await relay(tmp_path, "status", "--json")).output)
    [row] = status["dataflows"]
    assert row["delivery"] == "paused" and row["failed_in_a_row"] == 3

    # paused, before the probe is due: a pass sends nothing
    result = await relay(tmp_path, "stream", "--once")
    assert len(endpoint.requests) == sent_when_paused
    assert db.pending_count(FLOW) == 7 and len(open_failed(db)) == 3

    # the probe, still failing: one request, nothing into the failed store
    probe_due_now(db)
    await relay(tmp_path, "stream", "--once")
    assert len(endpoint.requests) == sent_when_paused + 1
    assert db.pending_count(FLOW) == 7 and len(open_failed(db)) == 3

    assert db.breaker(FLOW).next_probe_at > time.time() * 1000 + 500_000  # 600 s on
    # the endpoint is back: the next probe succeeds and delivery resumes at once
    endpoint.reset()
    probe_due_now(db)
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 0, result.output
    assert db.pending_count(FLOW) == 0
    assert len(endpoint.requests) == 7
    assert db.breaker(FLOW).paused is False and db.breaker(FLOW).failures_in_row == 0


async def test_pause_and_resume_are_prefect_events(tmp_path, endpoint) -> None:
    """Seen by a live subscription to the Prefect server's event stream (what an
    automation is triggered from), opened before the runs."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    config, db = store(tmp_path, endpoint.url, pause_after_failures=2, probe_seconds=0.2,
                       redeliver_after=[])
    flow_name = config.dataflows[0].name
    tag = config_tag(config)
    wanted = {"profile-relay.dataflow.paused", "profile-relay.dataflow.resumed"}
    seen: dict[str, Any] = {}
    subscribed = asyncio.Event()

    async def listen() -> None:
        async with get_events_subscriber(filter=EventFilter(
                event=EventNameFilter(name=list(wanted)),
                resource=EventResourceFilter(id=[f"profile-relay.dataflow.{flow_name}"]))
        ) as subscriber:
            subscribed.set()
            async for event in subscriber:
                if event.resource.get("profile-relay.config") != tag:
                    continue  # the same dataflow name in an earlier test's store
                seen[event.event] = event
                if set(seen) == wanted:
                    return

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 30)
    ingest(db, config, *(fragment(f"p-{i}") for i in range(4)))
    endpoint.always(422)
    await relay(tmp_path, "stream", "--once")
    endpoint.reset()
    await asyncio.sleep(0.3)
    await relay(tmp_path, "stream", "--once")
    await asyncio.wait_for(listener, 60)  # events reach the subscribers asynchronously
    assert set(seen) == wanted
    paused = seen["profile-relay.dataflow.paused"]
    assert paused.payload["after_failures"] == 2
    assert "HTTP 422" in paused.payload["last_error"]
    assert paused.resource["prefect.resource.name"] == flow_name


async def test_the_failed_store_is_redelivered_on_its_schedule(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, redeliver_after=[0.3, 0.3])
    ingest(db, config, fragment("p-1", "Ann"))
    endpoint.always(400)
    result = await relay(tmp_path, "stream", "--once")
    assert result.exit_code == 3
    [entry] = open_failed(db)
    assert entry["redelivery"] == 0 and entry["next_redelivery_at"] > entry["last_attempt_at"]
    # while it waits, an unmapped segment changes: no new export, but part of the state
    ingest(db, config, b'{"profileId": "p-1", "segmentMembership": {"ups": {"seg-b": '
                       b'{"status": "realized"}}}}\n')
    await asyncio.sleep(0.4)
    # the first redelivery fails too: back in the failed store, the second one scheduled
    await relay(tmp_path, "stream", "--once")
    [entry] = open_failed(db)
    assert entry["redelivery"] == 1 and entry["next_redelivery_at"] is not None
    first_failed = entry["first_failed_at"]
    await asyncio.sleep(0.4)
    await relay(tmp_path, "stream", "--once")  # the second (the schedule's last) fails too
    [entry] = open_failed(db)
    assert entry["redelivery"] == 2 and entry["next_redelivery_at"] is None  # now: by hand
    assert entry["first_failed_at"] == first_failed
    listing = orjson.loads((await relay(tmp_path, "failed", "--dataflow", FLOW, "--json")).output)
    [row] = listing["failed"]
    assert row["redeliveries"] == 2 and row["next_redelivery"] == "replay by hand"
    endpoint.reset()
    await asyncio.sleep(0.4)
    await relay(tmp_path, "stream", "--once")
    assert endpoint.requests == []  # the schedule is spent: nothing by itself
    result = await relay(tmp_path, "replay", "--dataflow", FLOW)
    assert result.exit_code == 0, result.output
    [request] = endpoint.requests
    assert "seg-b" in orjson.loads(request.body)["segmentMembership"]["ups"]  # current state
    assert open_failed(db) == []


async def test_redelivery_never_sends_an_older_state(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, redeliver_after=[0.2])
    ingest(db, config, fragment("p-1", "Ann"))
    endpoint.always(400)
    await relay(tmp_path, "stream", "--once")
    endpoint.reset()
    ingest(db, config, fragment("p-1", "Bea"))  # streamed and delivered before the redelivery
    await relay(tmp_path, "stream", "--once")
    await asyncio.sleep(0.3)
    await relay(tmp_path, "stream", "--once")  # the redelivery is due: superseded
    assert [orjson.loads(r.body)["person"]["name"]["firstName"] for r in endpoint.requests] == [
        "Bea"]
    assert db.db.execute("SELECT state FROM failed_requests").fetchone()[0] == "superseded"


async def test_failed_lists_the_store_without_secrets(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, auth={"type": "bearer", "token": TOKEN},
                       redeliver_after=[3600])
    ingest(db, config, fragment("p-1"), fragment("p-2"))
    endpoint.always(401)
    await relay(tmp_path, "stream", "--once")
    table = await relay(tmp_path, "failed", "--dataflow", FLOW)
    assert table.exit_code == 0, table.output
    assert "p-1" in table.output and "p-2" in table.output and "401" in table.output
    listing = orjson.loads((await relay(tmp_path, "failed", "--dataflow", FLOW,
                                        "--json")).output)
    rows = {r["profile"]: r for r in listing["failed"]}
    assert set(rows) == {"p-1", "p-2"}
    row = rows["p-1"]
    assert row["status"] == 401 and row["attempts"] == 1 and row["redeliveries"] == 0
    assert row["first_failure"] == row["last_failure"] != "-"
    assert row["next_redelivery"].endswith("Z")  # in an hour
    assert TOKEN not in table.output + str(listing)


async def test_replay_since_and_by_profile(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, redeliver_after=[])
    ingest(db, config, fragment("p-1"))
    endpoint.always(400)
    await relay(tmp_path, "stream", "--once")
    cut = int(time.time() * 1000) + 1
    await asyncio.sleep(0.05)
    ingest(db, config, fragment("p-2"), fragment("p-3"))
    await relay(tmp_path, "stream", "--once")
    endpoint.reset()
    result = await relay(tmp_path, "replay", "--dataflow", FLOW, "--profile", "p-3")
    assert result.exit_code == 0, result.output
    assert {r.headers["X-Relay-Sequence"] for r in endpoint.requests} == {"3"}
    since = datetime.fromtimestamp(cut / 1000, UTC).isoformat()
    result = await relay(tmp_path, "replay", "--dataflow", FLOW, "--since", since)
    assert result.exit_code == 0, result.output
    assert {r.headers["X-Relay-Sequence"] for r in endpoint.requests} == {"2", "3"}
    assert [e["profile_id"] for e in open_failed(db)] == ["p-1"]  # failed before the cut
    bad = await relay(tmp_path, "replay", "--dataflow", FLOW, "--since", "yesterday")
    assert bad.exit_code == 2 and "ISO 8601" in bad.output


def test_since_takes_an_age_or_a_time() -> None:
    assert parse_since("90s", now_s=1000.0) == 910_000
    assert parse_since("2h", now_s=10_000.0) == 2_800_000
    assert parse_since("2026-12-03T10:00:00Z") == parse_since("2026-12-03T10:00:00")
    assert parse_since("2026-12-03T11:00:00+01:00") == parse_since("2026-12-03T10:00:00Z")


async def test_deliveries_shows_one_profiles_history(tmp_path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url, redeliver_after=[])
    ingest(db, config, fragment("p-1", "Ann"), fragment("p-2"))
    await relay(tmp_path, "stream", "--once")
    endpoint.always(503)
    ingest(db, config, fragment("p-1", "Bea"))
    await relay(tmp_path, "stream", "--once")
    history = orjson.loads((await relay(tmp_path, "deliveries", "--dataflow", FLOW,
                                        "--profile", "p-1", "--json")).output)
    rows = history["deliveries"]
    assert [(r["outcome"], r["seq"], r["status"]) for r in rows] == [
        ("failed", 3, 503), ("delivered", 1, 200)]  # newest first
    assert rows[0]["attempts"] == 3 and "HTTP 503" in rows[0]["error"]
    table = await relay(tmp_path, "deliveries", "--dataflow", FLOW, "--profile", "p-9")
    assert table.exit_code == 0 and "no delivery of p-9" in table.output

"""Shard groups on PostgreSQL: a group sees only its shards, its lease excludes every
overlapping one, a run that lost its lease changes nothing, and a change in the number
of groups neither loses nor repeats a change. The pipeline runs on the group-scoped
store unchanged, against a real server (conftest)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml

from config import Config, load_config
from state import open_store
from state.db import now_ms, shard_of
from state.leases import WORKER_ENV, owner_id
from state.model import Attempt, LeaseLost, ShardScope
from state.postgres_store import PostgresStore
from tasks import pipeline
from tasks.groups import Groups
from tasks.pipeline import PassResult
from tasks.supervise import Starts
from testkit.procs import FLOW, wait_for, write_config
from tests.relay_fixtures import fragment, ingest

PIDS = [f"p-{i:04d}" for i in range(400)]


def pg_config(tmp_path: Path, pg_url: str) -> tuple[Config, PostgresStore]:
    path = write_config(tmp_path, "http://127.0.0.1:9/hook")
    doc = yaml.safe_load(path.read_text())
    doc["state"] = pg_url
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path)
    store = open_store(config.state_target)
    assert isinstance(store, PostgresStore)
    return config, store


def group(store: PostgresStore, index: int, count: int, owner: str,
          ttl_ms: int = 60_000) -> PostgresStore:
    scope = ShardScope.of_group(FLOW, index, count, owner)
    assert store.take_group(scope, ttl_ms), f"{scope.name} is held"
    return store.scoped(scope)


def queued(store: PostgresStore) -> list[str]:
    """The profiles a group would send now (its claim)."""
    return sorted(p.profile_id for p in store.claim_due(FLOW, now_ms(), 10_000))


def decide(store: PostgresStore, config: Config) -> PassResult:
    result = PassResult()
    pipeline.decide_pass(store, config, config.dataflow(FLOW), result)
    return result


def test_groups_split_the_dataflow_by_shard_and_the_lowest_cursor_is_the_dataflows(
        tmp_path: Path, pg_url: str) -> None:
    config, store = pg_config(tmp_path, pg_url)
    decide(store, config)  # registered: the changes below stream
    ingest(store, config, *(fragment(p) for p in PIDS))
    halves = [group(store, i, 2, f"run-{i}") for i in range(2)]
    decide(halves[1], config)  # the second half decides first: the first lags
    assert store.cursor(FLOW) < store.head_seq()  # the dataflow's cursor is the lowest
    decide(halves[0], config)
    claims = [queued(g) for g in halves]
    assert not set(claims[0]) & set(claims[1])
    assert sorted(claims[0] + claims[1]) == PIDS  # every profile, once
    assert all(shard_of(p) < 128 for p in claims[0]) and all(shard_of(p) >= 128
                                                             for p in claims[1])
    assert [g.pending_count(FLOW) for g in halves] == [len(c) for c in claims]
    assert store.cursor(FLOW) == store.head_seq()
    # quiet shards do not hold a group back: only the second half's profiles change
    late = [p for p in PIDS if shard_of(p) >= 128][:5]
    ingest(store, config, *(fragment(p, first="Bo") for p in late))
    assert decide(halves[0], config).exports == 0
    assert halves[0].cursor(FLOW) == store.head_seq()
    assert decide(halves[1], config).exports == len(late)
    assert store.cursor(FLOW) == store.head_seq()


def test_a_lease_excludes_every_overlapping_one_until_it_lapses(
        tmp_path: Path, pg_url: str) -> None:
    _, store = pg_config(tmp_path, pg_url)
    first = ShardScope.of_group(FLOW, 0, 2, "a")  # shards 0-127
    assert store.take_group(first, ttl_ms=300) and first.epoch == 1
    assert not store.take_group(ShardScope.of_group(FLOW, 1, 4, "b"), 60_000)  # 64-127
    assert store.take_group(ShardScope.of_group(FLOW, 2, 4, "b"), 60_000)  # 128-191: free
    assert store.acquire_lease(FLOW, 0, "c", 60_000) is None  # a one-process stream waits
    assert store.live_groups(FLOW) == 2
    time.sleep(0.4)  # a's lease lapses
    taker = ShardScope.of_group(FLOW, 1, 4, "b")
    assert store.take_group(taker, 60_000) and taker.epoch == 2
    assert not store.take_group(first, 60_000)  # a, back, cannot renew: lost
    # and once the shards are free again, a's taking them is a takeover at a new epoch,
    # which a run that held the old one must not mistake for a renewal
    store.release_lease(FLOW, taker.lease_group, "b")
    with pytest.raises(LeaseLost):
        store.take_group(first, 60_000)


def test_a_run_that_lost_its_lease_changes_nothing(tmp_path: Path, pg_url: str) -> None:
    config, store = pg_config(tmp_path, pg_url)
    decide(store, config)
    ingest(store, config, *(fragment(p) for p in PIDS))
    old = group(store, 0, 1, "frozen", ttl_ms=300)
    decide(old, config)
    claimed = old.claim_due(FLOW, now_ms(), 10)
    assert len(claimed) == 10
    time.sleep(0.4)  # frozen past its lease; another run takes the shards over
    new = group(store, 0, 1, "taker")
    ingest(store, config, *(fragment(p, first="Cy") for p in PIDS[:10]))
    cursor, pending = store.cursor(FLOW), store.pending_count(FLOW)
    delivered = [Attempt(p, p.seq, "k", 200, None, now_ms()) for p in claimed]
    for write in (lambda: old.record_outcomes(FLOW, delivered, [], []),
                  lambda: old.claim_due(FLOW, now_ms(), 10),
                  lambda: decide(old, config),
                  lambda: old.requeue_failures(FLOW, old.open_failures(FLOW))):
        with pytest.raises(LeaseLost):
            write()
    assert store.cursor(FLOW) == cursor and store.pending_count(FLOW) == pending
    assert store.stats(FLOW).delivered == 0
    assert decide(new, config).exports > 0  # the new owner goes on from the shards' cursor


def test_changing_the_number_of_groups_loses_and_repeats_nothing(
        tmp_path: Path, pg_url: str) -> None:
    """Two groups decide part of the log, hand over to four, which decide the rest: each
    change is decided once (one export per profile per change)."""
    config, store = pg_config(tmp_path, pg_url)
    decide(store, config)
    ingest(store, config, *(fragment(p) for p in PIDS))
    two = [group(store, i, 2, f"two-{i}") for i in range(2)]
    decide(two[0], config)  # only the first half got through before the change
    for g in two:
        assert g.scope is not None
        g.release_lease(FLOW, g.scope.lease_group, g.scope.owner)
    ingest(store, config, *(fragment(p, first="Di") for p in PIDS[:100]))
    four = [group(store, i, 4, f"four-{i}") for i in range(4)]
    exports = sum(decide(g, config).exports for g in four)
    first_half = {p for p in PIDS if shard_of(p) < 128}
    # the first half's profiles were decided by the two (their first state) and, for the
    # first 100, again for their new state; the second half's only now, once each
    assert exports == len(set(PIDS) - first_half) + len(first_half & set(PIDS[:100]))
    assert sorted(p for g in four for p in queued(g)) == PIDS
    assert store.cursor(FLOW) == store.head_seq()


# -- the stream flow in groups, on the Prefect test harness --------------------------------------

def endpoint_config(tmp_path: Path, pg_url: str, url: str) -> tuple[Path, PostgresStore]:
    path = write_config(tmp_path, url, retry_backoff_seconds=0)
    doc = yaml.safe_load(path.read_text())
    doc["state"] = pg_url
    path.write_text(yaml.safe_dump(doc))
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    return path, store


async def test_two_group_runs_deliver_every_profile_once(
        tmp_path: Path, pg_url: str, endpoint: Any, prefect_harness: None) -> None:
    from flows.stream import stream_flow

    path, store = endpoint_config(tmp_path, pg_url, endpoint.url)
    config = load_config(path)
    decide(store, config)  # registered (its backfill, by group 0, would find nothing)
    ingest(store, config, *(fragment(p, first=p) for p in PIDS))  # the name says who
    states = await asyncio.gather(*(
        stream_flow(str(path), once=True, group=i, groups=2, return_state=True)
        for i in range(2)))
    assert all(s.is_completed() for s in states), [s.message for s in states]
    names = sorted(orjson.loads(r.body)["person"]["name"]["firstName"]
                   for r in endpoint.requests)
    assert names == PIDS  # every profile once, between the two runs
    delivered = [(await s.aresult())[FLOW]["delivered"] for s in states]
    assert sum(delivered) == len(PIDS) and all(delivered), delivered  # each its own half
    assert store.stats(FLOW).delivered == len(PIDS) and store.pending_count(FLOW) == 0


async def test_a_group_run_stops_when_its_lease_is_taken_or_the_layout_changes(
        tmp_path: Path, pg_url: str, endpoint: Any, prefect_harness: None) -> None:
    from flows.stream import stream_flow

    path, store = endpoint_config(tmp_path, pg_url, endpoint.url)
    run = asyncio.create_task(stream_flow(str(path), group=0, groups=2, interval=0.2,
                                          run_seconds=60, return_state=True))
    scope = ShardScope.of_group(FLOW, 0, 2, "")
    await asyncio.to_thread(wait_for, lambda: store.lease_live(FLOW, scope.lease_group), 30)
    store.set_layout(FLOW, 4)  # supervise now runs four groups
    state = await asyncio.wait_for(run, 30)
    assert state.is_completed()
    assert not store.lease_live(FLOW, scope.lease_group)  # handed over: released at once

    store.set_layout(FLOW, 2)
    run = asyncio.create_task(stream_flow(str(path), group=0, groups=2, interval=0.2,
                                          run_seconds=60, return_state=True))
    await asyncio.to_thread(wait_for, lambda: store.lease_live(FLOW, scope.lease_group), 30)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # another owner, another epoch
        conn.execute("UPDATE leases SET owner = 'elsewhere:1:x', epoch = epoch + 1 "
                     "WHERE grp = %s", (scope.lease_group,))
    state = await asyncio.wait_for(run, 30)  # noticed at its next renewal (every 2 s)
    assert state.is_completed()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # and it left the lease alone
        assert conn.execute("SELECT owner FROM leases WHERE grp = %s",
                            (scope.lease_group,)).fetchone() == ("elsewhere:1:x",)


async def _nowhere() -> bool:
    return False


async def _somewhere() -> bool:
    return True


async def test_a_standby_takes_the_group_within_a_poll_of_its_lease_lapsing(
        tmp_path: Path, pg_url: str) -> None:
    _, store = pg_config(tmp_path, pg_url)
    active = Groups.plan(store, [FLOW], 0, 2, "far:1:active@m1")
    active.ttl_ms = 1500  # then never renewed: a killed or frozen run
    assert await active.take(0)
    group = active.scopes[FLOW].lease_group
    standby = Groups.plan(store, [FLOW], 0, 2, "far:2:standby@m2")
    waiting = asyncio.create_task(standby.stand_by(time.monotonic() + 30, _nowhere))
    await asyncio.to_thread(wait_for, lambda: store.standby_owner(FLOW, group)
                            == "far:2:standby@m2", 10)
    late = Groups.plan(store, [FLOW], 0, 2, "far:3:late@m3")  # one standby per group
    assert "another standby" in (await late.stand_by(time.monotonic() + 5, _nowhere) or "")

    assert await asyncio.wait_for(waiting, 10) is None  # it took the group over
    assert store.lease_owner(FLOW, group) == "far:2:standby@m2"
    assert standby.scopes[FLOW].epoch == active.scopes[FLOW].epoch + 1
    assert store.standby_owner(FLOW, group) is None  # a standby no more
    with pytest.raises(LeaseLost):  # and the old owner changes nothing from now on
        active.view(FLOW).claim_due(FLOW, now_ms(), 10)

    store.set_layout(FLOW, 4)  # supervise now runs four groups: a standby of two ends
    other = Groups.plan(store, [FLOW], 1, 2, "far:4:other@m2")
    assert "4 group(s)" in (await other.stand_by(time.monotonic() + 5, _nowhere) or "")
    assert not store.lease_live(FLOW, other.scopes[FLOW].lease_group)


async def test_a_standby_leaves_the_machine_of_its_active_run_while_another_worker_is_online(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, store = pg_config(tmp_path, pg_url)
    monkeypatch.setenv(WORKER_ENV, "worker-a")
    active = Groups.plan(store, [FLOW], 0, 2, "far:1:active@worker-a")
    assert await active.take(0)
    group = active.scopes[FLOW].lease_group
    beside = Groups.plan(store, [FLOW], 0, 2, owner_id("beside"))
    why = await beside.stand_by(time.monotonic() + 10, _somewhere)
    assert why is not None and "machine of the group's active run (worker-a)" in why
    assert store.standby_owner(FLOW, group) is None  # its registration went with it
    # the only worker online: it stays, a standby on the same machine rather than none
    alone = Groups.plan(store, [FLOW], 0, 2, owner_id("alone"))
    assert await alone.stand_by(time.monotonic() + 1.5, _nowhere) == (
        "its run time ended before the group's lease lapsed")
    assert store.lease_owner(FLOW, group) == "far:1:active@worker-a"


def test_supervise_restarts_a_standby_that_went_but_not_before_its_retry() -> None:
    starts = Starts(grace=45.0, retry=10.0)
    assert starts.due([0, 1], range(2), now=0.0) == [0, 1]  # never started
    starts.started(0, 0.0)
    starts.started(1, 0.0)
    assert starts.due([0, 1], range(2), now=5.0) == []  # starting: within their grace
    assert starts.due([], range(2), now=6.0) == []  # both up
    assert starts.due([0], range(2), now=7.0) == []  # 0 went: retried 10 s after its start
    assert starts.due([0], range(2), now=10.0) == [0]
    assert starts.due([1], range(2), now=50.0) == [1]  # never came up again: the grace

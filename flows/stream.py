"""The stream flow: one long async flow run that, every ``interval`` seconds or sooner when
changes arrive (``tasks.pipeline.wait_for_changes``), runs a pipeline pass (one dispatch
task run) for each dataflow with work, then ends itself after ``run_seconds`` so the
deployment's schedule starts the next run. Empty polls make no task
run. A run owns its dataflows through a lease in the store: a second run started while
the first is alive waits for it to end (a schedule's hand-over), or gives up after
``TAKEOVER_WAIT_SECONDS`` without doing anything.

With ``group`` and ``groups`` (PostgreSQL state; ``profile-relay supervise`` starts them)
the run owns one range of every dataflow's shards instead (``tasks.groups``): it decides
and sends only those, under a lease of a few seconds renewed in the background, and ends
when the lease is lost or ``supervise`` changes the number of groups. With ``standby`` it
first waits as the group's hot standby and takes the group over when its lease lapses."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid

from prefect import flow, get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.states import Completed, Failed, State

from config import load_config
from state import StateUnavailable, Store, open_store
from state.db import now_ms
from state.leases import WORKER_ENV, owner_id
from tasks import lifecycle, pipeline
from tasks.flow_tasks import dispatch
from tasks.groups import Groups, lease_lost
from tasks.pipeline import PassResult
from tasks.report import ExportsFailed, publish_stream_summary, report_failures

SUMMARY_EVERY_SECONDS = 60.0
TAKEOVER_WAIT_SECONDS = 90.0
LEASE_GROUP = 0  # one process streams a dataflow on one machine: a single shard group


def _run_name() -> str:
    params = runtime.flow_run.parameters
    what = params.get("dataflow") or "all dataflows"
    if params.get("groups"):
        what += f" group {params.get('group', 0)}/{params['groups']}"
        what += " standby" if params.get("standby") else ""
    how = "once" if params.get("once") else f"{params.get('run_seconds', 3600):g} s"
    return f"stream {what} {time.strftime('%H:%M:%S', time.gmtime())}Z ({how})"


@flow(name="profile-relay-stream", flow_run_name=_run_name, log_prints=False)
async def stream_flow(config_path: str, dataflow: str | None = None, interval: float = 2.0,
                      once: bool = False, run_seconds: float = 3600.0,
                      group: int = 0, groups: int | None = None,
                      standby: bool = False) -> State:
    """Poll the change log, decide exports and deliver them.

    Args:
        config_path: the profile-relay YAML config (absolute, or relative to the worker's
            working directory).
        dataflow: stream only this dataflow; empty for every dataflow of the config.
        interval: at most this many seconds between two passes; new changes start one
            sooner (within about 0.2 s of the last).
        once: one whole pass (new mappings backfilled, changes decided, every export
            delivered or in the failed store), then end.
        run_seconds: end the run after this long, so the schedule starts the next one.
        group: with ``groups``, which range of the shards this run owns (0 to groups - 1).
        groups: split each dataflow's 256 shards into this many groups (PostgreSQL state);
            empty: one run streams everything.
        standby: with ``groups``, wait as the group's standby (up to ``run_seconds``) and
            take it over the moment its lease lapses; ``supervise`` starts these.
    """
    logger = get_run_logger()
    config = load_config(config_path)
    try:
        store = open_store(config.state_target)
    except StateUnavailable as exc:  # one line naming state, not a traceback
        return Failed(message=str(exc))
    flows_ = config.select_dataflows(dataflow)
    owner = owner_id(str(runtime.flow_run.id or uuid.uuid4()))
    ttl_ms = int(max(30.0, 3 * interval) * 1000)
    shard_groups = None
    if groups:
        try:
            shard_groups = Groups.plan(store, [f.name for f in flows_], group, groups, owner)
        except ValueError as exc:  # GroupsNeedPostgres, or no such group
            return Failed(message=str(exc))
        if standby:
            if why := await shard_groups.stand_by(time.monotonic() + run_seconds,
                                                  _other_worker_online):
                return Completed(message=f"group {group} of {groups}: stood by; {why}")
            logger.info("took over group %d of %d as its standby", group, groups)
        elif not await shard_groups.take(TAKEOVER_WAIT_SECONDS):
            return Completed(message=f"group {group} of {groups}: its shards are held by "
                                     "another live run; nothing to do")
        logger.info("streaming group %d of %d (%s)", group, groups, ", ".join(
            s.name for s in shard_groups.scopes.values()))
        renewer = asyncio.create_task(shard_groups.keep_renewed(logger))
    elif not once and not await _take_leases(store, [f.name for f in flows_], owner, ttl_ms):
        return Completed(message="another stream run owns these dataflows; nothing to do")
    totals = {f.name: PassResult() for f in flows_}
    # one dataflow: a task run passes on for up to an interval while changes arrive; with
    # several, each gets one pass in turn, so none waits behind another's stream
    span = interval if len(flows_) == 1 and not once else 0.0
    started, started_ms = time.monotonic(), now_ms()
    last_summary = started
    # The run ends run_seconds after it was scheduled to start, not after it got the
    # lease: with run_seconds equal to the schedule's interval, each run hands over to
    # the next on the tick, and a run that waited for its predecessor does not push the
    # hand-overs later and later.
    scheduled = runtime.flow_run.scheduled_start_time
    late = max(0.0, time.time() - scheduled.timestamp()) if scheduled is not None else 0.0
    if late >= run_seconds / 2 or standby:  # started long after its tick (a worker was
        late = 0.0  # down), or took over after standing by: a full run
    ends_at = started + run_seconds - late
    stopped: str | None = None
    try:
        while True:
            tick = time.monotonic()
            seen_head = store.head_seq()
            for flow_ in flows_:
                st = shard_groups.view(flow_.name) if shard_groups else store
                if once or pipeline.has_work(st, flow_):
                    try:
                        await dispatch(st, config, flow_, totals[flow_.name], settle=once,
                                       span=max(0.0, min(span, ends_at - time.monotonic())))
                    except Exception as exc:
                        if (lost := lease_lost(exc)) is None:
                            raise
                        stopped = str(lost)
                        break
            if stopped or (shard_groups and shard_groups.lost):
                logger.warning("%s; this run stops, changing nothing more",
                               stopped or shard_groups.lost)  # type: ignore[union-attr]
                break
            if shard_groups is None or shard_groups.leads:
                lifecycle.upkeep(store, config, logger)  # removed dataflows; retention
            now = time.monotonic()
            if once or now >= ends_at:
                break
            if shard_groups is not None:
                if handover := shard_groups.handover():
                    logger.info("%s: handing over", handover)
                    break
            elif not once and not all(store.acquire_lease(f.name, LEASE_GROUP, owner, ttl_ms)
                                      for f in flows_):
                logger.warning("lost the lease of the stream (a newer run owns it); ending")
                break
            if now - last_summary >= SUMMARY_EVERY_SECONDS:
                await publish_stream_summary(store, config, flows_, totals, started_ms)
                last_summary = now
            await pipeline.wait_for_changes(store, seen_head, until=min(tick + interval, ends_at),
                                            earliest=tick + pipeline.MIN_PASS_GAP_SECONDS)
    finally:
        if shard_groups is not None:
            renewer.cancel()
            if not shard_groups.lost:
                shard_groups.release()
        elif not once:
            for flow_ in flows_:
                store.release_lease(flow_.name, LEASE_GROUP, owner)
    await publish_stream_summary(store, config, flows_, totals, started_ms)
    counts = {name: t.counts() for name, t in totals.items()}
    if message := report_failures(logger, config, totals):
        return Failed(message=message, data=ExportsFailed(message, counts))
    return Completed(message=f"streamed {len(flows_)} dataflow(s)", data=counts)


async def _other_worker_online() -> bool:
    """Whether a worker other than this run's is heartbeating in this run's work pool:
    somewhere a standby could run apart from its group's active run. Only a heartbeat
    since this run started counts: a killed machine's worker, whose last heartbeat still
    looks recent for a while, would otherwise send every standby started after it died
    away, again and again, leaving its group without one."""
    me, run_id = os.environ.get(WORKER_ENV), runtime.flow_run.id
    if not me or not run_id:
        return False
    try:
        async with get_client() as client:
            run = await client.read_flow_run(uuid.UUID(str(run_id)))
            pool = run.work_pool_name
            workers = await client.read_workers_for_work_pool(pool) if pool else []
    except Exception:  # the API unreachable: stay a standby here rather than none
        return False
    now, since = dt.datetime.now(dt.UTC), run.start_time
    return any(w.name != me and w.last_heartbeat_time is not None
               and (since is None or w.last_heartbeat_time > since)
               and (now - w.last_heartbeat_time).total_seconds()
               <= 2 * (w.heartbeat_interval_seconds or 30) for w in workers)


async def _take_leases(store: Store, names: list[str], owner: str, ttl_ms: int) -> bool:
    """Own every dataflow, waiting for a live run to hand over; False after the wait."""
    deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
    waited = False
    while True:
        held = [n for n in names if store.acquire_lease(n, LEASE_GROUP, owner, ttl_ms) is None]
        if not held:
            if waited:
                get_run_logger().info("took over %s from the previous stream run", ", ".join(names))
            return True
        if time.monotonic() >= deadline:
            get_run_logger().info("%s: streamed by another live run; ending without work",
                                  ", ".join(held))
            for n in set(names) - set(held):
                store.release_lease(n, LEASE_GROUP, owner)
            return False
        waited = True
        await asyncio.sleep(1.0)

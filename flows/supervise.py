"""The supervise flow: keeps ``groups`` shard-group stream runs alive on a Prefect work pool.

It records the number of groups in the store (a group run of another number hands over
when it reads it) and, every ``interval`` seconds, starts a run of the stream deployment
for each group whose lease is not live, with ``run_deployment``: Prefect places it on any
worker of the pool, on any machine. Ownership is the lease in PostgreSQL, never Prefect's
concurrency slots (after a killed worker those hold for minutes): a surplus run finds its
shards held and ends without work. With ``standby`` (the default) it also keeps a standby
run per group, which takes the group over within a poll of its lease lapsing; a run is
started from scratch only for a group with neither a live owner nor a standby."""

from __future__ import annotations

import asyncio
import random
import time

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Failed, State

from config import load_config
from state import StateUnavailable, open_store
from state.model import group_problem
from state.postgres_store import PostgresStore
from tasks.supervise import (
    GROUP_DEPLOYMENT,
    STANDBY_JITTER_SECONDS,
    STANDBY_RETRY_SECONDS,
    Starts,
    ownerless,
    standing_by,
)


@flow(name="profile-relay-supervise", log_prints=False)
async def supervise_flow(config_path: str, groups: int = 2,
                         deployment: str = GROUP_DEPLOYMENT, interval: float = 2.0,
                         run_seconds: float = 3600.0, group_interval: float = 2.0,
                         group_run_seconds: float = 3600.0, standby: bool = True) -> State:
    """Keep ``groups`` shard-group stream runs alive (PostgreSQL state).

    Args:
        config_path: the profile-relay config (a path, or prefect-block://NAME, which
            every worker can read).
        groups: how many groups each dataflow's 256 shards are split into (1 to 256).
        deployment: the stream deployment the group runs are started from, flow/name.
        interval: seconds between two looks at the leases.
        run_seconds: end this supervise run after this long.
        group_interval: the group runs' poll interval.
        group_run_seconds: each group run ends after this long (and is replaced).
        standby: keep a standby run per group as well (twice the runs; a group whose run
            is killed or frozen moves within a poll of its lease TTL, not after a new
            run has been started).
    """
    logger = get_run_logger()
    config = load_config(config_path)
    if problem := group_problem(groups):
        return Failed(message=problem)
    try:
        store = open_store(config.state_target)
    except StateUnavailable as exc:
        return Failed(message=str(exc))
    if not isinstance(store, PostgresStore):
        return Failed(message="supervise needs PostgreSQL state (state: postgresql://...): "
                              "shard groups share their state through it")
    async with get_client() as client:
        try:
            await client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return Failed(message=f"no deployment {deployment} on this Prefect server: "
                                  "`prefect deploy --all` in the checkout creates it "
                                  "(prefect.yaml, stream-group)")
    names = [f.name for f in config.dataflows]
    for name in names:
        store.set_layout(name, groups)
    logger.info("supervising %d group(s) of %s through %s", groups, ", ".join(names),
                deployment)
    runs, standbys, started = Starts(), Starts(retry=STANDBY_RETRY_SECONDS), 0
    every = range(groups)
    ends_at = time.monotonic() + run_seconds
    while time.monotonic() < ends_at:
        covered = standing_by(store, names, groups) if standby else set()
        unowned = ownerless(store, names, groups)
        now = time.monotonic()
        # a group with a standby is left to it; a standby is started for an owned group
        due = [(i, False) for i in runs.due([i for i in unowned if i not in covered], every, now)]
        if standby:
            due += [(i, True) for i in standbys.due(
                [i for i in every if i not in covered and i not in unowned], every, now)]
        for index, stands_by in due:
            if stands_by and index in standbys.started_at:
                # a standby again (it may have left its active run's machine): at a random
                # moment, so that another worker, not always the same, polls first
                await asyncio.sleep(random.uniform(0, STANDBY_JITTER_SECONDS))
            try:
                run = await run_deployment(
                    deployment, timeout=0, as_subflow=False,
                    tags=["profile-relay", "shard-group"],
                    parameters={"config_path": config_path, "group": index, "groups": groups,
                                "interval": group_interval, "run_seconds": group_run_seconds,
                                "standby": stands_by})
            except Exception as exc:  # the Prefect server busy or away: the next poll retries
                logger.warning("group %d of %d: could not start a run (%s: %s); retrying",
                               index, groups, type(exc).__name__, exc)
                break
            (standbys if stands_by else runs).started(index, time.monotonic())
            started += 1
            logger.info("group %d of %d has no live %s: started %s", index, groups,
                        "standby" if stands_by else "owner", run.name)
        await asyncio.sleep(interval)
    return Completed(message=f"{groups} group(s) supervised; {started} run(s) started")

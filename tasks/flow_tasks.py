"""The Prefect tasks the flows are made of: thin wrappers around pipeline steps.

``dispatch`` is the card's dispatch task with ``retries=2``: a run is one pass of the
pipeline (decide, then one attempt for each export due), and each of its two retries is
the next attempt for the exports the run left waiting for a retry, taken once their
backoff or ``Retry-After`` has passed. So an export gets at most three attempts, the
number the retry policy (``destinations.retry``) allows, and a task run's retry count is
the attempt number of the exports it started with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from config import Config, Dataflow
from destinations.retry import DISPATCH_RETRIES, RetryPolicy
from state import Store
from state.model import Backfill
from tasks import pipeline
from tasks.pipeline import PassResult
from tasks.report import report_breaker

SENDER_WAIT_SECONDS = 60.0  # a settling run waits this long for another sender to finish


class RetryableDelivery(Exception):
    """Some exports failed in a retryable way; the dispatch task's retry sends them again."""

    def __init__(self, retrying: int, last_error: str | None) -> None:
        self.retrying = retrying
        super().__init__(f"{retrying} export(s) to retry; last error: {last_error}")


class DeliveryFailed(Exception):
    """Exports ended in the failed store: the dispatch task run is not a success."""

    def __init__(self, dataflow: str, failed: int, last_error: str | None) -> None:
        super().__init__(f"{dataflow}: {failed} export(s) ended in the failed store; "
                         f"last error: {last_error}")


def _is_retryable(task_obj: object, task_run: object, state: Any) -> bool:
    return isinstance(getattr(state, "data", None), RetryableDelivery)


@task(name="dispatch", retries=DISPATCH_RETRIES, retry_condition_fn=_is_retryable,
      cache_policy=NO_CACHE, task_run_name="dispatch {dataflow}")
async def dispatch_task(store: Store, config: Config, dataflow: str, call: PassResult,
                        settle: bool, span: float = 0.0) -> dict[str, int]:
    """One pipeline pass, then more while changes keep arriving within ``span`` seconds:
    under steady ingest a stream makes one task run per span, not one per pass (a task
    run costs the Prefect server tens of ms of CPU; five a second per stream drowned a
    local server's database). ``call`` gathers the figures of every run of this call."""
    ctx = TaskRunContext.get()
    is_retry = ctx is not None and ctx.task_run.run_count > 1
    flow = config.dataflow(dataflow)
    until = time.monotonic() + span
    while True:
        started, seen = time.monotonic(), store.head_seq()
        result = await pipeline.run_pass(
            store, config, flow, wait_due=settle or is_retry,
            lock_wait=SENDER_WAIT_SECONDS if settle else 0.0,
            fill_wait=not settle and not is_retry, logger=get_run_logger())
        call.add(result)
        report_breaker(get_run_logger(), config, flow, result)
        if result.delivery.retrying and not result.delivery.paused:  # paused: probes go on
            raise RetryableDelivery(result.delivery.retrying, result.delivery.last_error)
        if call.delivery.failed:
            raise DeliveryFailed(dataflow, call.delivery.failed, call.delivery.last_error)
        if settle or is_retry or result.delivery.paused or result.delivery.busy or \
                not await pipeline.wait_for_changes(
                    store, seen, until, earliest=started + pipeline.MIN_PASS_GAP_SECONDS):
            return call.counts()


async def dispatch(store: Store, config: Config, flow: Dataflow, totals: PassResult,
                   settle: bool = False, span: float = 0.0) -> None:
    """Run the dispatch task (passes for up to ``span`` seconds while changes arrive);
    ``settle``: again until every export decided so far is delivered or in the failed
    store. The task run ends Failed when exports ended in the
    failed store; the flow reports that at its end (``tasks.report.report_failures``)."""
    policy = RetryPolicy.for_destination(config.destination(flow.destination))
    run = dispatch_task.with_options(retry_delay_seconds=policy.task_retry_delays())
    while True:
        call = PassResult()
        try:
            await run(store, config, flow.name, call, settle, span)
        except RetryableDelivery as exc:  # retries spent: the exports wait in the outbox
            get_run_logger().warning("%s: %s", flow.name, exc)
        except DeliveryFailed:
            pass  # counted in ``totals``; the flow run ends Failed with the figures
        totals.add(call)
        if (not settle or pipeline.settled(store, flow) or call.delivery.busy
                or call.delivery.paused):  # paused: exports wait for a probe
            return


@task(name="backfill", cache_policy=NO_CACHE, task_run_name="backfill {job.dataflow}")
async def backfill_task(store: Store, flow: Dataflow, job: Backfill,
                        on_progress: Callable[[int, int], None] | None = None) -> int:
    # in a thread, so the loop keeps publishing progress while chunks are written
    return await asyncio.to_thread(pipeline.backfill, store, flow, job,
                                   on_progress=on_progress)


@task(name="requeue-failures", cache_policy=NO_CACHE, task_run_name="requeue {flow.name}")
def requeue_task(store: Store, flow: Dataflow, since_ms: int | None = None,
                 profiles: list[str] | None = None) -> pipeline.ReplayPlan:
    return pipeline.replay(store, flow, since_ms, profiles)

"""What a run tells the operator in Prefect: artifacts, WARNING lines and events.

Artifact keys name the config (a short digest of its store's path, or of its URL without
the password) and the dataflow, so two configs with a dataflow of the same name never
overwrite each other's entry on the Artifacts page, and each run's artifact lands on the
same entry as the last one's."""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime
from typing import Any

from prefect.artifacts import acreate_table_artifact
from prefect.events import emit_event

from config import Config, Dataflow
from state import Store
from state.db import now_ms
from state.target import describe, identity
from tasks.pipeline import PassResult

EVENT_FAILURES = "profile-relay.dataflow.failures"
EVENT_PAUSED = "profile-relay.dataflow.paused"
EVENT_RESUMED = "profile-relay.dataflow.resumed"


class ExportsFailed(Exception):
    """What a run that left exports in the failed store fails with; ``counts`` holds the
    run's figures (so ``profile-relay stream`` prints them before exiting 3)."""

    def __init__(self, message: str, counts: dict[str, Any]) -> None:
        super().__init__(message, counts)
        self.counts = counts

    def __str__(self) -> str:
        return str(self.args[0])


def config_tag(config: Config) -> str:
    """Eight hex digits that tell configs apart: a digest of their store's location."""
    return hashlib.sha256(identity(config.state_target).encode()).hexdigest()[:8]


def artifact_key(kind: str, config: Config, dataflow: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    raw = f"{kind}-{dataflow}-{config_tag(config)}"
    return re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stream_figures(store: Store, flow: Dataflow, run: PassResult, started_ms: int) -> list[dict[str, Any]]:
    """This run's figures for one dataflow, as (figure, value) rows: a two-column table
    stays readable however long an error text is."""
    now = now_ms()
    seconds = max(0.001, (now - started_ms) / 1000)
    stats = store.stats(flow.name, since_ms=started_ms)
    d = run.delivery
    rows: list[tuple[str, Any]] = [
        ("window", f"{_iso(started_ms)} to {_iso(now)} ({seconds:.0f} s)"),
        ("changes read", run.changes),
        ("exports decided (streamed)", run.exports),
        ("exports queued by backfills", run.backfilled),
        ("requests sent", d.sent),
        ("delivered", d.delivered),
        ("ended in the failed store", d.failed),
        ("waiting for a retry now", stats.retrying),
        ("waiting in the outbox now", stats.pending),
        ("delivered per second (over the window)", round(d.delivered / seconds, 1)),
        ("latency p50 ms (change to 2xx)", stats.latency_p50_ms),
        ("latency p95 ms (change to 2xx)", stats.latency_p95_ms),
        ("lag (changes not yet read)", stats.lag_changes),
        ("last error in this run", d.last_error or "none"),
    ]
    return [{"figure": k, "value": "-" if v is None else v} for k, v in rows]


async def publish_stream_summary(store: Store, config: Config, flows_: list[Dataflow],
                                 totals: dict[str, PassResult], started_ms: int) -> None:
    for flow_ in flows_:
        await acreate_table_artifact(
            key=artifact_key("stream", config, flow_.name),
            table=stream_figures(store, flow_, totals[flow_.name], started_ms),
            description=f"profile-relay stream of {flow_.name} ({describe(config.state_target)}): "
                        "figures for this run")


def _resource(config: Config, dataflow: str) -> dict[str, str]:
    return {"prefect.resource.id": f"profile-relay.dataflow.{dataflow}",
            "prefect.resource.name": dataflow, "profile-relay.config": config_tag(config)}


def report_breaker(logger: logging.Logger | logging.LoggerAdapter, config: Config,
                   flow: Dataflow, run: PassResult) -> None:
    """A WARNING and a Prefect event for each pause and resume of a dataflow's delivery
    (its circuit breaker) in this pass, so an automation can alert on them."""
    dest = config.destination(flow.destination)
    for change in run.delivery.breaker:
        if change == "paused":
            logger.warning("%s: delivery paused: %d export(s) in a row failed for good (last "
                           "error: %s); new exports stay queued, a probe every %g s resumes "
                           "delivery on its first success", flow.name, dest.pause_after_failures,
                           run.delivery.last_error, dest.probe_seconds)
            emit_event(event=EVENT_PAUSED, resource=_resource(config, flow.name),
                       payload={"after_failures": dest.pause_after_failures,
                                "last_error": run.delivery.last_error,
                                "probe_seconds": dest.probe_seconds})
        else:
            logger.warning("%s: delivery resumed: a probe was delivered", flow.name)
            emit_event(event=EVENT_RESUMED, resource=_resource(config, flow.name), payload={})


def report_failures(logger: logging.Logger | logging.LoggerAdapter, config: Config,
                    totals: dict[str, PassResult]) -> str | None:
    """A WARNING and a Prefect event per dataflow that sent exports to the failed store in
    this run; returns the run's failure message, or None when nothing failed."""
    failed = {name: t for name, t in totals.items() if t.delivery.failed}
    for name, t in failed.items():
        logger.warning("%s: %d export(s) ended in the failed store in this run; last error: "
                       "%s (profile-relay failed / replay)", name, t.delivery.failed,
                       t.delivery.last_error)
        emit_event(event=EVENT_FAILURES, resource=_resource(config, name),
                   payload={"failed": t.delivery.failed, "last_error": t.delivery.last_error})
    if not failed:
        return None
    count = sum(t.delivery.failed for t in failed.values())
    last = next(t.delivery.last_error for t in reversed(list(failed.values())))
    return (f"{count} export(s) ended in the failed store ({', '.join(failed)}); "
            f"last error: {last}")

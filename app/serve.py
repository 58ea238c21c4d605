"""`profile-relay serve`: the stream, backfill and replay deployments, served from this process
(and :func:`pool_values`, a build step of the work-pool deployments in ``prefect.yaml``).

Deployment names: ``stream``, ``backfill`` and ``replay`` (``replay-<dataflow>`` when the
config has several dataflows); the work pool's are ``stream-pool``, ``backfill-pool`` and
``replay-pool``, so neither replaces the other on a shared Prefect server.

The stream flow is one long run that ends itself after ``run_seconds``; its deployment has
an interval schedule of the same length, anchored at the moment ``serve`` starts, so the
first run starts at once and each next one as the last ends. A stream run owns its
dataflows through a lease in the store: the next scheduled run waits (up to 90 s) for the
ending one to let go and takes over, and an extra run (started by hand, say) finds the
lease held and ends Completed without doing anything. There is deliberately no deployment
concurrency limit: its slot lives in the server's database while its lease lives in the
server's memory, so a server stopped during a run (as serve's own server is) leaks the
slot and no stream run would ever start again. Backfill has no schedule (start it from the UI or ``prefect deployment
run``); replay runs every 15 minutes. Parameters point at the config's absolute path, so
runs work whatever directory the runner starts them in, and ``dataflow`` is a choice of
the config's dataflows in the UI's run form (the server rejects any other name).

Served runs execute in child processes, which must reach the same Prefect API as this
one; Prefect's temporary in-process server (what flows use when no ``PREFECT_API_URL`` is
set) is private to the process that started it and runs no scheduler. So without a
``PREFECT_API_URL``, ``serve`` uses a Prefect server already answering on
127.0.0.1:4200, or starts ``prefect server start`` on loopback (UI included, its API
address set to the port it listens on) for as long as it runs. This process also asks the
API to schedule the next runs of its deployments, at once and every minute, so the first
stream run starts immediately; scheduled runs carry idempotency keys, so the server's own
scheduler never duplicates them.

Ctrl-C or SIGTERM stops serve within seconds: the runs in flight are cancelled through
the API (they end Cancelled, their leases released), the schedules are paused, and the
server serve started, if any, stops last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from config import Config, config_location

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

REPLAY_CRON = "*/15 * * * *"
TAGS = ["profile-relay"]
SCHEDULE_EVERY_SECONDS = 60.0
DEFAULT_SERVER_PORT = 4200
SERVER_START_TIMEOUT = 180.0  # a fresh PREFECT_HOME runs its migrations first
logger = logging.getLogger("profile_relay.serve")


def replay_deployment_name(config: Config, dataflow: str) -> str:
    """``replay`` for a config with one dataflow, ``replay-<dataflow>`` for several."""
    return "replay" if len(config.dataflows) == 1 else f"replay-{dataflow}"


def build_deployments(config_path: str, config: Config, interval: float = 2.0,
                      run_seconds: float = 3600.0, replay_cron: str = REPLAY_CRON,
                      anchor: datetime | None = None) -> list[RunnerDeployment]:
    """The deployments ``serve`` runs: stream, backfill, one replay per dataflow.

    Call it from synchronous code: inside an event loop Prefect's ``to_deployment``
    returns coroutines."""
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.deployments.runner import EntrypointType

    from flows.backfill import backfill_flow
    from flows.replay import replay_flow
    from flows.stream import stream_flow

    path = config_location(config_path)
    module = EntrypointType.MODULE_PATH  # works from an installed package, whatever the cwd
    anchor = anchor or datetime.now(UTC).replace(microsecond=0)
    deployments = [
        stream_flow.to_deployment(
            name="stream",
            schedules=[IntervalSchedule(interval=timedelta(seconds=run_seconds),
                                        anchor_date=anchor)],
            parameters={"config_path": path, "interval": interval, "run_seconds": run_seconds},
            description=f"Stream every dataflow of {path}; each run lasts {run_seconds:g} s "
                        "and the schedule starts the next.",
            tags=TAGS, entrypoint_type=module, paused=False,
        ),
    ]
    backfill_params: dict[str, object] = {"config_path": path}
    if len(config.dataflows) == 1:
        backfill_params["dataflow"] = config.dataflows[0].name
    deployments.append(backfill_flow.to_deployment(
        name="backfill", parameters=backfill_params, tags=TAGS, entrypoint_type=module,
        description="Backfill a dataflow (or one segment of it) by hand; pass dataflow "
                    "(and segment) as parameters.", paused=False))
    for flow_ in config.dataflows:
        deployments.append(replay_flow.to_deployment(
            name=replay_deployment_name(config, flow_.name), cron=replay_cron,
            parameters={"config_path": path, "dataflow": flow_.name}, tags=TAGS,
            entrypoint_type=module, paused=False,
            description=f"Replay the failed-request store of {flow_.name}."))
    names = [f.name for f in config.dataflows]
    for deployment in deployments:
        offer_dataflows(deployment, names)
    return deployments


def offer_dataflows(deployment: RunnerDeployment, names: list[str]) -> None:
    """Make the ``dataflow`` parameter a choice of ``names`` in the deployment's parameter
    schema (a drop-down in the UI's run form; the server rejects other values, since the
    schema is enforced). The descriptions come from the flows' docstrings."""
    schema = deployment._parameter_openapi_schema  # the schema to_deployment derived
    prop = schema.properties.get("dataflow")
    if prop is None:
        return
    choice = {"type": "string", "enum": list(names)}
    if "anyOf" in prop:  # optional (stream): empty means every dataflow
        prop["anyOf"] = [choice, {"type": "null"}]
    else:
        prop.pop("type", None)
        prop.update(choice)


async def keep_scheduled(deployment_ids: list[UUID], first_start: datetime) -> None:
    """Ask the API to schedule the next runs of each deployment, now and every minute."""
    from prefect.client.orchestration import get_client

    start = first_start
    async with get_client() as client:
        while True:
            for dep_id in deployment_ids:
                try:
                    response = await client.request(
                        "POST", "/deployments/{id}/schedule", path_params={"id": dep_id},
                        json={"start_time": start.isoformat(), "min_runs": 1, "max_runs": 2})
                    response.raise_for_status()
                except Exception as exc:  # keep serving; the next round tries again
                    logger.warning("could not schedule runs of deployment %s: %s", dep_id,
                                   type(exc).__name__)
            await asyncio.sleep(SCHEDULE_EVERY_SECONDS)
            start = datetime.now(UTC)


async def drop_stale_runs(deployment_ids: list[UUID]) -> int:
    """Delete runs an earlier serve session left scheduled: the fresh schedule replaces
    them, and stale ones, already late, would all start at once beside the new ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    if not deployment_ids:
        return 0
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        for run in runs:
            await client.delete_flow_run(run.id)
    return len(runs)


async def aserve(deployments: list[RunnerDeployment], anchor: datetime,
                 on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Register the deployments, keep their runs scheduled, and run them until stopped."""
    from prefect.runner import Runner

    runner = Runner(name="profile-relay", pause_on_shutdown=True)
    scheduled: list[UUID] = []
    names = []
    for deployment in deployments:
        dep_id = await runner.aadd_deployment(deployment)
        names.append(f"{deployment.flow_name}/{deployment.name}")
        if deployment.schedules:
            scheduled.append(dep_id)
    dropped = await drop_stale_runs(scheduled)
    if dropped:
        logger.info("dropped %d run(s) left scheduled by an earlier session", dropped)
    keeper = asyncio.create_task(keep_scheduled(scheduled, anchor))
    if on_ready:
        on_ready(names)
    started = asyncio.create_task(runner.start())
    await asyncio.sleep(0)  # start() has installed its own SIGTERM handler; ours replace it
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        """First Ctrl-C or SIGTERM: stop the runner, cancelling the runs in flight through
        the API (each ends Cancelled, its process gone). A second one: stop at once."""
        keeper.cancel()
        if stopping or not runner.started:
            started.cancel()
            return
        logger.info("stopping: cancelling the runs in flight")
        stopping.append(asyncio.create_task(_stop_runner(runner, started)))

    loop = asyncio.get_running_loop()
    handled: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop)
                handled.append(sig)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await started
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        keeper.cancel()
        for task in [keeper, *stopping]:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _stop_runner(runner: Runner, started: asyncio.Task[None]) -> None:
    try:
        await runner.astop()
    except Exception as exc:  # the runner is gone already: stop what is left
        logger.warning("could not stop the runner cleanly: %s", exc)
        started.cancel()


class ServerError(RuntimeError):
    """The local Prefect server did not start."""


def _healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(port: int) -> dict[str, str]:
    """The environment of the ``prefect server start`` serve runs on 127.0.0.1:``port``.

    ``--port`` alone moves the API but not the address the UI calls: that comes from
    ``PREFECT_UI_API_URL``, which defaults to port 4200, so the UI of a server on any other
    port would show nothing. Setting the server's port setting too keeps its own links
    (and anything else derived from it) on the right port."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_UI_URL": f"http://127.0.0.1:{port}"}
    env.pop("PREFECT_API_URL", None)
    return env


@contextlib.contextmanager
def prefect_api(echo: Callable[[str], None] = print, server_port: int | None = None
                ) -> Iterator[str]:
    """The Prefect API URL to serve against: ``PREFECT_API_URL`` when set, else a server
    on 127.0.0.1:4200, else ``prefect server start`` started here and stopped on exit.
    ``server_port`` (0: any free port) always starts a server of our own on it."""
    from prefect.settings import PREFECT_API_URL

    if server_port is None:
        configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
        if configured:
            yield str(configured)
            return
        default = f"http://127.0.0.1:{DEFAULT_SERVER_PORT}/api"
        if _healthy(default):
            echo(f"using the Prefect server at {default}")
            yield default
            return
        port = DEFAULT_SERVER_PORT if _port_free(DEFAULT_SERVER_PORT) else _free_port()
    else:
        port = server_port or _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    echo(f"starting a local Prefect server on 127.0.0.1:{port} (UI: http://127.0.0.1:{port}); "
         "it stops with serve")
    env = server_env(port)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # Ctrl-C reaches serve, which stops the server last
        )
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while not _healthy(api_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-2000:].decode("utf-8", "replace")
                    raise ServerError(f"the Prefect server did not start on port {port}:\n{tail}")
                time.sleep(0.5)
            yield api_url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def serve(config_path: str, config: Config, interval: float = 2.0, run_seconds: float = 3600.0,
          replay_cron: str = REPLAY_CRON,
          on_ready: Callable[[list[str]], None] | None = None,
          echo: Callable[[str], None] = print, server_port: int | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; Prefect pauses the deployments' schedules then."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # until the runner installs its own SIGTERM handler

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError), \
                prefect_api(echo, server_port) as api_url:
            os.environ["PREFECT_API_URL"] = api_url  # for the flow-run processes
            with temporary_settings({PREFECT_API_URL: api_url}):
                anchor = datetime.now(UTC).replace(microsecond=0)
                # built outside the event loop: Prefect's to_deployment turns async inside one
                deployments = build_deployments(config_path, config, interval, run_seconds,
                                                replay_cron, anchor)
                asyncio.run(aserve(deployments, anchor, on_ready))
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


# --- the work pool (prefect.yaml) --------------------------------------------------------

POOL_STREAM_DEPLOYMENT = "profile-relay-stream/stream-pool"
FIRST_RUN_DELAY_SECONDS = 15.0  # the server schedules a new deployment's runs within 5 s


def pool_values(stream_deployment: str = POOL_STREAM_DEPLOYMENT) -> dict[str, str]:
    """A ``prefect deploy`` build step (``prefect.yaml``): values resolved at deploy time.

    ``directory``: the directory ``prefect deploy`` runs in (the checkout). The pull step
    makes it the working directory of the flow runs, so a relative ``config_path`` is read
    there; no environment variable has to be set by hand.

    ``stream_anchor``: where the stream schedule's intervals start. While a run of the
    stream deployment is running (a re-deploy), the start of the newest one, so the next
    run still comes as that one ends and takes over; otherwise a few seconds from now, so
    the first run starts at once (an interval schedule anchored at the moment of deploying
    would first run one interval later)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    anchor = datetime.now(UTC) + timedelta(seconds=FIRST_RUN_DELAY_SECONDS)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(stream_deployment)
        except ObjectNotFound:
            deployment = None
        if deployment is not None:
            running = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            starts = [r.start_time for r in running if r.start_time is not None]
            if starts:
                anchor = max(starts)
    return {"directory": str(Path.cwd().resolve()),
            "stream_anchor": anchor.astimezone(UTC).isoformat(timespec="seconds")}

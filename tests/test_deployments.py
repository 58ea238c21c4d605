"""The work pool of prefect.yaml, run the way the README says, against a real Prefect server
(slow: `make test-ops`).

Each test starts ``prefect server start`` on a free loopback port with a PREFECT_HOME of its
own (scheduler on), copies the checkout's files to a temporary directory (a fresh clone, with
whatever is not committed yet), and runs the README's commands there, with the virtualenv's
``bin`` first on PATH (as after ``. .venv/bin/activate``), ``PREFECT_API_URL`` pointing at the
server and nothing else set by hand::

    profile-relay receiver --port 0                  (stands in for the real endpoint)
    profile-relay ingest -c examples/config.yaml examples/profiles.ndjson
    prefect work-pool create profile-relay --type process
    prefect deploy --all                             (no stdin, prompts forced on)
    prefect worker start --pool profile-relay

``PREFECT_CLI_PROMPT=true`` makes ``prefect deploy`` behave as in a terminal: any question
it asked would read the empty stdin and fail the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.procs import prefect_server, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
STREAM = "profile-relay-stream/stream-pool"
BACKFILL = "profile-relay-backfill/backfill-pool"
REPLAY = "profile-relay-replay/replay-pool"
SAMPLE_REQUESTS = 26  # the bundled profiles qualified for local-stream's segments


# --- a fresh checkout, its commands and processes -----------------------------------------


def copy_checkout(dest: Path) -> Path:
    """The repository's files (tracked, and new ones not ignored) as they are on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
        check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def cli_env(api_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(ROOT / ".venv"),
               PREFECT_API_URL=api_url, PREFECT_HOME=str(home), PREFECT_CLI_PROMPT="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    return env


class Shell:
    """Runs commands in the copied checkout the way an operator's shell would."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path) -> None:
        self.cwd, self.env, self.logs = cwd, env, logs
        self.children: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, command: str, timeout: float = 120) -> str:
        """One command to completion, stdin empty; its output, or a failure with it."""
        done = subprocess.run(command.split(), cwd=self.cwd, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{output}"
        return output

    def start(self, name: str, command: str) -> Path:
        """A long-running command in its own process group; returns its log file."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            self.children.append(subprocess.Popen(
                command.split(), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return log

    def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(15)
            with contextlib.suppress(ProcessLookupError):  # the worker's flow runs too
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)


@contextlib.contextmanager
def operator(tmp_path: Path) -> Iterator[tuple[Shell, str]]:
    """A Prefect server (all services: the scheduler creates the deployments' runs) and a
    shell in a fresh copy of the checkout, talking to it."""
    with prefect_server(tmp_path / "server-home", lean=False) as api_url:
        checkout = copy_checkout(tmp_path / "checkout")
        shell = Shell(checkout, cli_env(api_url, tmp_path / "cli-home"), tmp_path / "logs")
        try:
            yield shell, api_url
        finally:
            shell.stop_all()


def start_receiver(shell: Shell) -> Path:
    """`profile-relay receiver --port 0`; points the copy's example config at it and returns
    the file it records requests to."""
    record = shell.logs / "receiver.ndjson"
    log = shell.start("receiver", f"profile-relay receiver --port 0 --record {record}")
    line = wait_for(lambda: re.search(r"listening on (http://127\.0\.0\.1:\d+)",
                                      log.read_text()), 30, 0.1, "the receiver")
    config = shell.cwd / "examples" / "config.yaml"
    text = config.read_text(encoding="utf-8")
    assert "http://127.0.0.1:8080/hook" in text
    config.write_text(text.replace("http://127.0.0.1:8080", line.group(1)), encoding="utf-8")
    return record


def received(record: Path) -> int:
    return len(record.read_bytes().splitlines()) if record.exists() else 0


# --- the Prefect API ------------------------------------------------------------------------


def api(api_url: str, call: Callable[[Any], Any]) -> Any:
    """``call(client)`` with a synchronous client of the test server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return call(client)


def runs_of(api_url: str, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def read(client: Any) -> list[Any]:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[dep.id])))

    return api(api_url, read)


def running(api_url: str, deployment: str) -> list[Any]:
    return [r for r in runs_of(api_url, deployment) if r.state_type.value == "RUNNING"]


# --- the tests ------------------------------------------------------------------------------


def test_readme_work_pool_commands_stream_at_once_from_a_fresh_checkout(tmp_path: Path) -> None:
    """The README's work-pool commands, as written, in a fresh copy of the checkout: deploy
    asks nothing, the stream deployment's first run starts at once (not an interval later)
    and delivers the sample profiles through the relative config path; a second deploy
    while it runs keeps the schedule on that run, so the next one takes over as it ends."""
    with operator(tmp_path) as (shell, api_url):
        record = start_receiver(shell)
        assert "ingested 50, rejected 0" in shell.run(
            "profile-relay ingest -c examples/config.yaml examples/profiles.ndjson")
        shell.run("prefect work-pool create profile-relay --type process")
        deployed_at = datetime.now(UTC)
        output = shell.run("prefect deploy --all")
        for name in (STREAM, BACKFILL, REPLAY):
            assert f"Deployment '{name}' successfully created" in output, output
        assert "Warning" not in output and "?" not in output, output
        worker_log = shell.start("worker", "prefect worker start --pool profile-relay")

        [run] = wait_for(lambda: running(api_url, STREAM), 60, 0.5, "a running stream run")
        assert run.expected_start_time - deployed_at < timedelta(seconds=30), (
            run.expected_start_time, deployed_at)
        wait_for(lambda: received(record) >= SAMPLE_REQUESTS, 60, 0.2,
                 "the sample profiles at the receiver")
        assert received(record) == SAMPLE_REQUESTS

        def deployments(client: Any) -> dict[str, Any]:
            return {name: client.read_deployment_by_name(name)
                    for name in (STREAM, BACKFILL, REPLAY)}

        deps = api(api_url, deployments)
        stream = deps[STREAM]
        assert stream.entrypoint == "flows.stream.stream_flow"
        assert stream.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(shell.cwd.resolve())}}]
        assert stream.parameters["config_path"] == "examples/config.yaml"
        [schedule] = stream.schedules
        assert schedule.schedule.interval == timedelta(seconds=stream.parameters["run_seconds"])
        assert not deps[BACKFILL].schedules
        assert deps[REPLAY].schedules[0].schedule.cron == "*/15 * * * *"
        for dep in deps.values():  # the flows' docstrings, in the run form of the UI
            props = dep.parameter_openapi_schema["properties"]
            assert all(p.get("description") for p in props.values()), (dep.name, props)
        logs = worker_log.read_text(errors="replace")
        assert "Traceback" not in logs, logs

        # the README's alert automation is accepted by the server as written
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        [snippet] = re.findall(r"```yaml\n(name: profile-relay failed exports\n.*?)```", readme,
                               re.S)
        alert = shell.logs / "alert.yaml"
        alert.write_text(snippet, encoding="utf-8")
        assert "Created automation 'profile-relay failed exports'" in shell.run(
            f"prefect automation create --from-file {alert}")
        [automation] = api(api_url, lambda c: c.read_automations_by_name(
            "profile-relay failed exports"))
        assert automation.trigger.expect == {"profile-relay.dataflow.failures"}

        # deploying again while the stream runs: the schedule stays on that run
        shell.run("prefect deploy --all")
        [again] = api(api_url, lambda c: [c.read_deployment_by_name(STREAM)])
        anchor = again.schedules[0].schedule.anchor_date
        assert abs(anchor - run.start_time) < timedelta(seconds=1), (anchor, run.start_time)
        interval = again.schedules[0].schedule.interval
        upcoming = wait_for(lambda: sorted(r.expected_start_time for r in runs_of(
            api_url, STREAM) if r.state_type.value == "SCHEDULED"), 30, 0.5, "scheduled runs")
        assert abs(upcoming[0] - (run.start_time + interval)) < timedelta(seconds=1), upcoming
        [still] = running(api_url, STREAM)
        assert still.id == run.id


def lease_timeline(db: Path, seconds: float, every: float = 0.1) -> list[tuple[float, str]]:
    """(time, owner) every ``every`` s while a stream run holds the dataflow's lease, (time,
    "") while nobody does, read from the store as the runs write it."""
    samples: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        owner = ""
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT owner, expires_at FROM leases").fetchone()
            finally:
                conn.close()
            if row and row[1] > time.time() * 1000:
                owner = row[0]
        samples.append((time.monotonic(), owner))
        time.sleep(every)
    return samples


def test_stream_runs_hand_over_without_a_gap(tmp_path: Path) -> None:
    """The stream deployment with a 30 s interval (and 30 s runs) instead of 600: each
    scheduled run waits for the lease of the run that is ending and takes over. The lease
    is free for about a second at each hand-over (the waiting run polls it every second;
    a run can start a second or two after its tick), never for long, and no run ends
    having done nothing."""
    with operator(tmp_path) as (shell, api_url):
        start_receiver(shell)
        shell.run("profile-relay ingest -c examples/config.yaml examples/profiles.ndjson")
        prefect_yaml = shell.cwd / "prefect.yaml"
        doc = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
        [stream] = [d for d in doc["deployments"] if d["name"] == "stream-pool"]
        stream["schedules"][0]["interval"] = 30
        stream["parameters"]["run_seconds"] = 30
        prefect_yaml.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        shell.run("prefect work-pool create profile-relay --type process")
        shell.run("prefect deploy --all")
        shell.start("worker", "prefect worker start --pool profile-relay")
        db = shell.cwd / "examples" / "relay.db"
        wait_for(lambda: running(api_url, STREAM), 60, 0.5, "the first stream run")
        timeline = lease_timeline(db, 100)
        runs = runs_of(api_url, STREAM)
        idle = [r.name for r in runs if r.state and "nothing to do" in (r.state.message or "")]

    assert not idle, f"runs that found the lease held and did nothing: {idle}"
    owners = [o for _, o in timeline]
    first = next(i for i, o in enumerate(owners) if o)
    gaps, start = [], None
    for (at, owner) in timeline[first:]:
        if not owner and start is None:
            start = at
        elif owner and start is not None:
            gaps.append(at - start)
            start = None
    changes = sum(1 for a, b in zip(owners[first:], owners[first + 1:], strict=False)
                  if a and b and a != b) + len(gaps)
    distinct = {o for o in owners if o}
    assert len(distinct) >= 3, f"expected 3 stream runs in 100 s: {json.dumps(sorted(distinct))}"
    assert changes >= 2
    if start is not None:  # a hand-over under way when the timeline ended
        gaps.append(timeline[-1][0] - start)
    # the successor polls the lease every second and starts up to ~2 s after its tick
    assert max(gaps, default=0.0) < 5, f"hand-over gaps (s): {gaps}"
    print(f"\nhand-overs: {len(distinct) - 1}, free-lease gaps (s): "
          f"{[round(g, 2) for g in gaps]}")


def test_commands_started_at_once_on_a_fresh_prefect_home_log_no_error(tmp_path: Path) -> None:
    """Three `profile-relay stream --once` at once, without PREFECT_API_URL, on a fresh
    PREFECT_HOME: each starts Prefect's temporary server, and the first start there is made
    under a lock, so no server logs the block-registration race (an ERROR traceback)."""
    config = tmp_path / "relay.yaml"
    text = (ROOT / "examples" / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("http://127.0.0.1:8080/hook", "http://127.0.0.1:9/hook"),
                      encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "fresh-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")
    procs = [subprocess.Popen([str(BIN / "profile-relay"), "stream", "-c", str(config), "--once"],
                              cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        outputs.append((proc.returncode, out.decode() + err.decode()))
    for code, output in outputs:
        assert code == 0, output
        assert "Traceback" not in output and "| ERROR" not in output, output

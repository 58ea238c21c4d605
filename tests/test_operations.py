"""Operations: prefect.yaml, the bundled examples, `serve` and `demo`, run for real.

`serve` and `demo` run as subprocesses with a throwaway PREFECT_HOME, each starting its
own Prefect server (serve: `prefect server start`; demo: Prefect's temporary server), or,
to read the runs' states after serve stopped, with one Prefect server for the module. The
work pool of prefect.yaml runs for real in tests/test_deployments.py, the UI in
tests/test_browser.py.
"""

from __future__ import annotations

import asyncio
import filecmp
import inspect
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app
from app.receiver import Receiver
from config import load_config
from state import open_store
from tasks.ingest import ingest_files

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / ".venv" / "bin" / "profile-relay"
PREFECT_YAML = ROOT / "prefect.yaml"


def offline_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One throwaway PREFECT_HOME for the subprocess tests: only the first migrates it."""
    return tmp_path_factory.mktemp("prefect-home")


# --- prefect.yaml -------------------------------------------------------------------------

POOL_NAMES = {"stream-pool", "backfill-pool", "replay-pool", "stream-group", "supervise-pool"}


def prefect_doc() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_doc()["deployments"]}


def entrypoint_function(entrypoint: str) -> Any:
    """A module-path entrypoint (``package.module.function``), imported as the installed
    package resolves it: whatever the directory, nothing to copy."""
    from prefect.utilities.importtools import import_object

    assert ":" not in entrypoint and not entrypoint.endswith(".py"), entrypoint
    return import_object(entrypoint)


def test_prefect_yaml_has_the_pool_deployments() -> None:
    doc = prefect_doc()
    assert doc["name"] == "profile-relay"
    assert str(doc["prefect-version"]).startswith("3.")
    deps = deployments()
    assert set(deps) == POOL_NAMES
    for dep in deps.values():
        assert dep["work_pool"]["name"] == "profile-relay"


def test_prefect_yaml_needs_no_environment_variable() -> None:
    """The pull step's directory comes from the build step (the directory `prefect deploy`
    runs in), not from a variable someone has to export first."""
    doc = prefect_doc()
    [build] = doc["build"]
    assert build == {"app.serve.pool_values": {"id": "relay"}}
    [pull] = doc["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory":
                    {"directory": "{{ relay.directory }}"}}
    code = "\n".join(line.split("#", 1)[0] for line in PREFECT_YAML.read_text().splitlines())
    assert "{{ $" not in code and "${" not in code


@pytest.mark.parametrize("name", sorted(POOL_NAMES))
def test_prefect_yaml_entrypoints_accept_their_parameters(name: str) -> None:
    dep = deployments()[name]
    flow = entrypoint_function(dep["entrypoint"])
    assert hasattr(flow, "to_deployment"), f"{dep['entrypoint']} is not a Prefect flow"
    signature = inspect.signature(flow.fn)
    params = dep.get("parameters") or {}
    unknown = set(params) - set(signature.parameters)
    assert not unknown, f"{name}: parameters the flow does not take: {unknown}"
    required = {p.name for p in signature.parameters.values()
                if p.default is inspect.Parameter.empty}
    assert required <= set(params), f"{name}: required parameters missing: {required - set(params)}"


def test_prefect_yaml_schedules() -> None:
    deps = deployments()
    stream = deps["stream-pool"]
    [schedule] = stream["schedules"]
    # back to back: each run lasts one interval, the next takes over its lease
    assert schedule["interval"] == stream["parameters"]["run_seconds"]
    assert schedule["anchor_date"] == "{{ relay.stream_anchor }}"  # first run at once
    assert "concurrency_limit" not in stream  # a leaked slot would stop streaming for good
    assert "schedules" in deps["backfill-pool"]  # explicit (null): deploy asks nothing
    assert deps["backfill-pool"]["schedules"] is None
    [replay] = deps["replay-pool"]["schedules"]
    assert replay["cron"] == "*/15 * * * *"


def test_prefect_yaml_parameters_point_at_a_valid_config() -> None:
    for dep in deployments().values():
        config = load_config(ROOT / dep["parameters"]["config_path"])
        dataflow = dep["parameters"].get("dataflow")
        if dataflow is not None:
            config.dataflow(dataflow)


def test_prefect_yaml_holds_no_secrets() -> None:
    text = PREFECT_YAML.read_text(encoding="utf-8")
    assert "whsec_" not in text and "Bearer " not in text
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if re.search(r"(token|secret|password)\s*:", code, re.I):
            assert "{{" in code or "${" in code, line
    for dep in deployments().values():  # a template there is resolved at deploy time and
        # stored in the deployment in plain text
        assert "prefect.blocks" not in yaml.safe_dump(dep["work_pool"]), dep["name"]
        assert not (dep["work_pool"].get("job_variables") or {}).get("env"), dep["name"]


def test_pool_and_serve_deployment_names_differ() -> None:
    from app.serve import build_deployments

    config_path = ROOT / "examples" / "config.yaml"
    served = {d.name for d in build_deployments(config_path, load_config(config_path))}
    assert served == {"stream", "backfill", "replay"}
    assert not served & POOL_NAMES


# --- examples -----------------------------------------------------------------------------


def test_bundled_examples_match_the_top_level_copies() -> None:
    for name in ("config.yaml", "profiles.ndjson"):
        assert filecmp.cmp(ROOT / "examples" / name, ROOT / "app" / "examples" / name,
                           shallow=False), f"examples/{name} and app/examples/{name} differ"


def test_example_profiles_ingest_cleanly(tmp_path: Path) -> None:
    config = load_config(ROOT / "examples" / "config.yaml")
    db = open_store(tmp_path / "relay.db")
    try:
        result = ingest_files(db, [str(ROOT / "examples" / "profiles.ndjson")],
                              frozenset(s.id for s in config.segments))
    finally:
        db.close()
    assert (result.ingested, result.rejected) == (50, 0)


# --- serve --------------------------------------------------------------------------------


def test_serve_builds_stream_backfill_and_replay_deployments() -> None:
    from app.serve import build_deployments

    config_path = ROOT / "examples" / "config.yaml"
    built = {d.name: d for d in build_deployments(config_path, load_config(config_path),
                                                   interval=1.0, run_seconds=600)}
    assert set(built) == {"stream", "backfill", "replay"}
    path = str(config_path.resolve())
    stream = built["stream"]
    assert stream.parameters == {"config_path": path, "interval": 1.0, "run_seconds": 600}
    [schedule] = stream.schedules
    assert schedule.schedule.interval.total_seconds() == 600
    assert not built["backfill"].schedules
    assert built["backfill"].parameters == {"config_path": path, "dataflow": "local-stream"}
    assert built["replay"].schedules[0].schedule.cron == "*/15 * * * *"
    assert built["replay"].parameters == {"config_path": path, "dataflow": "local-stream"}


def test_serve_parameter_schemas_describe_and_offer_the_dataflows(tmp_path: Path) -> None:
    """Descriptions come from the flows' docstrings; `dataflow` is a choice of the config's
    dataflows (a select in the UI's run form, enforced by the server)."""
    from app.serve import build_deployments

    doc = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text(encoding="utf-8"))
    doc["dataflows"].append({**doc["dataflows"][0], "name": "second"})
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    built = {d.name: d for d in build_deployments(config_path, load_config(config_path))}
    names = ["local-stream", "second"]
    for deployment in built.values():
        schema = deployment._parameter_openapi_schema.model_dump()
        assert deployment.enforce_parameter_schema
        for name, prop in schema["properties"].items():
            assert prop.get("description"), (deployment.name, name)
        dataflow = schema["properties"]["dataflow"]
        if deployment.name == "stream":  # optional: empty streams every dataflow
            assert dataflow["anyOf"] == [{"type": "string", "enum": names}, {"type": "null"}]
        else:
            assert dataflow["enum"] == names and dataflow["type"] == "string"


def test_serve_points_the_ui_of_its_server_at_its_port() -> None:
    from app.serve import server_env

    env = server_env(4321)
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_API_PORT"] == "4321"
    assert "PREFECT_API_URL" not in env


def test_serve_gives_each_dataflow_its_replay_deployment(tmp_path: Path) -> None:
    from app.serve import build_deployments

    doc = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text(encoding="utf-8"))
    doc["dataflows"].append({**doc["dataflows"][0], "name": "second"})
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    built = {d.name: d for d in build_deployments(config_path, load_config(config_path))}
    assert set(built) == {"stream", "backfill", "replay-local-stream", "replay-second"}
    assert "dataflow" not in built["backfill"].parameters  # chosen per run
    assert built["replay-second"].parameters["dataflow"] == "second"


async def _read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str],
                      timeout: float) -> str:
    async def scan() -> str:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("process ended early:\n" + "".join(seen))
            seen.append(line)
            if pattern in line:
                return line
    return await asyncio.wait_for(scan(), timeout)


def unexpected_tracebacks(output: str) -> list[str]:
    """Log records of ``output`` with a traceback, except the one Prefect 3.9's engine prints
    when a run of an async flow is cancelled (its process gets SIGTERM: TerminationSignal)."""
    records = re.split(r"\n(?=\d\d:\d\d:\d\d\.\d{3} \|)", output)
    return [r for r in records if "Traceback" in r and "TerminationSignal" not in r]


def serve_env(home: Path, api_url: str) -> dict[str, str]:
    return {**offline_env(home), "PREFECT_API_URL": api_url}


@pytest.fixture(scope="module")
def prefect_server_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server that outlives the serve processes, to read their runs' states."""
    from testkit.procs import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


async def runs_of(api_url: str, deployment: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[dep.id])))


async def examples_ingested(tmp_path: Path, receiver: Receiver) -> Path:
    """The bundled example config pointed at ``receiver``, its sample profiles ingested."""
    config = tmp_path / "relay.yaml"
    text = (ROOT / "examples" / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("http://127.0.0.1:8080/hook", f"{receiver.base_url}/hook"),
                      encoding="utf-8")
    result = await asyncio.to_thread(CliRunner().invoke, app, [
        "ingest", "-c", str(config), str(ROOT / "examples" / "profiles.ndjson")])
    assert result.exit_code == 0, result.output
    return config


async def test_sigterm_stops_serve_within_seconds_and_cancels_its_stream_run(
        tmp_path: Path, prefect_server_api: str) -> None:
    """serve on a Prefect server of its own (PREFECT_API_URL), its stream run delivering;
    SIGTERM (what systemd, Docker or Kubernetes send) ends serve within seconds and the
    stream run ends Cancelled (in the API, not left Running), its process gone."""
    async with Receiver() as receiver:
        config = await examples_ingested(tmp_path, receiver)
        proc = await asyncio.create_subprocess_exec(
            str(RELAY), "serve", "-c", str(config), "--run-seconds", "600", "--interval", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            env=serve_env(tmp_path / "home", prefect_server_api))
        seen: list[str] = []
        assert proc.stdout is not None
        try:
            await _read_until(proc.stdout, "serving 3 deployment(s)", seen, 60)
            deadline = time.monotonic() + 60
            while len(receiver.requests) < 26 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert len(receiver.requests) == 26, "".join(seen)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            rest, _ = await asyncio.wait_for(proc.communicate(), 30)
            took = time.monotonic() - sent
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    output = "".join(seen) + rest.decode()
    assert proc.returncode == 0, output
    assert "serve stopped" in output
    assert took < 10, f"serve took {took:.1f} s to stop\n{output}"
    assert not unexpected_tracebacks(output), output
    runs = await runs_of(prefect_server_api, "profile-relay-stream/stream")
    states = {r.name: r.state_type.value for r in runs if r.state_type.value != "SCHEDULED"}
    assert list(states.values()) == ["CANCELLED"], states


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_runs_the_stream_deployment_and_stops_cleanly(
        tmp_path: Path, prefect_home: Path, stop: signal.Signals) -> None:
    """Subprocess with its own Prefect server; the first stream run delivers the backfill,
    then SIGINT (Ctrl-C) or SIGTERM stops everything, the running stream run included.
    12 to 30 s each (18 s when it migrates the shared PREFECT_HOME), hence slow."""
    async with Receiver() as receiver:
        config = await examples_ingested(tmp_path, receiver)
        proc = await asyncio.create_subprocess_exec(
            str(RELAY), "serve", "-c", str(config), "--run-seconds", "30", "--interval", "1",
            "--prefect-port", "0", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            env=offline_env(prefect_home))
        seen: list[str] = []
        assert proc.stdout is not None
        try:
            line = await _read_until(proc.stdout, "starting a local Prefect server", seen, 30)
            port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
            await _read_until(proc.stdout, "serving 3 deployment(s)", seen, 150)
            deadline = time.monotonic() + 90
            while len(receiver.requests) < 26 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            assert len(receiver.requests) == 26, "".join(seen)
            proc.send_signal(stop)
            rest, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    output = "".join(seen) + rest.decode()
    assert proc.returncode == 0, output
    assert "serve stopped" in output
    assert not unexpected_tracebacks(output), output
    try:  # the Prefect server it started is gone too
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        pass
    else:
        writer.close()
        pytest.fail(f"the Prefect server on port {port} still accepts connections")


def test_serve_rejects_a_bad_cron(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "-c", str(ROOT / "examples" / "config.yaml"),
                                      "--replay-cron", "every now and then"])
    assert result.exit_code == 2
    assert "not a valid cron expression" in result.stderr


# --- demo ---------------------------------------------------------------------------------


def test_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "not empty and was not made by the demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


async def test_demo_runs_end_to_end(tmp_path: Path, prefect_home: Path) -> None:
    scratch = tmp_path / "demo"
    scratch.mkdir()
    (scratch / "leftover.txt").write_text("from an earlier demo")
    (scratch / ".profile-relay-demo").write_text("")
    proc = await asyncio.create_subprocess_exec(
        str(RELAY), "demo", "--dir", str(scratch), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=offline_env(prefect_home))
    try:
        out, errors = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text + errors.decode()
    assert "demo OK: the receiver got exactly the 30 expected requests" in text
    assert "unmapped attribute: no export (as the export rules say" in text
    assert "Traceback" not in errors.decode(), errors.decode()
    assert not (scratch / "leftover.txt").exists()
    recorded = [orjson.loads(x) for x in (scratch / "receiver.ndjson").read_bytes().splitlines()]
    assert len(recorded) == 30
    assert all(r["status"] == 200 for r in recorded)
    assert load_config(scratch / "relay.yaml").dataflows[0].name == "demo-stream"

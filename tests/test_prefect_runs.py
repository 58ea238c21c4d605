"""Runs as an operator sees them in Prefect: Secret blocks resolved in every kind of run,
failed deliveries that make the run Failed (with a WARNING and exit code 3), and healthy
runs that are Completed with exit code 0. A real Prefect test harness, a real endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
from typer.testing import CliRunner

from app.cli import app
from flows.backfill import backfill_flow
from flows.replay import replay_flow
from flows.stream import stream_flow
from tests.relay_fixtures import FLOW, fragment, ingest, store

pytestmark = pytest.mark.prefect


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """Every test here runs flows on the session's Prefect harness."""


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def last_flow_run() -> Any:
    """The newest flow run and its logs, once the final log line has reached the API (logs
    are shipped in the background)."""
    async with get_client() as client:
        [run] = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1,
                                            flow_run_filter=FlowRunFilter())
        for _ in range(100):  # up to 10 s
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if any("Finished in state" in log.message for log in logs):
                break
            await asyncio.sleep(0.1)
    return run, logs


async def test_a_secret_block_reaches_the_endpoint_from_every_run(tmp_path: Path,
                                                                  endpoint) -> None:
    token = "token-from-a-secret-block-0042"
    await Secret(value=token).save("crm-token", overwrite=True)
    config, db = store(tmp_path, endpoint.url,
                       auth={"type": "bearer", "token": "{{ prefect.blocks.secret.crm-token }}"})
    config_path = str(tmp_path / "config.yaml")
    endpoint.expect_bearer = {token}
    ingest(db, config, fragment("p-1"), fragment("p-2"))

    await stream_flow(config_path, once=True)                        # the stream flow
    assert len(endpoint.requests) == 2
    await backfill_flow(config_path, FLOW, "seg-a")                  # the backfill flow
    assert len(endpoint.requests) == 4
    endpoint.always(400)
    ingest(db, config, fragment("p-1", "Bo"))
    state = await stream_flow(config_path, once=True, return_state=True)
    assert state.is_failed()
    endpoint.always(200)
    await replay_flow(config_path, FLOW)                             # replay
    assert len(endpoint.requests) == 6
    result = await asyncio.to_thread(cli, "test-send", "-c", config_path, "--destination", "crm")
    assert result.exit_code == 0, result.output                      # test-send
    assert len(endpoint.requests) == 7
    assert {r.headers["Authorization"] for r in endpoint.requests} == {f"Bearer {token}"}
    assert token not in result.output


async def test_failed_deliveries_make_the_run_failed_and_exit_3(tmp_path: Path,
                                                               endpoint) -> None:
    config, db = store(tmp_path, endpoint.url)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"), fragment("p-2"))
    endpoint.fail(1, 400)  # one export refused for good, the other delivered
    result = await asyncio.to_thread(cli, "stream", "-c", config_path, "--once")
    assert result.exit_code == 3, result.output
    assert "1 export(s) ended in the failed store" in result.output
    run, logs = await last_flow_run()
    assert run.state.is_failed()
    assert "1 export(s) ended in the failed store" in run.state.message
    assert "HTTP 400" in run.state.message
    warnings = [log.message for log in logs if log.level >= 30]
    assert any(FLOW in m and "failed store" in m for m in warnings), warnings

    ingest(db, config, fragment("p-3"))  # a healthy run afterwards: Completed, exit 0
    result = await asyncio.to_thread(cli, "stream", "-c", config_path, "--once")
    assert result.exit_code == 0, result.output
    run, logs = await last_flow_run()
    assert run.state.is_completed()
    assert not [log.message for log in logs if log.level >= 30]


async def test_backfill_and_replay_exit_3_while_exports_fail(tmp_path: Path, endpoint) -> None:
    config, db = store(tmp_path, endpoint.url)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"))
    endpoint.always(500)
    result = await asyncio.to_thread(cli, "backfill", "-c", config_path, "--dataflow", FLOW)
    assert result.exit_code == 3, result.output
    result = await asyncio.to_thread(cli, "replay", "-c", config_path, "--dataflow", FLOW)
    assert result.exit_code == 3, result.output
    endpoint.always(200)
    result = await asyncio.to_thread(cli, "replay", "-c", config_path, "--dataflow", FLOW)
    assert result.exit_code == 0, result.output
    assert '"resent": 1' in result.output

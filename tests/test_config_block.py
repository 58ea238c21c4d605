"""A config kept in Prefect (`profile-relay config push`, `-c prefect-block://NAME`): workers
on any machine run with the same config, and its secrets stay references. Against the
session's real Prefect harness and a real endpoint on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app
from testkit.procs import write_config
from tests.relay_fixtures import fragment

pytestmark = pytest.mark.prefect

TOKEN = "pushed-config-bearer-token-0451"


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """Blocks and flow runs on the session's Prefect harness."""


def block_config(tmp_path: Path, url: str, **dest: Any) -> Path:
    """A config whose store is an absolute path (a pushed config is read from any
    directory), with the bearer token as an environment reference."""
    path = write_config(tmp_path, url, auth={"type": "bearer", "token": "${RELAY_TEST_TOKEN}"},
                        **dest)
    doc = yaml.safe_load(path.read_text())
    doc["state"] = str(tmp_path / "relay.db")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def cli(*args: str) -> Any:
    """The command line in a thread: the endpoint keeps serving meanwhile."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def test_a_pushed_config_runs_the_stream_and_keeps_its_secret_a_reference(
        tmp_path: Path, endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from config.blocks import RelayConfig

    monkeypatch.setenv("RELAY_TEST_TOKEN", TOKEN)
    path = block_config(tmp_path, endpoint.url)
    pushed = await cli("config", "push", "-c", str(path), "--name", "crm-config")
    assert pushed.exit_code == 0, pushed.output
    assert "prefect-block://crm-config" in pushed.output
    stored = await RelayConfig.aload("crm-config")
    assert "${RELAY_TEST_TOKEN}" in stored.yaml and TOKEN not in stored.yaml

    lines = tmp_path / "in.ndjson"
    lines.write_bytes(b"".join(fragment(f"p-{i}") for i in range(3)))
    ref = "prefect-block://crm-config"
    assert (await cli("ingest", "-c", ref, str(lines))).exit_code == 0
    result = await cli("stream", "-c", ref, "--once")
    assert result.exit_code == 0, result.output
    assert sorted(r.body for r in endpoint.requests) and len(endpoint.requests) == 3
    assert {r.headers["Authorization"] for r in endpoint.requests} == {f"Bearer {TOKEN}"}
    assert (await cli("validate", "-c", ref)).exit_code == 0


async def test_push_refuses_an_inline_secret_and_a_bad_name(tmp_path: Path, endpoint: Any) -> None:
    path = write_config(tmp_path, endpoint.url, auth={"type": "bearer", "token": TOKEN})
    result = await cli("config", "push", "-c", str(path), "--name", "inline")
    assert result.exit_code == 2
    assert "destinations[0].auth.token" in result.output and TOKEN not in result.output
    result = await cli("config", "push", "-c", str(path), "--name", "Not A Name")
    assert result.exit_code == 2 and "--name" in result.output


async def test_a_missing_block_is_one_clear_error() -> None:
    result = await cli("validate", "-c", "prefect-block://no-such-config")
    assert result.exit_code == 2
    assert "cannot read the config block 'no-such-config'" in result.output
    assert "Traceback" not in result.output

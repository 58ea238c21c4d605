"""The command line: validate, ingest, receiver and test-send, against real loopback
servers and real SQLite files (no Prefect server needed)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from typer.testing import CliRunner

from app.cli import app
from app.receiver import Receiver, first_identity, segment_summary
from state import open_store
from testkit.procs import free_port
from testkit.procs import write_config as write_relay_config

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / ".venv" / "bin" / "profile-relay"
runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


CATALOGUE = [{"id": "seg-a", "name": "First name equals John",
              "createdAt": 1648553325000, "updatedAt": 1648553330000},
             {"id": "seg-b", "name": "Unmapped"}]


def write_config(path: Path, endpoint: str = "http://127.0.0.1:9/hook",
                 **dest: Any) -> Path:
    """testkit's config at ``path``, with a named, timestamped catalogue and two mapped
    attributes."""
    return write_relay_config(path.parent, endpoint, file=path.name, segments=CATALOGUE,
                              attributes=["person.name.firstName", "personalEmail.address"],
                              **({"auth": {"type": "none"}} | dest))


# --- validate -----------------------------------------------------------------------------


def test_validate_good_config_prints_a_summary(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml")
    result = invoke("validate", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert "valid (2 segment(s), 1 destination(s), 1 dataflow(s)" in result.stdout


def test_validate_broken_config_exits_2_listing_field_paths(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({
        "segments": [{"id": "seg-a"}],
        "destinations": [
            {"name": "crm", "endpoint": "ftp://crm.example.com/hook", "auth": {"type": "none"}},
            {"name": "erp", "endpoint": "https://erp.example.com/hook",
             "auth": {"type": "oauth2_password", "token_url": "not a url", "client_id": "c",
                      "client_secret": "s", "username": "u", "password": "p"},
             "rate_limit": 20000},
        ],
        "dataflows": [{"name": "f", "destination": "nope", "segments": ["seg-z"]}],
    }), encoding="utf-8")
    result = invoke("validate", "-c", str(config))
    assert result.exit_code == 2
    for path in ("destinations[0].endpoint", "destinations[1].auth.token_url",
                 "destinations[1].rate_limit", "dataflows[0].destination",
                 "dataflows[0].segments[0]"):
        assert path in result.stderr, (path, result.stderr)
    assert "valid (" not in result.stdout


def test_every_command_validates_the_config_first(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("destinations: [{name: x}]\n", encoding="utf-8")
    for args in (["ingest", "-c", str(config), "-"], ["status", "-c", str(config)],
                 ["test-send", "-c", str(config), "--destination", "x"],
                 ["serve", "-c", str(config)]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "destinations[0].endpoint" in result.stderr


# --- ingest -------------------------------------------------------------------------------


def test_ingest_rejects_bad_lines_with_numbers_and_keeps_the_good(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml")
    data = tmp_path / "fragments.ndjson"
    lines = [
        {"profileId": "p-1", "attributes": {"person": {"name": {"firstName": "John"}}},
         "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}},
        "{not json",
        {"profileId": "p-2", "identityMap": {"ecid": [{"id": "42"}]}},
        {"attributes": {"a": 1}},  # no profileId
        {"profileId": "p-3", "segmentMembership": {"ups": {"seg-a": {"status": "bogus"}}}},
        {"profileId": "p-1", "attributes": {"personalEmail": {"address": "j@x.com"}}},
    ]
    data.write_bytes(b"\n".join(x.encode() if isinstance(x, str) else orjson.dumps(x)
                                for x in lines) + b"\n")
    result = invoke("ingest", "-c", str(config), str(data))
    assert result.exit_code == 1, result.output
    rejected = [line for line in result.stderr.splitlines() if line.startswith("rejected")]
    assert len(rejected) == 3, result.stderr
    for number in (2, 4, 5):
        assert any(f"{data}:{number}:" in line for line in rejected), (number, rejected)
    assert "ingested 3, rejected 3" in result.stdout
    db = open_store(tmp_path / "relay.db")
    try:
        assert db.profile_count() == 2
        p1 = db.load_profiles(["p-1"])["p-1"]
        assert p1.attributes == {"person": {"name": {"firstName": "John"}},
                                 "personalEmail": {"address": "j@x.com"}}
    finally:
        db.close()


def test_ingest_all_good_exits_0(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml")
    data = tmp_path / "ok.ndjson"
    data.write_bytes(orjson.dumps({"profileId": "p-1"}) + b"\n")
    result = invoke("ingest", "-c", str(config), str(data))
    assert result.exit_code == 0, result.output
    assert "ingested 1, rejected 0" in result.stdout


# --- receiver -----------------------------------------------------------------------------


EXPORT = {"person": {"name": {"firstName": "John"}},
          "segmentMembership": {"ups": {"seg-a": {"status": "realized"},
                                        "seg-b": {"status": "exited"}}},
          "identityMap": {"ecid": [{"id": "1457500653634928"}], "email": [{"id": "j@x.com"}]}}


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=orjson.dumps(body), headers=headers or {}) as resp:
        await resp.read()
        return resp.status


async def test_receiver_records_requests_without_authorization(tmp_path: Path) -> None:
    record = tmp_path / "received.ndjson"
    echo = tmp_path / "echo.txt"
    with echo.open("w") as fh:
        async with Receiver(record=record, echo=fh) as receiver:
            status = await post(f"{receiver.base_url}/any/path?x=1", EXPORT, {
                "Authorization": "Bearer s3cret-token", "Idempotency-Key": "key-1",
                "X-Relay-Sequence": "7"})
            assert status == 200
            assert await post(f"{receiver.base_url}/", {"profile": 2}) == 200
    lines = [orjson.loads(x) for x in record.read_bytes().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["path"] == "/any/path" and first["query"] == {"x": "1"}
    assert first["body"] == EXPORT and first["status"] == 200
    assert first["headers"]["Idempotency-Key"] == "key-1"
    assert not any(k.lower() == "authorization" for k in first["headers"])
    assert b"s3cret-token" not in record.read_bytes()
    printed = echo.read_text()
    assert "s3cret-token" not in printed
    line = printed.splitlines()[0]
    for part in ("POST /any/path -> 200", "ecid:1457500653634928", "seg-a:realized",
                 "seg-b:exited", "Idempotency-Key key-1", "X-Relay-Sequence 7"):
        assert part in line, (part, line)


def test_receiver_summaries() -> None:
    assert first_identity(EXPORT) == "ecid:1457500653634928"
    assert first_identity({"identityMap": {}}) == "-"
    assert segment_summary(EXPORT) == "seg-a:realized,seg-b:exited"
    assert segment_summary("not json") == "-"


async def test_receiver_answers_the_status_it_is_told(tmp_path: Path) -> None:
    async with Receiver(status=503, record=tmp_path / "r.ndjson") as receiver:
        assert await post(receiver.base_url, EXPORT) == 503
        assert await post(receiver.base_url, EXPORT) == 503
        assert [r["status"] for r in receiver.requests] == [503, 503]
        async with aiohttp.ClientSession() as session, session.get(receiver.base_url) as resp:
            assert resp.status == 405  # POST only


async def test_receiver_fail_rate(tmp_path: Path) -> None:
    async with Receiver(fail_rate=1.0) as always:
        assert {await post(always.base_url, {}) for _ in range(5)} == {500}
    async with Receiver(fail_rate=0.5, seed=3) as half:
        statuses = [await post(half.base_url, {}) for _ in range(60)]
    assert set(statuses) == {200, 500}
    assert 10 < statuses.count(500) < 50
    assert [r["status"] for r in half.requests] == statuses


def test_receiver_command_records_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    record = tmp_path / "r.ndjson"
    proc = subprocess.Popen([str(RELAY), "receiver", "--port", "0", "--status", "202",
                             "--record", str(record)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "receiver listening on http://127.0.0.1:" in ready, ready
        url = ready.split(" on ", 1)[1].split()[0]
        assert asyncio.run(post(url + "/hook", EXPORT)) == 202
        request_line = proc.stdout.readline()
        assert "-> 202" in request_line and "ecid:1457500653634928" in request_line
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errors
    assert "Traceback" not in errors
    assert "receiver stopped after 1 request(s)" in out
    assert orjson.loads(record.read_bytes().splitlines()[0])["status"] == 202


def test_receiver_command_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = invoke("receiver", "--port", str(port), "--record", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# --- test-send ----------------------------------------------------------------------------


async def run_test_send(*args: str) -> Any:
    """The CLI runs its own event loop, so it runs in a thread beside the test's receiver."""
    return await asyncio.to_thread(invoke, "test-send", *args)


async def test_test_send_delivers_a_sample_through_the_real_sender(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        config = write_config(
            tmp_path / "relay.yaml", f"{receiver.base_url}/hook",
            auth={"type": "bearer", "token": "tok-very-secret"},
            headers="X-Api-Key:key-very-secret,X-Team:growth",
            query_parameters="source=relay&api_key=qs-very-secret",
            include_segment_names=True,
            signing_secret="whsec_" + "c2lnbmluZy1rZXktZm9yLXRlc3Rz")
        result = await run_test_send("-c", str(config), "--destination", "crm")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"POST {receiver.base_url}/hook?source=relay&api_key=***" in out
    assert "status 200, latency" in out and "ms" in out
    assert '{"received": true}' in out
    assert "Authorization: Bearer ***" in out and "X-Api-Key: ***" in out
    assert "X-Team: growth" in out and "webhook-signature: v1,***" in out
    for secret in ("tok-very-secret", "key-very-secret", "qs-very-secret",
                   "c2lnbmluZy1rZXktZm9yLXRlc3Rz"):
        assert secret not in result.output
    [request] = receiver.requests
    body = request["body"]
    assert body["person"]["name"]["firstName"] == "Jane"
    assert body["personalEmail"]["address"] == "jane.doe@example.com"
    assert set(body["segmentMembership"]["ups"]) == {"seg-a"}
    assert body["segmentMembership"]["ups"]["seg-a"]["status"] == "realized"
    assert body["segmentMembership"]["ups"]["seg-a"]["name"] == "First name equals John"
    assert "ecid" in body["identityMap"]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["x-api-key"] == "key-very-secret"
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
    assert request["query"] == {"source": "relay", "api_key": "qs-very-secret"}


async def test_test_send_reports_a_failing_status(tmp_path: Path) -> None:
    async with Receiver(status=500) as receiver:
        config = write_config(tmp_path / "relay.yaml", f"{receiver.base_url}/hook")
        result = await run_test_send("-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "status 500" in result.stdout
    assert "failed: status 500" in result.stderr
    assert "response body" in result.stdout


async def test_test_send_classifies_auth_refusals(tmp_path: Path) -> None:
    async with Receiver(status=401) as receiver:
        config = write_config(tmp_path / "relay.yaml", f"{receiver.base_url}/hook",
                              auth={"type": "bearer", "token": "tok-very-secret"})
        result = await run_test_send("-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "failed: auth: endpoint answered 401" in result.stderr
    assert "tok-very-secret" not in result.output


def test_test_send_connection_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", f"http://127.0.0.1:{free_port()}/hook")
    result = invoke("test-send", "-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "status no response" in result.stdout
    assert "failed: connection refused" in result.stderr


def test_test_send_dns_failure(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", "http://no-such-host.invalid/hook")
    result = invoke("test-send", "-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "failed: DNS failure" in result.stderr


def test_test_send_token_endpoint_down(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", "http://127.0.0.1:9/hook", auth={
        "type": "oauth2_client_credentials", "token_url": f"http://127.0.0.1:{free_port()}/token",
        "client_id": "relay", "client_secret": "cs-very-secret"})
    result = invoke("test-send", "-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "failed: auth: token endpoint failed (connection refused)" in result.stderr
    assert "Bearer *** (token from 127.0.0.1/token, client_credentials grant)" in result.stdout
    assert "cs-very-secret" not in result.output


async def test_test_send_timeout(tmp_path: Path) -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        config = write_config(tmp_path / "relay.yaml", f"http://127.0.0.1:{port}/hook",
                              timeout_seconds=0.5)
        started = time.monotonic()
        result = await run_test_send("-c", str(config), "--destination", "crm")
    assert result.exit_code == 1
    assert "failed: timeout" in result.stderr
    assert time.monotonic() - started < 10


def test_test_send_unknown_destination(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml")
    result = invoke("test-send", "-c", str(config), "--destination", "nope")
    assert result.exit_code == 2
    assert "no destination named 'nope'" in result.stderr


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("validate", "ingest", "stream", "backfill", "replay", "status",
                    "test-send", "receiver", "serve", "demo"):
        assert command in result.stdout


async def test_test_send_tls_certificate_problems(tmp_path: Path) -> None:
    from testkit.servers import Endpoint, self_signed_cert, server_ssl_context

    cert, key = self_signed_cert(tmp_path)
    async with Endpoint(ssl_context=server_ssl_context(cert, key)) as endpoint:
        untrusted = write_config(tmp_path / "untrusted.yaml", endpoint.url)
        result = await run_test_send("-c", str(untrusted), "--destination", "crm")
        assert result.exit_code == 1
        assert "failed: TLS/certificate" in result.stderr
        assert "ca_bundle" in result.stderr
        trusted = write_config(tmp_path / "trusted.yaml", endpoint.url, ca_bundle=str(cert))
        result = await run_test_send("-c", str(trusted), "--destination", "crm")
        assert result.exit_code == 0, result.output
        assert "status 200" in result.stdout


async def test_test_send_with_oauth_client_credentials(tmp_path: Path) -> None:
    from testkit.servers import TokenServer

    async with TokenServer(client_auth="basic") as tokens, Receiver() as receiver:
        auth = {"type": "oauth2_client_credentials", "token_url": tokens.token_url,
                "client_id": tokens.client_id, "client_secret": tokens.client_secret,
                "credentials_type": "basic_authorization"}
        config = write_config(tmp_path / "ok.yaml", f"{receiver.base_url}/hook", auth=auth)
        result = await run_test_send("-c", str(config), "--destination", "crm")
        assert result.exit_code == 0, result.output
        assert tokens.grants() == ["client_credentials"]

        wrong = write_config(tmp_path / "wrong.yaml", f"{receiver.base_url}/hook",
                             auth={**auth, "client_secret": "not-the-secret"})
        result = await run_test_send("-c", str(wrong), "--destination", "crm")
        assert result.exit_code == 1
        assert "failed: auth: token endpoint failed" in result.stderr
        assert "401" in result.stderr
        assert "not-the-secret" not in result.output and tokens.client_secret not in result.output
    assert len(receiver.requests) == 1


def test_shard_group_numbers_out_of_range_exit_2_saying_what_is_allowed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "relay.yaml")
    for args, message in ((["stream", "--group", "4", "--groups", "4"], "group 4 of 4: want 0 to 3"),
                          (["stream", "--groups", "300"], "groups 300: want 1 to 256"),
                          (["supervise", "--groups", "0"], "groups 0: want 1 to 256")):
        result = invoke(*args, "-c", str(cfg))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)

"""Secrets stay secret: after real runs with every auth type (delivered, failing and
refused), no secret is in the logs, the database, the failed store, the Prefect
artifacts or any error text."""

from __future__ import annotations

import logging

import pytest
from prefect.client.orchestration import get_client

from config import ConfigError, load_config
from flows.replay import replay_flow
from flows.stream import stream_flow
from testkit.procs import write_config
from tests.relay_fixtures import FLOW, fragment, ingest, store

pytestmark = pytest.mark.prefect

SIGNING = "whsec_bXktc2lnbmluZy1rZXktdmFsdWUtMTIz"
AUTHS = {
    "bearer": {"type": "bearer", "token": "${T_TOKEN}"},
    "oauth2_password": {"type": "oauth2_password", "token_url": "TOKEN_URL",
                        "client_id": "relay-client", "client_secret": "${T_CLIENT_SECRET}",
                        "username": "relay-user", "password": "${T_PASSWORD}"},
    "client_credentials_body": {"type": "oauth2_client_credentials", "token_url": "TOKEN_URL",
                                "client_id": "relay-client", "client_secret": "${T_CLIENT_SECRET}",
                                "credentials_type": "body_form_encoded"},
    "client_credentials_basic": {"type": "oauth2_client_credentials", "token_url": "TOKEN_URL",
                                 "client_id": "relay-client",
                                 "client_secret": "${T_CLIENT_SECRET}",
                                 "credentials_type": "basic_authorization"},
}


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """Every test here runs flows on the session's Prefect harness."""


async def _artifact_text() -> str:
    async with get_client() as client:
        artifacts = await client.read_artifacts()
    return "\n".join(str(a.data) + str(a.description) for a in artifacts)


@pytest.mark.parametrize("kind", list(AUTHS))
async def test_no_secret_anywhere_after_runs(kind, tmp_path, endpoint, token_server, monkeypatch,
                                             caplog):
    bearer = "bearer-s3cret-token-value"
    secrets = [bearer, token_server.client_secret, token_server.password,
               SIGNING.removeprefix("whsec_")]
    monkeypatch.setenv("T_TOKEN", bearer)
    monkeypatch.setenv("T_CLIENT_SECRET", token_server.client_secret)
    monkeypatch.setenv("T_PASSWORD", token_server.password)
    auth = {k: (token_server.token_url if v == "TOKEN_URL" else v) for k, v in AUTHS[kind].items()}
    caplog.set_level(logging.DEBUG)
    config, db = store(tmp_path, endpoint.url, auth=auth, signing_secret=SIGNING)
    config_path = str(tmp_path / "config.yaml")
    ingest(db, config, fragment("p-1"), fragment("p-2"), fragment("p-3"))
    # 1. delivered; 2. the endpoint refuses every token (401) -> failed store;
    # 3. the token server fails -> failed store; 4. replay
    if kind != "bearer":
        endpoint.expect_bearer = token_server.issued
    await stream_flow(config_path, once=True)
    assert len(endpoint.requests) == 3
    endpoint.always(401, {"X-Echo": bearer})
    ingest(db, config, fragment("p-1", "B"))
    await stream_flow(config_path, once=True, return_state=True)  # Failed: one refused
    endpoint.reset()
    token_server.revoke_all()
    token_server.fail(20, 500)
    ingest(db, config, fragment("p-2", "C"))
    await stream_flow(config_path, once=True, return_state=True)
    failed = list(db.db.query("SELECT * FROM failed_requests"))
    # a bearer token needs no token server, so its third change is delivered
    assert len(failed) == (1 if kind == "bearer" else 2)
    assert all(r["last_error"] for r in failed)
    await replay_flow(config_path, FLOW, return_state=True)

    db.db.conn.execute("PRAGMA wal_checkpoint(FULL)")
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    texts = {"logs": caplog.text, "artifacts": await _artifact_text(),
             "failed store": repr(failed)}
    for secret in secrets:
        assert secret.encode() not in stored, f"{kind}: a secret is in the database"
        for where, text in texts.items():
            assert secret not in text, f"{kind}: a secret is in the {where}"


def test_config_errors_never_echo_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("T_TOKEN", "")
    path = write_config(tmp_path, "ftp://x/hook",
                        auth={"type": "oauth2_password", "token_url": "nope",
                              "client_id": "c", "client_secret": "inline-s3cret-value",
                              "username": "u", "password": "inline-passw0rd-value"},
                        signing_secret="whsec_not base64 inline-sign-s3cret")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "destinations[0].signing_secret" in text and "destinations[0].auth.token_url" in text
    for secret in ("inline-s3cret-value", "inline-passw0rd-value", "inline-sign-s3cret"):
        assert secret not in text


def test_loaded_config_does_not_show_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("T_TOKEN", "env-s3cret-token")
    config = load_config(write_config(tmp_path, "https://example.com/hook",
                                      auth={"type": "bearer", "token": "${T_TOKEN}"}))
    assert config.destination("crm").auth.token.get_secret_value() == "env-s3cret-token"
    for text in (repr(config), str(config), config.model_dump_json()):
        assert "env-s3cret-token" not in text

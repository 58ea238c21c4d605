"""TLS, proxies and HTTP options, against real servers on loopback: mutual TLS with
certificates made in the test, a recording forward proxy (environment variables and the
destination's `proxy`), redirects that are never followed, PUT/PATCH and gzip bodies, and
the config checks `validate` makes for them."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app
from config import DEFAULT_REDELIVER_AFTER, ConfigError, Destination, load_config
from destinations.outcome import Outcome
from destinations.sender import Sender, gzip_body
from tasks import pipeline
from testkit.procs import FLOW, free_port, write_config
from testkit.proxy import ForwardProxy
from testkit.servers import Endpoint, TokenServer, verify_signature
from testkit.tls import Pki, TlsFront, make_pki
from tests.relay_fixtures import decide, fragment
from tests.relay_fixtures import ingest as relay_ingest
from tests.relay_fixtures import store as relay_store

BODY = b'{"profileId":"p-1","identityMap":{"ecid":[{"id":"1"}]}}'
TOKEN = "bearer-t0ken-value"
PROXY_USER, PROXY_PASSWORD = "relay", "pr0xy-pa55word"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without proxy variables and sets the ones it means."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def mtls(pki: Pki, endpoint: Endpoint) -> AsyncIterator[TlsFront]:
    """A receiver that requires a client certificate signed by ``pki.ca`` (TLS 1.3)."""
    async with TlsFront(pki.server_context(require_client_cert=True), endpoint.port) as front:
        yield front


@pytest.fixture
async def tls_endpoint(pki: Pki) -> AsyncIterator[Endpoint]:
    """An https endpoint whose certificate (127.0.0.1, localhost) is signed by ``pki.ca``."""
    async with Endpoint(ssl_context=pki.server_context()) as server:
        yield server


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy() as server:
        yield server


def dest(url: str, **fields: Any) -> Destination:
    return Destination(name="crm", endpoint=url, timeout_seconds=5, **fields)


def with_cert(pki: Pki, **fields: Any) -> dict[str, Any]:
    return {"ca_bundle": pki.ca, "client_cert": pki.client.cert,
            "client_key": pki.client.key, **fields}


async def send(destination: Destination, body: bytes = BODY, key: str = "exp-1") -> Outcome:
    async with Sender(destination) as sender:
        return await sender.send(body, key)


# -- mutual TLS ----------------------------------------------------------------------------


async def test_mutual_tls_presents_the_client_certificate(
        pki: Pki, mtls: TlsFront, endpoint: Endpoint) -> None:
    outcome = await send(dest(mtls.url(), **with_cert(pki)))
    assert outcome.delivered, outcome.error
    assert mtls.clients == ["relay-client"]
    assert [r.body for r in endpoint.requests] == [BODY]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["tls1.3", "tls1.2"])
async def test_a_server_requiring_a_client_certificate_is_explained(
        pki: Pki, endpoint: Endpoint, version: ssl.TLSVersion) -> None:
    ctx = pki.server_context(require_client_cert=True)
    ctx.maximum_version = version
    async with TlsFront(ctx, endpoint.port) as front:
        outcome = await send(dest(front.url(), ca_bundle=pki.ca))
    assert outcome.kind == "final" and outcome.status is None  # waiting will not fix it
    assert outcome.error is not None
    assert outcome.error.startswith("POST 127.0.0.1/hook: TLS error")
    assert outcome.error.endswith("set client_cert and client_key (mutual TLS)")
    assert front.refused and endpoint.requests == []


async def test_a_client_certificate_from_a_ca_the_server_does_not_trust(
        pki: Pki, mtls: TlsFront, endpoint: Endpoint) -> None:
    outcome = await send(dest(mtls.url(), ca_bundle=pki.ca,
                              client_cert=pki.untrusted_client.cert,
                              client_key=pki.untrusted_client.key))
    assert outcome.kind == "final"
    assert "the server does not trust the client certificate's CA" in (outcome.error or "")
    assert endpoint.requests == []


async def test_an_aiohttp_endpoint_requiring_client_certificates(pki: Pki) -> None:
    """A Python (asyncio) receiver with ``CERT_REQUIRED``: it accepts the relay's client
    certificate and lets nothing through without one."""
    ctx = pki.server_context(require_client_cert=True)
    async with Endpoint(ssl_context=ctx) as server:
        refused = await send(dest(server.url, ca_bundle=pki.ca))
        accepted = await send(dest(server.url, **with_cert(pki)))
    assert not refused.delivered and refused.status is None
    assert accepted.delivered, accepted.error
    assert len(server.requests) == 1


async def test_a_reset_over_tls_without_a_client_certificate_suggests_one() -> None:
    """asyncio servers cut a client that lacks a required certificate without sending the
    TLS alert; the relay then says what a reset over TLS may mean (and only over TLS)."""
    port, stop = _resetting_server()
    try:
        over_tls = await send(dest(f"https://127.0.0.1:{port}/hook"))
        plain = await send(dest(f"http://127.0.0.1:{port}/hook"))
    finally:
        stop()
    assert over_tls.kind == "retryable"  # a reset may also be a restart: retried
    assert over_tls.error == ("POST 127.0.0.1/hook: connection reset by the server; if it "
                              "requires a client certificate, set client_cert and client_key")
    assert plain.error is not None and "client_cert" not in plain.error


def _resetting_server() -> tuple[int, Any]:
    """A TCP server that answers every connection with a reset (RST)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        listener.close()

    return listener.getsockname()[1], stop


async def test_an_unknown_ca_is_explained(pki: Pki, tls_endpoint: Endpoint) -> None:
    unknown = await send(dest(tls_endpoint.url))
    other = await send(dest(tls_endpoint.url, ca_bundle=pki.other_ca))
    for outcome in (unknown, other):
        assert outcome.kind == "final"
        assert outcome.error is not None
        assert "is not signed by a trusted CA; for a private CA, set ca_bundle" in outcome.error
    assert tls_endpoint.requests == []


async def test_a_hostname_mismatch_is_explained(pki: Pki) -> None:
    async with Endpoint(ssl_context=pki.server_context(pair=pki.wrong_name)) as server:
        by_ip = await send(dest(server.url, ca_bundle=pki.ca))
        by_name = await send(dest(server.url.replace("127.0.0.1", "localhost"),
                                  ca_bundle=pki.ca))
    assert by_ip.kind == by_name.kind == "final"
    assert "certificate is not valid for '127.0.0.1'. (hostname mismatch)" in (by_ip.error or "")
    assert "not valid for 'localhost'. (hostname mismatch)" in (by_name.error or "")
    assert server.requests == []


async def test_the_certificate_names_both_loopback_hosts(pki: Pki, tls_endpoint: Endpoint) -> None:
    outcome = await send(dest(tls_endpoint.url.replace("127.0.0.1", "localhost"),
                              ca_bundle=pki.ca))
    assert outcome.delivered, outcome.error


async def test_test_send_explains_a_missing_client_certificate(
        pki: Pki, mtls: TlsFront, endpoint: Endpoint, tmp_path: Path) -> None:
    """The real CLI, with the certificate files written relative to the config file."""
    rel = {name: os.path.relpath(path, tmp_path) for name, path in
           (("ca_bundle", pki.ca), ("client_cert", pki.client.cert),
            ("client_key", pki.client.key))}
    without = write_config(tmp_path, mtls.url(), file="without.yaml", ca_bundle=rel["ca_bundle"])
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["test-send", "-c", str(without), "--destination", "crm"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line]
    assert lines == ["failed: TLS/certificate: POST 127.0.0.1/hook: TLS error: the server "
                     "requires a client certificate; set client_cert and client_key (mutual TLS)"]

    good = write_config(tmp_path, mtls.url(), file="with.yaml", **rel)
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["test-send", "-c", str(good), "--destination", "crm"])
    assert result.exit_code == 0, result.output
    assert "status 200" in result.stdout
    assert mtls.clients == ["relay-client"] and len(endpoint.requests) == 1


async def test_test_send_shows_and_sends_put_gzip_through_the_proxy(
        proxy: ForwardProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``test-send --dry-run`` shows the method, the gzip header and the proxy; ``test-send``
    then sends exactly that, through the proxy."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with Endpoint(decode_bodies=False) as raw:
        config = write_config(tmp_path, raw.url, method="PUT", compression="gzip")
        dry = CliRunner().invoke(app, ["test-send", "-c", str(config), "--destination", "crm",
                                       "--dry-run"])
        assert dry.exit_code == 0, dry.output
        head, _, shown = dry.stdout.partition("\n\n")
        body = shown.removesuffix("\n").encode()
        lines = head.splitlines()
        assert lines[0] == f"PUT {raw.url}"
        assert "Content-Encoding: gzip" in lines
        assert f"Content-Length: {len(gzip_body(body))}" in lines  # the compressed size
        assert f"via proxy 127.0.0.1:{proxy.port}, from HTTP_PROXY" in dry.stderr
        assert "before gzip compression" in dry.stderr
        assert raw.requests == [] and proxy.requests == []

        sent = await asyncio.to_thread(CliRunner().invoke, app,
                                       ["test-send", "-c", str(config), "--destination", "crm"])
    assert sent.exit_code == 0, sent.output
    assert sent.stdout.splitlines()[:2] == [
        f"PUT {raw.url}", f"  (via proxy 127.0.0.1:{proxy.port}, from HTTP_PROXY)"]
    [request] = raw.requests
    assert (request.method, request.headers["Content-Encoding"]) == ("PUT", "gzip")
    # the same sample (its lastQualificationTime is the time of sending)
    assert orjson.loads(gzip.decompress(request.body)).keys() == orjson.loads(body).keys()
    assert [(r.method, r.target) for r in proxy.requests] == [("PUT", raw.url)]


# -- proxies -------------------------------------------------------------------------------


async def test_https_proxy_from_the_environment_tunnels_to_the_endpoint(
        pki: Pki, tls_endpoint: Endpoint, proxy: ForwardProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    outcome = await send(dest(tls_endpoint.url, ca_bundle=pki.ca,
                              auth={"type": "bearer", "token": TOKEN}))
    assert outcome.delivered, outcome.error
    assert [(r.method, r.target) for r in proxy.requests] == [
        ("CONNECT", f"127.0.0.1:{tls_endpoint.port}")]
    assert "authorization" not in proxy.requests[0].headers  # the token stays in the tunnel
    assert tls_endpoint.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_http_proxy_from_the_environment_forwards_plain_requests(
        endpoint: Endpoint, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # for https URLs only: unused
    outcome = await send(dest(endpoint.url, query_parameters="p=1"))
    assert outcome.delivered, outcome.error
    assert [(r.method, r.target, r.body) for r in proxy.requests] == [
        ("POST", f"{endpoint.url}?p=1", BODY)]
    assert [r.body for r in endpoint.requests] == [BODY]


async def test_no_proxy_bypasses_the_environment_proxy(
        endpoint: Endpoint, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
    outcome = await send(dest(endpoint.url))
    assert outcome.delivered, outcome.error
    assert proxy.requests == [] and len(endpoint.requests) == 1


async def test_an_environment_proxy_of_another_scheme_is_ignored_with_a_warning(
        endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("http_proxy", f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:1080")
    outcome = await send(dest(endpoint.url))
    assert outcome.delivered, outcome.error  # directly, as aiohttp itself would
    assert "http_proxy is not an http(s) proxy URL; connecting to 127.0.0.1 directly" in caplog.text
    assert PROXY_PASSWORD not in caplog.text


async def test_the_destination_proxy_overrides_the_environment(
        endpoint: Endpoint, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    async with ForwardProxy() as from_env:
        monkeypatch.setenv("HTTP_PROXY", from_env.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the destination's proxy overrides this too
        outcome = await send(dest(endpoint.url, proxy=proxy.url))
    assert outcome.delivered, outcome.error
    assert proxy.targets == [endpoint.url] and from_env.requests == []


async def test_token_requests_follow_their_own_url_through_the_proxy_rules(
        endpoint: Endpoint, token_server: TokenServer, proxy: ForwardProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``no_proxy`` is read per URL: here the token URL is listed, the endpoint is not."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    token_url = token_server.token_url.replace("127.0.0.1", "localhost")
    auth = {"type": "oauth2_client_credentials", "token_url": token_url,
            "client_id": token_server.client_id, "client_secret": token_server.client_secret}
    endpoint.expect_bearer = token_server.issued
    outcome = await send(dest(endpoint.url, auth=auth))
    assert outcome.delivered, outcome.error
    assert token_server.count == 1
    assert proxy.targets == [endpoint.url]  # the endpoint through the proxy, the token direct


async def test_proxy_credentials_reach_the_proxy_and_no_error_text(
        pki: Pki, tls_endpoint: Endpoint) -> None:
    async with ForwardProxy(credentials=(PROXY_USER, PROXY_PASSWORD)) as guarded:
        good = await send(dest(tls_endpoint.url, ca_bundle=pki.ca,
                               proxy=guarded.url_with_credentials()))
        wrong_url = guarded.url_with_credentials().replace(PROXY_PASSWORD, "wr0ng-pa55word")
        refused = await send(dest(tls_endpoint.url, ca_bundle=pki.ca, proxy=wrong_url))
        plain = await send(dest(f"http://127.0.0.1:{tls_endpoint.port}/hook", proxy=wrong_url))
    assert good.delivered, good.error
    assert "proxy-authorization" in guarded.requests[0].headers
    assert refused.kind == "final" and refused.error == (
        f"POST 127.0.0.1/hook via proxy 127.0.0.1:{guarded.port}: the proxy answered 407 "
        "Proxy Authentication Required to CONNECT; check the proxy's user and password")
    assert plain.kind == "final" and plain.status == 407
    for outcome in (refused, plain):
        assert "pa55word" not in (outcome.error or "")
    assert guarded.refused == 2 and len(tls_endpoint.requests) == 1


async def test_an_https_proxy_is_reached_over_tls(pki: Pki, tls_endpoint: Endpoint) -> None:
    """TLS to the proxy (verified with the same trust: ca_bundle), then TLS through it."""
    async with ForwardProxy(credentials=(PROXY_USER, PROXY_PASSWORD),
                            ssl_context=pki.server_context()) as secure:
        outcome = await send(dest(tls_endpoint.url, ca_bundle=pki.ca,
                                  proxy=secure.url_with_credentials()))
        untrusted = await send(dest(tls_endpoint.url, proxy=secure.url_with_credentials()))
    assert outcome.delivered, outcome.error
    assert secure.targets == [f"127.0.0.1:{tls_endpoint.port}"]
    assert untrusted.kind == "final" and "set ca_bundle" in (untrusted.error or "")
    assert PROXY_PASSWORD not in (untrusted.error or "")
    assert len(tls_endpoint.requests) == 1


async def test_an_unreachable_proxy_is_named_without_its_credentials(endpoint: Endpoint) -> None:
    port = free_port()
    outcome = await send(dest(endpoint.url,
                              proxy=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}"))
    assert outcome.kind == "retryable"
    assert outcome.error == (f"POST 127.0.0.1/hook via proxy 127.0.0.1:{port}: proxy "
                             f"127.0.0.1:{port} unreachable: Connect call failed "
                             f"('127.0.0.1', {port})")
    assert endpoint.requests == []


async def test_a_refusing_proxy_leaves_no_credential_in_the_store_or_the_log(
        pki: Pki, tls_endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Through the real delivery path: the export is failed for good after one attempt (a
    407 does not heal by waiting), with an error that names the proxy by host and port."""
    async with ForwardProxy(credentials=(PROXY_USER, "the-right-one")) as guarded:
        monkeypatch.setenv("PR_TEST_PROXY", guarded.url_with_credentials().replace(
            "the-right-one", PROXY_PASSWORD))
        config, db = relay_store(tmp_path, tls_endpoint.url, ca_bundle=str(pki.ca),
                                 proxy="${PR_TEST_PROXY}")
        relay_ingest(db, config, fragment("p-1"))
        decide(db, config)
        await pipeline.deliver(db, config, config.dataflow(FLOW))
    [(attempts, status, error)] = db.db.execute(
        "SELECT attempts, last_status, last_error FROM failed_requests").fetchall()
    assert (attempts, status) == (1, None)
    assert f"via proxy 127.0.0.1:{guarded.port}: the proxy answered 407" in error
    db.db.conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    assert PROXY_PASSWORD.encode() not in raw and PROXY_PASSWORD not in caplog.text
    assert tls_endpoint.requests == []


async def test_put_and_gzip_through_the_delivery_path(tmp_path: Path) -> None:
    async with Endpoint(decode_bodies=False) as raw:
        config, db = relay_store(tmp_path, raw.url, method="PATCH", compression="gzip")
        relay_ingest(db, config, fragment("p-1"), fragment("p-2"))
        decide(db, config)
        await pipeline.deliver(db, config, config.dataflow(FLOW))
    assert sorted(r.method for r in raw.requests) == ["PATCH", "PATCH"]
    bodies = [orjson.loads(gzip.decompress(r.body)) for r in raw.requests]
    assert sorted(b["person"]["name"]["firstName"] for b in bodies) == ["Ann", "Ann"]
    assert db.pending_count(FLOW) == 0


# -- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_final_and_never_followed(endpoint: Endpoint, status: int) -> None:
    async with Endpoint() as elsewhere:
        endpoint.always(status, {"Location": f"{elsewhere.url}/moved?token={TOKEN}"})
        outcome = await send(dest(endpoint.url, auth={"type": "bearer", "token": TOKEN}))
    assert outcome.kind == "final" and outcome.status == status
    reason = {301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
              308: "Permanent Redirect"}[status]
    assert outcome.error == (f"HTTP {status} {reason}: redirects are not followed "
                             f"(Location: http://127.0.0.1:{elsewhere.port}/hook/moved)")
    assert elsewhere.requests == []  # neither the body nor the Authorization header
    assert len(endpoint.requests) == 1


async def test_a_relative_redirect_names_the_endpoint_host(endpoint: Endpoint) -> None:
    endpoint.always(302, {"Location": "/v2/hook?sig=abc"})
    outcome = await send(dest(endpoint.url))
    assert outcome.error == ("HTTP 302 Found: redirects are not followed "
                             f"(Location: http://127.0.0.1:{endpoint.port}/v2/hook)")


# -- method and compression ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST"])
async def test_the_configured_method_is_used(endpoint: Endpoint, method: str) -> None:
    outcome = await send(dest(endpoint.url, method=method.lower()))
    assert outcome.delivered
    assert [(r.method, r.body) for r in endpoint.requests] == [(method, BODY)]


async def test_gzip_bodies_decode_to_the_same_json_and_the_signature_covers_them() -> None:
    from standardwebhooks.webhooks import Webhook

    async with Endpoint(decode_bodies=False) as raw:
        outcome = await send(dest(raw.url, compression="gzip", method="PUT",
                                  signing_secret=SIGNING_SECRET))
    assert outcome.delivered, outcome.error
    request = raw.requests[0]
    assert request.method == "PUT"
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body != BODY and gzip.decompress(request.body) == BODY
    headers = {k: request.headers[k] for k in ("webhook-id", "webhook-timestamp",
                                               "webhook-signature")}
    # the receiver decodes the body, then verifies: the signature is over the JSON
    Webhook(SIGNING_SECRET).verify(gzip.decompress(request.body), headers)
    assert not verify_signature(SIGNING_SECRET, headers, request.body)  # not the wire bytes


async def test_an_endpoint_that_decodes_gzip_sees_the_json(endpoint: Endpoint) -> None:
    batch = b"".join(BODY + b"\n" for _ in range(50))
    outcome = await send(dest(endpoint.url, compression="gzip"), batch)
    assert outcome.delivered
    assert endpoint.requests[0].body == batch  # aiohttp.web decoded it, as most servers do


async def test_without_compression_the_body_goes_as_it_is() -> None:
    async with Endpoint(decode_bodies=False) as raw:
        assert (await send(dest(raw.url))).delivered
    assert raw.requests[0].body == BODY
    assert "Content-Encoding" not in raw.requests[0].headers


async def test_a_413_with_gzip_gives_both_sizes(endpoint: Endpoint) -> None:
    endpoint.always(413)
    body = b"[" + b",".join([BODY] * 200) + b"]"
    outcome = await send(dest(endpoint.url, compression="gzip"), body)
    compressed = len(gzip.compress(body))
    assert outcome.kind == "final" and outcome.error is not None
    assert outcome.error.startswith("HTTP 413 Request Entity Too Large (request body of ")
    assert outcome.error.endswith(f" bytes gzip-compressed, {len(body):,} before)")
    sent = int(outcome.error.split("request body of ")[1].split(" ")[0].replace(",", ""))
    assert abs(sent - compressed) < 32 and sent < len(body) / 10


# -- config ------------------------------------------------------------------------------------


def validate(tmp_path: Path, **fields: Any) -> tuple[int, str]:
    """``profile-relay validate`` on a config whose one destination has ``fields``."""
    doc = {"segments": [{"id": "seg-a"}],
           "destinations": [{"name": "crm", "endpoint": "https://crm.example.com/hook",
                             **fields}],
           "dataflows": [{"name": "f", "destination": "crm", "segments": ["seg-a"],
                          "attributes": ["personalEmail.address"]}]}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", "-c", str(path)])
    return result.exit_code, result.output


def load(tmp_path: Path, **fields: Any) -> Destination:
    code, output = validate(tmp_path, **fields)
    assert code == 0, output
    return load_config(tmp_path / "relay.yaml").destinations[0]


def test_defaults_of_the_new_destination_fields(tmp_path: Path) -> None:
    d = load(tmp_path)
    assert (d.method, d.compression, d.proxy, d.client_cert, d.client_key) == (
        "POST", "none", None, None, None)
    assert d.redeliver_after == list(DEFAULT_REDELIVER_AFTER) == [60, 300, 1800, 7200,
                                                                  18000, 36000]
    assert (d.pause_after_failures, d.probe_seconds) == (50, 30)


def test_redelivery_and_breaker_fields_load(tmp_path: Path) -> None:
    d = load(tmp_path, redeliver_after=[], pause_after_failures=1, probe_seconds=3600)
    assert d.redeliver_after == [] and d.pause_after_failures == 1 and d.probe_seconds == 3600
    assert load(tmp_path, redeliver_after=[0.5] * 20).redeliver_after == [0.5] * 20


@pytest.mark.parametrize(("fields", "expected"), [
    ({"redeliver_after": [60, 0]}, "destinations[0].redeliver_after[1]: Input should be greater than 0"),
    ({"redeliver_after": [-5]}, "destinations[0].redeliver_after[0]: Input should be greater than 0"),
    ({"redeliver_after": [float("inf")]}, "destinations[0].redeliver_after[0]: Input should be a finite number"),
    ({"redeliver_after": [60] * 21}, "destinations[0].redeliver_after: List should have at most 20 items"),
    ({"redeliver_after": 60}, "destinations[0].redeliver_after: Input should be a valid list"),
    ({"pause_after_failures": 0}, "destinations[0].pause_after_failures: Input should be greater than or equal to 1"),
    ({"probe_seconds": 0}, "destinations[0].probe_seconds: Input should be greater than 0"),
    ({"probe_seconds": 3601}, "destinations[0].probe_seconds: Input should be less than or equal to 3600"),
    ({"method": "GET"}, "destinations[0].method: Input should be 'POST', 'PUT' or 'PATCH'"),
    ({"compression": "br"}, "destinations[0].compression: Input should be 'none' or 'gzip'"),
    ({"proxy": "socks5://proxy.example.com:1080"}, "destinations[0].proxy: proxy must be an http(s) URL, got scheme 'socks5'"),
    ({"proxy": "http://proxy.example.com:3128/path"}, "destinations[0].proxy: proxy must be scheme://[user:password@]host:port, without a path or query"),
    ({"proxy": "http://proxy.example.com:99999"}, "destinations[0].proxy: proxy has an invalid port"),
    ({"headers": "Content-Encoding:gzip"}, "destinations[0].headers: header 'Content-Encoding' is set by profile-relay itself"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_bad_values_name_the_field(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    code, output = validate(tmp_path, **fields)
    assert code == 2
    assert expected in output


def test_a_proxy_password_is_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inline = f"http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.example.com:3128"
    code, output = validate(tmp_path, proxy=inline)
    assert code == 0
    assert "warning: destinations[0].proxy is written inline" in output
    assert PROXY_PASSWORD not in output
    config = load_config(tmp_path / "relay.yaml")
    for text in (repr(config), str(config), config.model_dump_json()):
        assert PROXY_PASSWORD not in text
    monkeypatch.setenv("PR_TEST_PROXY", inline)
    code, output = validate(tmp_path, proxy="${PR_TEST_PROXY}")
    assert code == 0 and "warning" not in output
    assert load_config(tmp_path / "relay.yaml").destinations[0].proxy.get_secret_value() == inline
    code, output = validate(tmp_path, proxy=inline.replace("http:", "ftp:"))
    assert code == 2 and PROXY_PASSWORD not in output


def test_client_certificate_files_are_checked(tmp_path: Path, pki: Pki) -> None:
    cert, key = str(pki.client.cert), str(pki.client.key)
    cases = [
        ({"client_cert": cert}, "destinations[0].client_key: client_cert is given without "
                                "client_key: give both or neither"),
        ({"client_key": key}, "destinations[0].client_key: client_key is given without "
                              "client_cert: give both or neither"),
        ({"client_cert": str(tmp_path / "nope.pem"), "client_key": key},
         f"destinations[0].client_cert: no such file: {tmp_path / 'nope.pem'}"),
        ({"client_cert": cert, "client_key": "missing.key"},
         f"destinations[0].client_key: no such file: {tmp_path / 'missing.key'}"),
        ({"client_cert": cert, "client_key": str(pki.stray_key)},
         f"destinations[0].client_key: the key in {pki.stray_key} does not match the "
         f"certificate in client_cert ({cert})"),
        ({"client_cert": key, "client_key": key},
         "destinations[0].client_cert: no PEM certificate could be read from"),
        ({"client_cert": cert, "client_key": cert},
         "destinations[0].client_key: no PEM private key for client_cert could be read"),
        ({"ca_bundle": "private-ca.pem"},
         f"destinations[0].ca_bundle: no such file: {tmp_path / 'private-ca.pem'}"),
    ]
    for fields, expected in cases:
        code, output = validate(tmp_path, **fields)
        assert code == 2, fields
        assert expected in output, (fields, output)


def test_an_encrypted_client_key_is_refused_without_prompting(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    code, output = validate(tmp_path, client_cert=str(pki.client.cert), client_key=str(locked))
    assert code == 2
    assert f"destinations[0].client_key: {locked} is password-protected" in output


def test_certificate_paths_are_relative_to_the_config_file(
        tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tls").mkdir()
    for src in (pki.ca, pki.client.cert, pki.client.key):
        (tmp_path / "tls" / src.name).write_bytes(src.read_bytes())
    monkeypatch.chdir("/")
    d = load(tmp_path, ca_bundle="tls/ca.pem", client_cert="tls/client.pem",
             client_key="tls/client.key")
    assert (d.ca_bundle, d.client_cert, d.client_key) == (
        tmp_path / "tls/ca.pem", tmp_path / "tls/client.pem", tmp_path / "tls/client.key")


async def test_client_files_gone_after_loading_are_final(
        tmp_path: Path, pki: Pki, endpoint: Endpoint) -> None:
    key = tmp_path / "client.key"
    key.write_bytes(pki.client.key.read_bytes())
    destination = dest(endpoint.url, client_cert=pki.client.cert, client_key=key)
    key.unlink()
    outcome = await send(destination)
    assert outcome.kind == "final" and outcome.error is not None
    assert outcome.error.startswith(f"cannot load client_cert {pki.client.cert}, client_key {key}")
    assert endpoint.requests == []


def test_config_error_lists_every_tls_and_proxy_problem_at_once(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"destinations": [
        {"name": "a", "endpoint": "https://a.example.com/hook", "client_cert": str(pki.client.cert)},
        {"name": "b", "endpoint": "https://b.example.com/hook", "proxy": "gopher://p:70",
         "method": "DELETE"}]}), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [field for field, _ in caught.value.problems] == [
        "destinations[0].client_key", "destinations[1].proxy", "destinations[1].method"]


"""The sender, outcome classification, signing and rate limiting, against real loopback servers."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import time
from pathlib import Path
from typing import Any

import pytest

from config import Destination
from destinations.auth import make_provider
from destinations.outcome import Outcome, classify_status, parse_retry_after
from destinations.ratelimit import TokenBucket, rate_limit_for
from destinations.sender import USER_AGENT, Sender, build_url
from destinations.signing import sign
from testkit.servers import (
    Endpoint,
    TokenServer,
    self_signed_cert,
    server_ssl_context,
    verify_signature,
)

BODY = b'{"profileId":"p-1","identityMap":{}}'
SIGNING_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def make_dest(url: str, **fields: Any) -> Destination:
    return Destination(name=fields.pop("name", "crm"), endpoint=url, **fields)


def cc_auth(ts: TokenServer) -> dict[str, Any]:
    return {
        "type": "oauth2_client_credentials",
        "token_url": ts.token_url,
        "client_id": ts.client_id,
        "client_secret": ts.client_secret,
    }


async def send_one(dest: Destination, **kwargs: Any) -> Outcome:
    async with Sender(dest) as sender:
        return await sender.send(BODY, kwargs.pop("key", "exp-1"), **kwargs)


# -- pure parts -----------------------------------------------------------------------------


def test_build_url_appends_and_merges() -> None:
    assert build_url("https://h.example/hook", []) == "https://h.example/hook"
    assert (
        build_url("https://h.example/hook?x=1", [("p1", "v"), ("p2", "a b&c")])
        == "https://h.example/hook?x=1&p1=v&p2=a+b%26c"
    )
    # appended, not replaced: the endpoint's own parameter stays
    assert build_url("https://h.example/hook?x=1", [("x", "2")]) == "https://h.example/hook?x=1&x=2"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (400, "final"),
        (401, "final"),
        (404, "final"),
        (408, "retryable"),
        (429, "retryable"),
        (500, "retryable"),
        (503, "retryable"),
        (599, "retryable"),
        (301, "final"),
        (302, "final"),
        (100, "final"),
    ],
)
def test_classify_status(status: int, kind: str) -> None:
    assert classify_status(status) == kind


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 0 ", now) == 0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after("-3", now) is None
    assert parse_retry_after("soon", now) is None
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now) == 0


def test_user_agent() -> None:
    assert USER_AGENT.startswith("profile-relay/")


# -- Standard Webhooks signing ---------------------------------------------------------------


def test_sign_matches_the_spec_test_vector() -> None:
    """The Standard Webhooks specification's published test vector."""
    headers = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_sign_verifies_independently() -> None:
    now = int(time.time())
    headers = sign(SIGNING_SECRET, "exp-42", now, BODY)
    assert verify_signature(SIGNING_SECRET, headers, BODY, now)
    assert not verify_signature(SIGNING_SECRET, headers, BODY + b" ", now)
    assert not verify_signature(SIGNING_SECRET, {**headers, "webhook-id": "exp-43"}, BODY, now)


def test_sign_verifies_with_standardwebhooks_package() -> None:
    """Receivers verify with the reference library; so do we."""
    from standardwebhooks.webhooks import Webhook

    headers = sign(SIGNING_SECRET, "exp-42", int(time.time()), BODY)
    Webhook(SIGNING_SECRET).verify(BODY, headers)


async def test_signed_requests_verify(endpoint: Endpoint) -> None:
    outcome = await send_one(
        make_dest(endpoint.url, signing_secret=SIGNING_SECRET), key="profile-9:v3"
    )
    assert outcome.delivered
    req = endpoint.requests[0]
    headers = {k: req.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert headers["webhook-id"] == "profile-9:v3"
    assert verify_signature(SIGNING_SECRET, headers, req.body, int(time.time()))


# -- delivery ----------------------------------------------------------------------------


async def test_headers_and_query_on_every_request(endpoint: Endpoint) -> None:
    dest = make_dest(
        endpoint.url + "?x=1",
        headers="h1:v1,X-Api-Key:k-123",
        query_parameters="p1=v&p2=w",
    )
    async with Sender(dest) as sender:
        for i in range(3):
            outcome = await sender.send(BODY, f"exp-{i}", {"X-Relay-Sequence": str(i)})
            assert outcome.kind == "delivered" and outcome.status == 200 and outcome.error is None
            assert outcome.latency_ms > 0
    assert len(endpoint.requests) == 3
    for i, req in enumerate(endpoint.requests):
        assert req.method == "POST"
        assert req.path == "/hook"
        assert req.query == [("x", "1"), ("p1", "v"), ("p2", "w")]
        assert req.body == BODY
        assert req.headers["Content-Type"] == "application/json"
        assert req.headers["User-Agent"] == USER_AGENT
        assert req.headers["Idempotency-Key"] == f"exp-{i}"
        assert req.headers["X-Relay-Sequence"] == str(i)
        assert req.headers["h1"] == "v1"
        assert req.headers["X-Api-Key"] == "k-123"
        assert "Authorization" not in req.headers
        assert "webhook-signature" not in req.headers


async def test_bearer_header(endpoint: Endpoint) -> None:
    endpoint.expect_bearer = {"static-token-1"}
    outcome = await send_one(
        make_dest(endpoint.url, auth={"type": "bearer", "token": "static-token-1"})
    )
    assert outcome.delivered
    assert endpoint.requests[0].headers["Authorization"] == "Bearer static-token-1"


async def test_static_bearer_401_is_final_without_retry(endpoint: Endpoint) -> None:
    endpoint.expect_bearer = {"another-token"}
    outcome = await send_one(
        make_dest(endpoint.url, auth={"type": "bearer", "token": "wrong-token-9"})
    )
    assert outcome.kind == "final" and outcome.status == 401
    assert len(endpoint.requests) == 1
    assert "wrong-token-9" not in (outcome.error or "")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (400, "final"),
        (404, "final"),
        (408, "retryable"),
        (429, "retryable"),
        (500, "retryable"),
        (503, "retryable"),
        (301, "final"),
    ],
)
async def test_status_classification(endpoint: Endpoint, status: int, kind: str) -> None:
    headers = {"Location": endpoint.url + "/elsewhere"} if status == 301 else None
    endpoint.always(status, headers)
    outcome = await send_one(make_dest(endpoint.url))
    assert outcome.kind == kind
    assert outcome.status == status
    assert (outcome.error is None) == (kind == "delivered")
    if outcome.error:
        assert str(status) in outcome.error
    assert len(endpoint.requests) == 1  # redirects are not followed


async def test_retry_after_seconds_and_date(endpoint: Endpoint) -> None:
    endpoint.retry_after("7")
    endpoint.retry_after(email.utils.formatdate(time.time() + 20, usegmt=True), status=503)
    async with Sender(make_dest(endpoint.url)) as sender:
        first = await sender.send(BODY, "k")
        second = await sender.send(BODY, "k")
        third = await sender.send(BODY, "k")
    assert (first.kind, first.status, first.retry_after) == ("retryable", 429, 7)
    assert second.kind == "retryable" and second.status == 503
    assert second.retry_after == pytest.approx(20, abs=2)
    assert third.delivered and third.retry_after is None
    # the same Idempotency-Key on every attempt of one export
    assert {r.headers["Idempotency-Key"] for r in endpoint.requests} == {"k"}


async def test_dropped_connection_is_retryable(endpoint: Endpoint) -> None:
    endpoint.drop(1)
    async with Sender(make_dest(endpoint.url)) as sender:
        dropped = await sender.send(BODY, "k")
        after = await sender.send(BODY, "k")
    assert dropped.kind == "retryable" and dropped.status is None
    assert dropped.error and "closed the connection" in dropped.error
    assert after.delivered


async def test_timeout_is_retryable(endpoint: Endpoint) -> None:
    endpoint.delay = 2.0
    outcome = await send_one(make_dest(endpoint.url, timeout_seconds=0.2))
    assert outcome.kind == "retryable" and outcome.status is None
    assert outcome.error and "timed out" in outcome.error
    assert outcome.latency_ms < 1500


async def test_connection_refused_names_host_and_path_only() -> None:
    async with Endpoint() as gone:
        url = gone.url
    outcome = await send_one(
        make_dest(url + "?api_key=very-secret-key&x=1", query_parameters="token=tok-zzz")
    )
    assert outcome.kind == "retryable"
    assert outcome.error and "cannot connect" in outcome.error
    assert "very-secret-key" not in outcome.error and "tok-zzz" not in outcome.error
    assert "/hook" in outcome.error


async def test_keep_body_returns_the_start_of_the_response(endpoint: Endpoint) -> None:
    endpoint.response_body = b'{"echo":"Bearer static-token-1"}' + b"x" * 2000
    dest = make_dest(endpoint.url, auth={"type": "bearer", "token": "static-token-1"})
    async with Sender(dest) as sender:
        plain = await sender.send(BODY, "k")
        shown = await sender.send(BODY, "k", keep_body=True)
    assert plain.body_start == b""
    assert len(shown.body_start) == 500
    assert shown.body_start.startswith(b'{"echo":"Bearer ***"}')


async def test_connections_are_reused(endpoint: Endpoint) -> None:
    async with Sender(make_dest(endpoint.url)) as sender:
        for _ in range(5):
            assert (await sender.send(BODY, "k")).delivered
    peers = {r.peer for r in endpoint.requests}
    assert len(endpoint.requests) == 5 and len(peers) == 1  # keep-alive: one connection


# -- OAuth through the sender --------------------------------------------------------------


async def test_token_cached_across_concurrent_sends(
    endpoint: Endpoint, token_server: TokenServer
) -> None:
    endpoint.expect_bearer = token_server.issued
    token_server.delay = 0.05
    async with Sender(make_dest(endpoint.url, auth=cc_auth(token_server))) as sender:
        outcomes = await asyncio.gather(*(sender.send(BODY, f"k{i}") for i in range(50)))
    assert all(o.delivered for o in outcomes)
    assert token_server.count == 1
    assert len({r.headers["Authorization"] for r in endpoint.requests}) == 1


async def test_401_once_renews_token_and_delivers(
    endpoint: Endpoint, token_server: TokenServer
) -> None:
    endpoint.expect_bearer = token_server.issued
    async with Sender(make_dest(endpoint.url, auth=cc_auth(token_server))) as sender:
        assert (await sender.send(BODY, "k1")).delivered
        endpoint.unauthorized(1)
        outcome = await sender.send(BODY, "k2")
    assert outcome.delivered and outcome.status == 200
    assert token_server.count == 2  # exactly one extra token call
    assert token_server.grants() == ["client_credentials", "refresh_token"]
    auths = [r.headers["Authorization"] for r in endpoint.requests]
    assert len(auths) == 3 and auths[0] == auths[1] != auths[2]
    assert [r.headers["Idempotency-Key"] for r in endpoint.requests] == ["k1", "k2", "k2"]


async def test_revoked_token_401_under_concurrency_renews_once(
    endpoint: Endpoint, token_server: TokenServer
) -> None:
    endpoint.expect_bearer = token_server.issued
    async with Sender(make_dest(endpoint.url, auth=cc_auth(token_server))) as sender:
        assert (await sender.send(BODY, "warm")).delivered
        token_server.revoke_all()
        outcomes = await asyncio.gather(*(sender.send(BODY, f"k{i}") for i in range(20)))
    assert all(o.delivered for o in outcomes)
    assert token_server.count == 2


async def test_persistent_401_is_final(endpoint: Endpoint, token_server: TokenServer) -> None:
    endpoint.always(401)
    outcome = await send_one(make_dest(endpoint.url, auth=cc_auth(token_server)))
    assert outcome.kind == "final" and outcome.status == 401
    assert len(endpoint.requests) == 2  # the original and one renewed attempt
    assert token_server.count == 2


@pytest.mark.parametrize(
    ("script", "kind"),
    [
        (lambda ts: ts.fail(1, 500), "retryable"),
        (lambda ts: ts.fail(1, 400), "final"),
        (lambda ts: ts.garbage(1), "final"),
    ],
    ids=["500", "400", "garbage"],
)
async def test_auth_errors_become_outcomes(
    endpoint: Endpoint, token_server: TokenServer, script: Any, kind: str
) -> None:
    script(token_server)
    auth = {
        "type": "oauth2_password",
        "token_url": token_server.token_url,
        "client_id": token_server.client_id,
        "client_secret": token_server.client_secret,
        "username": token_server.username,
        "password": token_server.password,
    }
    outcome = await send_one(make_dest(endpoint.url, auth=auth))
    assert outcome.kind == kind and outcome.status is None
    assert outcome.error and "crm" in outcome.error
    assert token_server.client_secret not in outcome.error
    assert token_server.password not in outcome.error
    assert endpoint.requests == []


async def test_sender_uses_given_provider(endpoint: Endpoint) -> None:
    dest = make_dest(endpoint.url)
    provider = make_provider(
        make_dest(endpoint.url, auth={"type": "bearer", "token": "from-provider"})
    )
    async with Sender(dest, provider) as sender:
        assert (await sender.send(BODY, "k")).delivered
    assert endpoint.requests[0].headers["Authorization"] == "Bearer from-provider"


# -- TLS -----------------------------------------------------------------------------------


async def test_tls_verification_on_by_default(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    async with Endpoint(ssl_context=server_ssl_context(cert, key)) as tls:
        refused = await send_one(make_dest(tls.url))
        trusted = await send_one(make_dest(tls.url, ca_bundle=cert))
    assert refused.kind == "final" and refused.status is None
    assert refused.error and "certificate" in refused.error
    assert trusted.delivered
    assert len(tls.requests) == 1


def test_missing_ca_bundle_is_a_config_error(endpoint: Endpoint, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ca_bundle"):
        make_dest(endpoint.url, ca_bundle=tmp_path / "nope.pem")


async def test_ca_bundle_gone_after_loading_is_final(endpoint: Endpoint, tmp_path: Path) -> None:
    bundle = tmp_path / "gone.pem"
    bundle.write_text("")
    dest = make_dest(endpoint.url, ca_bundle=bundle)
    bundle.unlink()
    outcome = await send_one(dest)
    assert outcome.kind == "final" and outcome.error and "ca_bundle" in outcome.error
    assert endpoint.requests == []


# -- rate limiting ----------------------------------------------------------------------------


async def test_token_bucket_never_exceeds_its_rate() -> None:
    """What a user relies on is the ceiling: however many workers ask, no more than
    ``rate`` a second (plus the burst) pass. A busy machine can only make it slower."""
    bucket = TokenBucket(200)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def worker() -> None:
        while True:
            await bucket.acquire()
            times.append(loop.time())

    started = loop.time()
    workers = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.sleep(0.5)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    assert times, "the bucket let nothing through"
    elapsed = times[-1] - started
    assert len(times) <= 200 * elapsed + bucket.burst + 1


async def test_token_bucket_at_10k_per_second() -> None:
    bucket = TokenBucket(10_000)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def worker(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()

    await asyncio.gather(*(worker(250) for _ in range(16)))  # 4,000 acquisitions
    elapsed = loop.time() - started
    # 4,000 at 10,000/s cannot pass in under 0.4 s (less the burst); load only slows it
    assert elapsed >= (4_000 - bucket.burst) / 10_000 * 0.98


def test_rate_limit_for() -> None:
    dest = make_dest("http://127.0.0.1:1/hook", rate_limit=500)
    assert rate_limit_for("flow-a", dest) == 500
    assert rate_limit_for("flow-a", dest, share=0.25) == 125
    assert rate_limit_for("flow-a", make_dest("http://127.0.0.1:1/hook")) == 10_000
    with pytest.raises(ValueError):
        rate_limit_for("flow-a", dest, share=0)

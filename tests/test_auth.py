"""Token providers against a real OAuth 2 token server on loopback."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from config import Destination
from destinations.auth import (
    AuthError,
    BearerProvider,
    NoAuthProvider,
    OAuth2Provider,
    TokenProvider,
    basic_authorization,
    make_provider,
)
from testkit.servers import TokenServer

ODD_ID = "a:b"
ODD_SECRET = "s&c=t%"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


def dest(auth: dict[str, Any], name: str = "crm") -> Destination:
    return Destination(name=name, endpoint="http://127.0.0.1:1/hook", auth=auth)


def password_auth(ts: TokenServer, **extra: Any) -> dict[str, Any]:
    return {
        "type": "oauth2_password",
        "token_url": ts.token_url,
        "client_id": ts.client_id,
        "client_secret": ts.client_secret,
        "username": ts.username,
        "password": ts.password,
        **extra,
    }


def cc_auth(
    ts: TokenServer, credentials_type: str = "body_form_encoded", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "oauth2_client_credentials",
        "token_url": ts.token_url,
        "client_id": ts.client_id,
        "client_secret": ts.client_secret,
        "credentials_type": credentials_type,
        **extra,
    }


async def test_none_and_bearer(session: aiohttp.ClientSession) -> None:
    none = make_provider(dest({"type": "none"}))
    assert isinstance(none, NoAuthProvider)
    assert await none.header(session) is None

    bearer = make_provider(dest({"type": "bearer", "token": "tok-123456"}))
    assert isinstance(bearer, BearerProvider)
    assert await bearer.header(session) == "Bearer tok-123456"
    bearer.invalidate("Bearer tok-123456")  # a static token cannot renew: same header again
    assert await bearer.header(session) == "Bearer tok-123456"


async def test_password_grant_request(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(
        dest(password_auth(token_server, scope="profiles:write", audience="crm"))
    )
    header = await provider.header(session)

    assert token_server.count == 1
    call = token_server.calls[0]
    assert call.status == 200
    assert call.client_auth == "body"
    assert call.authorization is None
    assert call.form == {
        "grant_type": "password",
        "username": token_server.username,
        "password": token_server.password,
        "client_id": token_server.client_id,
        "client_secret": token_server.client_secret,
        "scope": "profiles:write",
        "audience": "crm",
    }
    token = header.removeprefix("Bearer ") if header else None
    assert header and header.startswith("Bearer ") and token in token_server.issued


async def test_client_credentials_in_body(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.client_auth = "body"
    provider = make_provider(dest(cc_auth(token_server)))
    assert await provider.header(session)
    call = token_server.calls[0]
    assert call.client_auth == "body"
    assert call.authorization is None
    assert call.form == {
        "grant_type": "client_credentials",
        "client_id": token_server.client_id,
        "client_secret": token_server.client_secret,
    }


async def test_client_credentials_basic_header_is_urlencoded() -> None:
    """RFC 6749 2.3.1: id and secret are form-urlencoded, then joined and base64-encoded."""
    async with (
        TokenServer(client_id=ODD_ID, client_secret=ODD_SECRET, client_auth="basic") as ts,
        aiohttp.ClientSession() as session,
    ):
        provider = make_provider(dest(cc_auth(ts, "basic_authorization", scope="a b")))
        assert await provider.header(session)
    call = ts.calls[0]
    assert call.status == 200  # the server decoded and accepted the credentials
    assert call.client_auth == "basic"
    assert call.form == {"grant_type": "client_credentials", "scope": "a b"}
    assert call.authorization is not None
    decoded = base64.b64decode(call.authorization.removeprefix("Basic ")).decode()
    assert decoded == "a%3Ab:s%26c%3Dt%25"
    assert basic_authorization(ODD_ID, ODD_SECRET) == call.authorization


async def test_server_refuses_the_other_client_auth_style(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.client_auth = "basic"
    provider = make_provider(dest(cc_auth(token_server, "body_form_encoded")))
    with pytest.raises(AuthError) as err:
        await provider.header(session)
    assert not err.value.retryable
    assert "401" in str(err.value) and "invalid_client" in str(err.value)
    assert err.value.destination == "crm"


async def test_token_cached_across_concurrent_requests(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.delay = 0.05  # let all 50 pile up behind the one request
    provider = make_provider(dest(cc_auth(token_server)))
    headers = await asyncio.gather(*(provider.header(session) for _ in range(50)))
    assert len(set(headers)) == 1
    assert token_server.count == 1


async def test_expiry_renews_with_refresh_token(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.expires_in = 1  # margin min(30 s, 10 %) = 0.1 s: stale after 0.9 s
    provider = make_provider(dest(password_auth(token_server)))
    first = await provider.header(session)
    assert await provider.header(session) == first
    await asyncio.sleep(0.95)
    second = await provider.header(session)
    assert second != first
    assert token_server.grants() == ["password", "refresh_token"]
    refresh = token_server.calls[1]
    assert refresh.status == 200
    # client authentication goes the same way as for the full grant
    assert refresh.client_auth == "body"
    assert refresh.form["client_secret"] == token_server.client_secret
    assert refresh.form["refresh_token"] in token_server.refresh_tokens


async def test_refresh_with_basic_client_auth(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.client_auth = "basic"
    token_server.expires_in = 1
    provider = make_provider(dest(cc_auth(token_server, "basic_authorization")))
    await provider.header(session)
    await asyncio.sleep(0.95)
    await provider.header(session)
    assert token_server.grants() == ["client_credentials", "refresh_token"]
    assert [c.client_auth for c in token_server.calls] == ["basic", "basic"]
    assert "client_secret" not in token_server.calls[1].form


async def test_refused_refresh_falls_back_to_full_grant(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(dest(password_auth(token_server)))
    first = await provider.header(session)
    assert first
    token_server.refuse_refresh = True
    provider.invalidate(first)
    second = await provider.header(session)
    assert second and second != first
    assert token_server.grants() == ["password", "refresh_token", "password"]
    assert [c.status for c in token_server.calls] == [200, 400, 200]


async def test_without_expires_in_cached_until_invalidated(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    token_server.expires_in = None
    token_server.issue_refresh = False
    provider = make_provider(dest(cc_auth(token_server)))
    first = await provider.header(session)
    assert first
    for _ in range(5):
        assert await provider.header(session) == first
    provider.invalidate("Bearer something-stale")  # not ours any more: ignored
    assert await provider.header(session) == first
    provider.invalidate(first)
    assert await provider.header(session) != first
    assert token_server.grants() == ["client_credentials", "client_credentials"]


async def test_expiry_margin_uses_clock(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """expires_in 3600 -> renewed 30 s early; expires_in 100 -> 10 s (10 %) early."""
    now = [1000.0]
    provider = OAuth2Provider(
        "crm",
        token_server.token_url,
        {"grant_type": "client_credentials"},
        token_server.client_id,
        token_server.client_secret,
        clock=lambda: now[0],
    )
    token_server.issue_refresh = False
    first = await provider.header(session)
    now[0] += 3600 - 30 - 0.01
    assert await provider.header(session) == first
    now[0] += 0.02
    assert await provider.header(session) != first
    token_server.expires_in = 100
    provider.invalidate(await provider.header(session) or "")
    third = await provider.header(session)
    now[0] += 89.99
    assert await provider.header(session) == third
    now[0] += 0.02
    assert await provider.header(session) != third


def _secrets(ts: TokenServer) -> list[str]:
    return [ts.client_secret, ts.password]


@pytest.mark.parametrize(
    ("script", "retryable", "phrase"),
    [
        (lambda ts: ts.fail(1, 500), True, "500"),
        (lambda ts: ts.fail(1, 503), True, "503"),
        (lambda ts: ts.fail(1, 400), False, "400"),
        (lambda ts: ts.garbage(1), False, "response was not JSON"),
        (lambda ts: ts.no_token(1), False, "no access_token in response"),
    ],
    ids=["500", "503", "400", "garbage", "no-token"],
)
async def test_token_endpoint_failures(
    token_server: TokenServer,
    session: aiohttp.ClientSession,
    script: Any,
    retryable: bool,
    phrase: str,
) -> None:
    script(token_server)
    provider = make_provider(dest(password_auth(token_server), name="crm-eu"))
    with pytest.raises(AuthError) as err:
        await provider.header(session)
    text = str(err.value)
    assert err.value.retryable is retryable
    assert phrase in text
    assert "crm-eu" in text
    for secret in _secrets(token_server):
        assert secret not in text
    # the next call tries again and succeeds
    assert await provider.header(session)


async def test_token_endpoint_unreachable_is_retryable(session: aiohttp.ClientSession) -> None:
    async with TokenServer() as ts:
        auth = password_auth(ts)
    provider = make_provider(dest(auth))  # the server is gone: connection refused
    with pytest.raises(AuthError) as err:
        await provider.header(session)
    assert err.value.retryable
    assert "cannot connect" in str(err.value)
    assert ts.client_secret not in str(err.value) and ts.password not in str(err.value)


async def test_token_endpoint_timeout_is_retryable(token_server: TokenServer) -> None:
    token_server.delay = 1.0
    provider = make_provider(dest(cc_auth(token_server)))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(AuthError) as err:
            await provider.header(session)
    assert err.value.retryable and "timed out" in str(err.value)


async def test_waiters_share_a_failed_token_request(
    token_server: TokenServer, session: aiohttp.ClientSession
) -> None:
    """While the token endpoint fails, 20 waiting requests cost one token call, not 20."""
    token_server.fail(1, 503)
    token_server.delay = 0.05
    provider = make_provider(dest(cc_auth(token_server)))
    results = await asyncio.gather(
        *(provider.header(session) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, AuthError) and r.retryable for r in results)
    assert token_server.count == 1


async def test_provider_survives_a_new_event_loop(token_server: TokenServer) -> None:
    """Dispatch task retries may run in a fresh loop; the provider's lock must not pin one."""
    provider: TokenProvider = make_provider(dest(cc_auth(token_server)))
    token_server.issue_refresh = False

    async def fetch() -> str | None:
        async with aiohttp.ClientSession() as s:
            return await provider.header(s)

    header = await fetch()
    assert header
    provider.invalidate(header)
    loop_result = await asyncio.get_running_loop().run_in_executor(
        None, lambda: asyncio.run(_fetch_in_new_loop(provider))
    )
    assert loop_result and loop_result != header


async def _fetch_in_new_loop(provider: TokenProvider) -> str | None:
    async with aiohttp.ClientSession() as s:
        # two concurrent callers force the lock to be used in this loop
        a, b = await asyncio.gather(provider.header(s), provider.header(s))
        assert a == b
        return a

"""Token providers: the ``Authorization`` value for each destination, one provider each.

In the spirit of httpx's auth flows, the sender asks the provider for a header before a
request and tells it when the endpoint answered 401 with that header; the provider owns
caching, expiry, refresh and the single in-flight token request. Nothing here ever puts a
secret (client secret, password, token, refresh token) into an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from config import (
    BearerAuth,
    Destination,
    NoAuth,
    OAuth2ClientCredentialsAuth,
    OAuth2PasswordAuth,
)
from destinations.network import Proxy, proxy_for
from destinations.outcome import classify_exception, classify_status, describe_exception, redact

_OAUTH_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_MARGIN_SECONDS = 30.0


class AuthError(Exception):
    """Getting a token failed; ``retryable`` says whether trying again later may help."""

    def __init__(self, destination: str, reason: str, retryable: bool) -> None:
        self.destination = destination
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"destination {destination!r}: {reason}")

    def copy(self) -> AuthError:
        """A fresh instance for another waiter (re-raising one object grows its traceback)."""
        return AuthError(self.destination, self.reason, self.retryable)


RENEW = object()  # ``TokenProvider.cached``: no header to hand; await ``header`` for one


class TokenProvider:
    """Base provider: no Authorization header at all (``auth: {type: none}``)."""

    async def header(self, session: aiohttp.ClientSession) -> str | None:
        """The Authorization value for the next request, or None for no header."""
        return None

    def cached(self) -> str | object | None:
        """``header`` without awaiting, when no token request is needed (a static
        credential, a token still fresh); ``RENEW`` when ``header`` must be awaited. Saves
        a coroutine per request on the sender's hot path."""
        return None

    def invalidate(self, header_value: str) -> None:
        """The endpoint answered 401 to ``header_value``; a static credential cannot renew."""

    def secret_values(self) -> tuple[str, ...]:
        """Every secret this provider holds right now, for redacting text shown to users."""
        return ()


class NoAuthProvider(TokenProvider):
    """``auth: {type: none}``."""


class BearerProvider(TokenProvider):
    """A fixed token from the config: ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._header = f"Bearer {token}"

    async def header(self, session: aiohttp.ClientSession) -> str | None:
        return self._header

    def cached(self) -> str | object | None:
        return self._header

    def secret_values(self) -> tuple[str, ...]:
        return (self._token,)


class OAuth2Provider(TokenProvider):
    """OAuth 2 token endpoint client for the password and client-credentials grants.

    The access token is cached until ``expires_in`` minus a margin (or, without
    ``expires_in``, until a 401). Renewal uses the ``refresh_token`` grant when the server
    issued a refresh token and falls back to the full grant when that is refused. Only one
    token request runs at a time: coroutines that waited for it reuse its result, token or
    error, instead of queueing a request each.
    """

    def __init__(
        self,
        destination: str,
        token_url: str,
        grant: dict[str, str],
        client_id: str,
        client_secret: str,
        *,
        basic_client_auth: bool = False,
        clock: Callable[[], float] = time.monotonic,
        proxy: Proxy | None = None,
        client_cert: bool = False,
    ) -> None:
        self.destination = destination
        self.token_url = token_url
        self._grant = grant  # grant_type and its fields, scope/audience included
        self._client_id = client_id
        self._client_secret = client_secret
        self._basic = basic_client_auth
        self._basic_header = basic_authorization(client_id, client_secret)
        self._clock = clock
        url = URL(token_url)
        self._where = f"{url.host}{url.path}"
        # the token URL's own proxy (no_proxy may list its host but not the endpoint's)
        self._proxy = proxy
        self._proxy_url = proxy.url if proxy is not None else None
        if proxy is not None:
            self._where += f" via proxy {proxy.where}"
        self._client_cert = client_cert if url.scheme == "https" else None

        self._token: str | None = None
        self._header: str | None = None
        self._expires_at: float | None = None  # None: until a 401
        self._refresh_token: str | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._finished = 0
        self._last_error: AuthError | None = None

    # -- the TokenProvider interface ------------------------------------------------------

    async def header(self, session: aiohttp.ClientSession) -> str | None:
        if self._fresh():
            return self._header
        seen = self._finished  # token requests completed before we started waiting
        async with self._get_lock():
            if self._fresh():
                return self._header
            if self._finished != seen and self._last_error is not None:
                raise self._last_error.copy()  # the request we waited for failed; share it
            try:
                await self._renew(session)
            except AuthError as exc:
                self._last_error = exc
                raise
            except BaseException:  # cancelled or a bug: waiters must not see a stale error
                self._last_error = None
                raise
            else:
                self._last_error = None
            finally:
                self._finished += 1
            return self._header

    def cached(self) -> str | object | None:
        return self._header if self._fresh() else RENEW

    def invalidate(self, header_value: str) -> None:
        if header_value == self._header:  # else another request already renewed it
            self._header = None
            self._token = None
            self._expires_at = None

    def secret_values(self) -> tuple[str, ...]:
        values = [self._client_secret, *(v for k, v in self._grant.items() if k == "password")]
        values += [v for v in (self._token, self._refresh_token) if v]
        if self._proxy is not None:
            values += self._proxy.secret_values()
        return tuple(values)

    # -- internals ------------------------------------------------------------------------

    def _fresh(self) -> bool:
        if self._header is None:
            return False
        return self._expires_at is None or self._clock() < self._expires_at

    def _get_lock(self) -> asyncio.Lock:
        """One lock per event loop: a provider may outlive the loop it was first used in."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        """Adds client authentication to a token request; returns the extra headers."""
        if self._basic:
            return {"Authorization": self._basic_header}
        form["client_id"] = self._client_id
        form["client_secret"] = self._client_secret
        return {}

    async def _renew(self, session: aiohttp.ClientSession) -> None:
        if self._refresh_token is not None:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
            try:
                await self._request(session, form)
                return
            except AuthError as exc:
                if exc.retryable:
                    raise
                self._refresh_token = None  # refused: fall back to the full grant
        await self._request(session, dict(self._grant))

    async def _request(self, session: aiohttp.ClientSession, form: dict[str, str]) -> None:
        headers = {"Accept": "application/json", **self._client_auth(form)}
        grant = form["grant_type"]
        try:
            async with session.post(
                self.token_url, data=form, headers=headers, allow_redirects=False,
                proxy=self._proxy_url,
            ) as resp:
                status = resp.status
                body = await resp.read()
        except Exception as exc:
            kind = classify_exception(exc)
            if kind is None:
                raise
            timeout = session.timeout.total if session.timeout else None
            raise self._error(
                f"token request ({grant}) to {self._where} failed: "
                f"{describe_exception(exc, timeout, client_cert=self._client_cert)}",
                retryable=kind == "retryable",
            ) from None

        if not 200 <= status < 300:
            code = _oauth_error_code(body)
            detail = f" ({code})" if code else ""
            retryable = classify_status(status) == "retryable"
            raise self._error(
                f"token endpoint {self._where} answered {status}{detail} to the {grant} grant",
                retryable=retryable,
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._error(
                f"token endpoint {self._where}: response was not JSON ({grant} grant)",
                retryable=False,
            ) from None
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise self._error(
                f"token endpoint {self._where}: no access_token in response ({grant} grant)",
                retryable=False,
            )
        self._token = token
        self._header = f"Bearer {token}"
        self._expires_at = self._expiry(data.get("expires_in"))
        refresh = data.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._refresh_token = refresh  # else keep the one we have (RFC 6749 section 6)

    def _expiry(self, expires_in: object) -> float | None:
        """Deadline on our clock: ``expires_in`` less min(30 s, 10 %) so it never lapses mid-flight."""
        try:
            seconds = float(expires_in)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if seconds != seconds or seconds == float("inf"):  # NaN or inf: treat as absent
            return None
        margin = min(MAX_MARGIN_SECONDS, 0.1 * max(seconds, 0.0))
        return self._clock() + seconds - margin

    def _error(self, reason: str, retryable: bool) -> AuthError:
        return AuthError(self.destination, redact(reason, self.secret_values()), retryable)


def basic_authorization(client_id: str, client_secret: str) -> str:
    """RFC 6749 2.3.1: each part form-urlencoded before ``id:secret`` is base64-encoded."""
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode("ascii")


def _oauth_error_code(body: bytes) -> str | None:
    """The RFC 6749 ``error`` code of a refusal, if it is a plain token (never a description)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _OAUTH_ERROR_CODE.match(code) else None


def make_provider(dest: Destination) -> TokenProvider:
    """The provider for a destination's ``auth`` block."""
    auth = dest.auth
    if isinstance(auth, NoAuth):
        return NoAuthProvider()
    if isinstance(auth, BearerAuth):
        return BearerProvider(auth.token.get_secret_value())
    extras = {k: v for k, v in (("scope", auth.scope), ("audience", auth.audience)) if v}
    secret = auth.client_secret.get_secret_value()
    # token requests go through the destination's session: its proxy rules and TLS identity
    network = {"proxy": proxy_for(auth.token_url, dest.proxy),
               "client_cert": dest.client_cert is not None}
    if isinstance(auth, OAuth2PasswordAuth):
        grant = {
            "grant_type": "password",
            "username": auth.username,
            "password": auth.password.get_secret_value(),
            **extras,
        }
        return OAuth2Provider(dest.name, auth.token_url, grant, auth.client_id, secret,
                              **network)
    if isinstance(auth, OAuth2ClientCredentialsAuth):
        return OAuth2Provider(
            dest.name,
            auth.token_url,
            {"grant_type": "client_credentials", **extras},
            auth.client_id,
            secret,
            basic_client_auth=auth.credentials_type == "basic_authorization",
            **network,
        )
    raise TypeError(f"unsupported auth type {type(auth).__name__}")

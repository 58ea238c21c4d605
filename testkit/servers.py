"""Real loopback servers for the tests and the benchmarks: an endpoint that can be told to
misbehave and an OAuth 2 token server. Both are ``aiohttp.web`` apps on 127.0.0.1 with a
random port, so tests exercise our real client code over real sockets. The endpoint also
runs in a process of its own (``testkit.procs``), and ``verify_signature`` checks a
request's Standard Webhooks signature as a receiver would.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import itertools
import secrets
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, Self
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from app.demo import webhook_problem


@dataclass
class Recorded:
    """One request as the endpoint saw it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: CIMultiDictProxy[str]
    body: bytes
    time: float
    peer: tuple[str, int] | None  # client address: one port per connection


@dataclass
class _Action:
    kind: Literal["status", "drop"]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class LoopbackServer:
    """Start/stop plumbing of an ``aiohttp.web`` app on 127.0.0.1 (a free port, or ``port``);
    subclasses say what the app is (``_app``)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, port: int = 0) -> None:
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = port
        self._runner_options: dict[str, Any] = {}  # more aiohttp.web server settings

    def _app(self) -> web.Application:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        # handler_cancellation: a handler still sleeping for a client that gave up stops.
        self._runner = web.AppRunner(
            self._app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2,
            **self._runner_options,
        )
        await self._runner.setup()
        await self.listen()
        return self

    async def listen(self) -> None:
        """Accept connections (again, on the same port, after ``stop_listening``)."""
        if self._site is None and self._runner is not None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl)
            await self._site.start()
            self.port = self._runner.addresses[0][1]

    async def stop_listening(self) -> None:
        """Refuse new connections; those already open stay open."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class Endpoint(LoopbackServer):
    """A webhook receiver that records every request and can be scripted to fail.

    Scripted actions (``fail``, ``retry_after``, ``drop``, ``unauthorized``) apply to the
    next requests in order; ``always``, ``delay`` and ``expect_bearer`` hold until reset;
    ``refuse`` closes it to connections until ``accept``. ``keep_requests=False`` keeps no
    request in memory (a long run's); a subclass sees each answer in ``answered``.
    ``decode_bodies=False`` records bodies as they came over the wire (aiohttp otherwise
    decodes a ``Content-Encoding: gzip`` body before the handler sees it).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 keep_requests: bool = True, decode_bodies: bool = True) -> None:
        super().__init__(ssl_context)
        if not decode_bodies:
            self._runner_options["auto_decompress"] = False
        self.keep_requests = keep_requests
        self.requests: list[Recorded] = []
        self.refusing = False
        self.dropped = 0  # connections cut instead of answering
        self.reset()

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"

    def reset(self) -> None:
        """Forget recorded requests and every instruction: back to answering 200."""
        self.requests.clear()
        self._script: deque[_Action] = deque()
        self.status = 200
        self.response_headers: dict[str, str] = {}
        self.response_body = b'{"ok":true}'
        self.delay = 0.0
        self.expect_bearer: set[str] | None = None
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests it was handling at once

    def fail(self, n: int, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``n`` requests with ``status``."""
        self._script.extend(_Action("status", status, headers or {}) for _ in range(n))

    def retry_after(self, value: str, n: int = 1, status: int = 429) -> None:
        """Answer the next ``n`` requests 429 with ``Retry-After: value``."""
        self.fail(n, status, {"Retry-After": value})

    def drop(self, n: int = 1) -> None:
        """Close the connection without answering, ``n`` times."""
        self._script.extend(_Action("drop") for _ in range(n))

    def unauthorized(self, n: int = 1) -> None:
        """Answer the next ``n`` requests 401, whatever token they carry."""
        self.fail(n, 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def always(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer every request (after any scripted ones) with ``status``."""
        self.status = status
        self.response_headers = headers or {}

    async def refuse(self) -> None:
        """Stop listening, so connections are refused, and cut the requests that still
        arrive on connections already open (an endpoint going down)."""
        self.refusing = True
        await self.stop_listening()

    async def accept(self) -> None:
        """Listen again, on the same port, after :meth:`refuse`."""
        self.refusing = False
        await self.listen()

    def answered(self, request: Recorded, status: int) -> None:
        """Called with each request answered (not with one cut off); for subclasses."""

    def _cut(self, request: web.Request) -> NoReturn:
        self.dropped += 1
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError  # nothing more to write; the client sees a disconnect

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = Recorded(
            request.method,
            request.path,
            list(request.query.items()),
            request.headers,
            body,
            time.monotonic(),
            request.transport.get_extra_info("peername") if request.transport else None,
        )
        if self.refusing:
            self._cut(request)
        if self.keep_requests:
            self.requests.append(recorded)
        if self.delay:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
        action = self._script.popleft() if self._script else None
        if action is not None and action.kind == "drop":
            self._cut(request)
        if action is None and self.expect_bearer is not None:
            auth = request.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token not in self.expect_bearer:
                action = _Action("status", 401, {"WWW-Authenticate": "Bearer"})
        if action is None:
            action = _Action("status", self.status, self.response_headers)
        self.answered(recorded, action.status)
        return web.Response(
            status=action.status,
            headers=action.headers,
            body=self.response_body if action.status not in (204, 304) else None,
            content_type=None if action.status in (204, 304) else "application/json",
        )

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


@dataclass
class TokenCall:
    """One call to the token endpoint."""

    grant_type: str | None
    client_auth: Literal["body", "basic", "none", "both"]
    form: dict[str, str]
    authorization: str | None
    status: int


class TokenServer(LoopbackServer):
    """An OAuth 2 token endpoint (RFC 6749) at ``/token`` that checks what clients send.

    ``client_auth`` says how the client must authenticate: ``"body"`` (client_id and
    client_secret in the form), ``"basic"`` (HTTP Basic with form-urlencoded parts) or
    ``"any"``; the other way, or both at once, is refused with 401 invalid_client.
    ``issued`` holds every access token handed out and still valid, so an Endpoint can be
    told ``expect_bearer = token_server.issued``.
    """

    def __init__(
        self,
        client_id: str = "relay-client",
        client_secret: str = "client-s3cret-value",
        username: str = "relay-user",
        password: str = "user-passw0rd-value",
        *,
        client_auth: Literal["body", "basic", "any"] = "any",
        expires_in: int | None = 3600,
        issue_refresh: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(ssl_context)
        self.client_id = client_id
        self.client_secret = client_secret
        self.username = username
        self.password = password
        self.client_auth = client_auth
        self.expires_in = expires_in
        self.issue_refresh = issue_refresh
        self.refuse_refresh = False
        self.calls: list[TokenCall] = []
        self.issued: set[str] = set()
        self.refresh_tokens: set[str] = set()
        self.delay = 0.0
        self._failures: deque[int | Literal["garbage", "no_token"]] = deque()
        self._counter = itertools.count(1)

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def count(self) -> int:
        return len(self.calls)

    def grants(self) -> list[str | None]:
        """The grant type of each call, in order."""
        return [c.grant_type for c in self.calls]

    def fail(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` calls with ``status`` and an RFC 6749 error body."""
        self._failures.extend([status] * n)

    def garbage(self, n: int = 1) -> None:
        """Answer the next ``n`` calls 200 with a body that is not JSON."""
        self._failures.extend(["garbage"] * n)

    def no_token(self, n: int = 1) -> None:
        """Answer the next ``n`` calls 200 with JSON that lacks access_token."""
        self._failures.extend(["no_token"] * n)

    def revoke_all(self) -> None:
        """Invalidate every access token issued so far (refresh tokens stay valid)."""
        self.issued.clear()

    async def _handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        authorization = request.headers.get("Authorization")
        basic = _decode_basic(authorization)
        in_body = "client_id" in form or "client_secret" in form
        how: Literal["body", "basic", "none", "both"] = (
            "both" if basic and in_body else "basic" if basic else "body" if in_body else "none"
        )
        grant = form.get("grant_type")
        status, payload = self._answer(form, basic, how, grant)
        self.calls.append(TokenCall(grant, how, form, authorization, status))
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(payload, bytes):
            return web.Response(status=status, body=payload, content_type="text/html")
        return web.Response(
            status=status,
            body=orjson.dumps(payload),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def _answer(
        self,
        form: dict[str, str],
        basic: tuple[str, str] | None,
        how: str,
        grant: str | None,
    ) -> tuple[int, dict[str, object] | bytes]:
        if self._failures:
            failure = self._failures.popleft()
            if failure == "garbage":
                return 200, b"<html>oops</html>"
            if failure == "no_token":
                return 200, {"token_type": "Bearer", "expires_in": 60}
            return failure, {"error": "server_error" if failure >= 500 else "invalid_request"}
        if (
            how == "both"
            or how == "none"
            or (self.client_auth != "any" and how != self.client_auth)
        ):
            return 401, {"error": "invalid_client"}
        cid, csecret = basic if basic else (form.get("client_id"), form.get("client_secret"))
        if cid != self.client_id or csecret != self.client_secret:
            return 401, {"error": "invalid_client"}
        if grant == "password":
            if form.get("username") != self.username or form.get("password") != self.password:
                return 400, {"error": "invalid_grant"}
        elif grant == "refresh_token":
            if self.refuse_refresh or form.get("refresh_token") not in self.refresh_tokens:
                return 400, {"error": "invalid_grant"}
        elif grant != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        n = next(self._counter)
        token = f"at-{n}-{secrets.token_hex(8)}"
        self.issued.add(token)
        payload: dict[str, object] = {"access_token": token, "token_type": "bearer"}
        if self.expires_in is not None:
            payload["expires_in"] = self.expires_in
        if self.issue_refresh:
            refresh = f"rt-{n}-{secrets.token_hex(8)}"
            self.refresh_tokens.add(refresh)
            payload["refresh_token"] = refresh
        return 200, payload

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._handle)
        return app


def _decode_basic(value: str | None) -> tuple[str, str] | None:
    """RFC 6749 2.3.1: base64 of form-urlencoded ``id:secret``."""
    if not value or not value.startswith("Basic "):
        return None
    try:
        raw = base64.b64decode(value[6:], validate=True).decode()
    except ValueError:
        return None
    cid, sep, secret = raw.partition(":")
    if not sep:
        return None
    return unquote_plus(cid), unquote_plus(secret)


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for ``host`` (an IP); returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profile-relay test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context for :func:`self_signed_cert`'s files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes,
                     now: int | None = None) -> bool:
    """Whether ``body`` carries a valid Standard Webhooks signature under ``secret``, its
    timestamp within the spec's tolerance of ``now`` (default: the clock). The check is
    ``app.demo.webhook_problem``, written from the spec text independently of
    ``destinations.signing``: the demo's receiver and the tests verify the same way."""
    return webhook_problem(secret, headers, body, now) is None


__all__ = [
    "Endpoint",
    "LoopbackServer",
    "Recorded",
    "TokenCall",
    "TokenServer",
    "self_signed_cert",
    "server_ssl_context",
    "verify_signature",
]

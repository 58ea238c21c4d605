"""The HTTP sender: one aiohttp session per destination, one request per export (or batch).

aiohttp, not httpx: its request path costs about 0.13 ms of CPU against httpx's 1 ms,
which is what 10,000 requests/s per dataflow needs. Everything that does not
change between requests (URL, method, static headers, signing key, TLS context, proxy)
is prepared once here, so an option that is off costs nothing per request.
``send`` never raises for network or HTTP trouble; it returns an :class:`Outcome`.
"""

from __future__ import annotations

import re
import ssl
import time
import zlib
from collections.abc import Iterable
from importlib import metadata
from types import TracebackType

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from config import Destination
from destinations.auth import RENEW, AuthError, TokenProvider, make_provider
from destinations.network import Proxy, proxy_for, ssl_context
from destinations.outcome import (
    Kind,
    Outcome,
    classify_exception,
    classify_status,
    describe_exception,
    parse_retry_after,
    redact,
    redact_bytes,
)
from destinations.signing import Signer


def _version() -> str:
    try:
        return metadata.version("profile-relay")
    except metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"profile-relay/{_version()}"
BODY_START_BYTES = 500
_KEEP = BODY_START_BYTES + 512  # redact before cutting, so no secret survives half-cut
_READ_WHOLE_BODY_UP_TO = 64 * 1024
_DRAIN_AT_MOST = 1024 * 1024  # past this, drop the connection rather than read on
# Custom header and query parameter names whose values are treated as secrets when redacting.
_SECRET_NAME = re.compile(r"auth|token|key|secret|sig|pass|cookie|session|credential", re.I)
# zlib's default level: most of level 9's ratio on JSON at a fraction of its CPU
GZIP_LEVEL = 6
_GZIP_WBITS = 31  # zlib's way of asking for the gzip container (RFC 1952)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def gzip_body(body: bytes) -> bytes:
    """``Content-Encoding: gzip`` bytes of ``body`` (no file name, zero mtime: the same body
    always compresses to the same bytes)."""
    return zlib.compress(body, GZIP_LEVEL, wbits=_GZIP_WBITS)


def content_type(dest: Destination) -> str:
    """The body's media type: NDJSON for a destination that batches as NDJSON."""
    if dest.batch.enabled and dest.batch.format == "ndjson":
        return "application/x-ndjson"
    return "application/json"


def build_url(endpoint: str, query_pairs: Iterable[tuple[str, str]]) -> str:
    """The endpoint with the destination's query parameters appended after its own."""
    pairs = list(query_pairs)
    url = URL(endpoint)
    if pairs:
        url = url.extend_query(pairs)
    return str(url)


class Sender:
    """Sends export bodies to one destination over a keep-alive connection pool.

    Use as ``async with Sender(dest) as sender: outcome = await sender.send(...)``.
    The pool holds at most ``dest.max_in_flight`` connections; keep the number of
    concurrent ``send`` calls at or below it, since time spent waiting for a pooled
    connection counts against ``timeout_seconds``.
    """

    def __init__(self, dest: Destination, provider: TokenProvider | None = None) -> None:
        self.dest = dest
        self.provider = provider if provider is not None else make_provider(dest)
        self.url = URL(build_url(dest.endpoint, dest.query_pairs), encoded=True)
        self.where = f"{self.url.host}{self.url.path}"  # for messages: no query, no userinfo
        self.method = dest.method
        # The endpoint's proxy (the destination's own, or the environment's), chosen once:
        # aiohttp's trust_env would look it up again on every request.
        self.proxy: Proxy | None = proxy_for(self.url, dest.proxy)
        self._proxy_url = self.proxy.url if self.proxy is not None else None
        self._what = f"{self.method} {self.where}" + (
            f" via proxy {self.proxy.where}" if self.proxy is not None else "")
        # over TLS, whether we present a client certificate (None: plain HTTP); for advice
        self._client_cert = (dest.client_cert is not None) if self.url.scheme == "https" else None
        self._gzip = dest.compression == "gzip"
        self._timeout = dest.timeout_seconds
        static: CIMultiDict[str] = CIMultiDict()
        static["Content-Type"] = content_type(dest)
        static["User-Agent"] = USER_AGENT
        for name, value in dest.header_pairs:
            static[name] = value  # the user's headers may override the defaults above
        if self._gzip:
            static["Content-Encoding"] = "gzip"
        self._static = static
        secret = dest.signing_secret.get_secret_value() if dest.signing_secret else None
        self._signer = Signer(secret) if secret else None
        self._config_secrets = tuple(
            v
            for name, v in [("signing_secret", secret), *dest.header_pairs, *dest.query_pairs]
            if v and _SECRET_NAME.search(name)
        ) + (self.proxy.secret_values() if self.proxy is not None else ())
        self._session: aiohttp.ClientSession | None = None
        self._setup_error: str | None = None

    async def __aenter__(self) -> Sender:
        dest = self.dest
        try:
            ctx = ssl_context(dest.ca_bundle, dest.client_cert, dest.client_key)
        except (OSError, ssl.SSLError) as exc:
            # Reported on every send as a final outcome rather than raised here, so a bad
            # file lands in the failed store (replayable once fixed) like any config error.
            files = ", ".join(f"{name} {path}" for name, path in (
                ("ca_bundle", dest.ca_bundle), ("client_cert", dest.client_cert),
                ("client_key", dest.client_key)) if path is not None)
            reason = (getattr(exc, "reason", None) or getattr(exc, "strerror", None)
                      or type(exc).__name__)
            self._setup_error = f"cannot load {files}: {reason}"
            ctx = ssl.create_default_context()
        connector = aiohttp.TCPConnector(limit=dest.max_in_flight, ssl=ctx)
        # trust_env stays off: the proxy is chosen once above (and netrc is never read)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secret_values(self) -> tuple[str, ...]:
        """Everything that must not show up in text we print or store."""
        return self._config_secrets + self.provider.secret_values()

    async def send(
        self,
        body: bytes,
        idempotency_key: str,
        extra_headers: dict[str, str] | None = None,
        *,
        keep_body: bool = False,
    ) -> Outcome:
        """Send one export; never raises for network, TLS, auth or HTTP problems.

        A 401 gets one immediate retry with a renewed token (auth renewal, not a delivery
        retry). A redirect is final and never followed, so the body and ``Authorization``
        go to the endpoint's host only. With ``compression: gzip`` the body is compressed
        after signing: the signature covers what the receiver reads once it has decoded
        the body. ``keep_body`` puts the start of the response (redacted) in
        ``Outcome.body_start`` for ``test-send``; don't store it.
        """
        session = self._session
        if session is None:
            raise RuntimeError("Sender used outside 'async with'")
        started = time.perf_counter()
        if self._setup_error is not None:
            return self._outcome("final", None, self._setup_error, None, started)

        headers = self._static.copy()
        if extra_headers:
            headers.update(extra_headers)
        headers["Idempotency-Key"] = idempotency_key
        if self._signer is not None:
            headers.update(self._signer.headers(idempotency_key, int(time.time()), body))
        data = gzip_body(body) if self._gzip else body

        renewed = False
        while True:
            auth = self.provider.cached()
            if auth is RENEW:
                try:
                    auth = await self.provider.header(session)
                except AuthError as exc:
                    return self._auth_failed(exc, None, started)
            if auth is not None:
                headers["Authorization"] = auth
            try:
                async with session.request(
                    self.method, self.url, data=data, headers=headers, allow_redirects=False,
                    proxy=self._proxy_url,
                ) as resp:
                    status = resp.status
                    start = await self._drain(resp)
                    reason = resp.reason
                    answer_headers = resp.headers
                    retry_after = answer_headers.get("Retry-After")
            except Exception as exc:
                kind = classify_exception(exc)
                if kind is None:
                    raise
                error = (f"{self._what}: "
                         f"{describe_exception(exc, self._timeout, client_cert=self._client_cert)}")
                return self._outcome(kind, None, error, None, started)

            if status == 401 and auth is not None and not renewed:
                self.provider.invalidate(auth)
                renewed = True
                try:
                    fresh = await self.provider.header(session)
                except AuthError as exc:
                    return self._auth_failed(exc, status, started)
                if fresh is not None and fresh != auth:
                    continue  # a static token cannot renew: the 401 stands
            break

        kind = classify_status(status)
        error = None if kind == "delivered" else f"HTTP {status} {reason or ''}".rstrip()
        if status == 413:  # too large: say how large, so the limit to raise is known
            error += f" (request body of {len(data):,} bytes" + (
                f" gzip-compressed, {len(body):,} before)" if self._gzip else ")")
        elif 300 <= status < 400:
            error += (": redirects are not followed (Location: "
                      f"{self._location(answer_headers.get('Location'))})")
        wait = parse_retry_after(retry_after, time.time()) if kind == "retryable" else None
        body_start = (
            redact_bytes(start, self.secret_values())[:BODY_START_BYTES] if keep_body else b""
        )
        return self._outcome(kind, status, error, wait, started, body_start)

    async def _drain(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read the body (so the connection returns to the pool) and keep its start."""
        length = resp.content_length
        if length is not None and length <= _READ_WHOLE_BODY_UP_TO:
            return (await resp.read())[:_KEEP]
        start = b""
        total = 0
        async for chunk in resp.content.iter_any():
            if len(start) < _KEEP:
                start += chunk[: _KEEP - len(start)]
            total += len(chunk)
            if total > _DRAIN_AT_MOST:
                break  # not worth reading: leaving early closes this connection
        return start

    def _location(self, value: str | None) -> str:
        """Where a redirect pointed, as ``scheme://host:port/path``: no query string or
        user info (tokens hide there), no control characters, at most 200 characters."""
        if not value:
            return "none given"
        try:
            target = self.url.join(URL(_CONTROL.sub("", value.strip())))
        except (ValueError, TypeError):
            return "not a URL"
        if not target.host:
            return "not a URL"
        port = f":{target.port}" if target.port is not None else ""
        shown = f"{target.scheme}://{target.host}{port}{target.path}"
        return shown if len(shown) <= 200 else shown[:197] + "..."

    def _auth_failed(self, exc: AuthError, status: int | None, started: float) -> Outcome:
        kind: Kind = "retryable" if exc.retryable else "final"
        return self._outcome(kind, status, str(exc), None, started)

    def _outcome(
        self,
        kind: Kind,
        status: int | None,
        error: str | None,
        retry_after: float | None,
        started: float,
        body_start: bytes = b"",
    ) -> Outcome:
        if error is not None:
            error = redact(error, self.secret_values())
        latency = (time.perf_counter() - started) * 1000.0
        return Outcome(kind, status, error, retry_after, latency, body_start)

"""The HTTP sender: one aiohttp session per destination, one POST per export (or batch).

aiohttp, not httpx: its request path costs about 0.13 ms of CPU against httpx's 1 ms,
which is what 10,000 requests/s per dataflow needs. Everything that does not
change between requests (URL, static headers, signing key) is prepared once here.
``send`` never raises for network or HTTP trouble; it returns an :class:`Outcome`.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterable
from importlib import metadata
from types import TracebackType

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from config import Destination
from destinations.auth import AuthError, TokenProvider, make_provider
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


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Verification always on; a ``ca_bundle`` is trusted in addition to the system CAs.

    Added rather than replacing, because the token URL may sit behind a public CA while
    the endpoint uses a private one, and both go through the same session.
    """
    ctx = ssl.create_default_context()
    if ca_bundle:
        ctx.load_verify_locations(cafile=ca_bundle)
    return ctx


class Sender:
    """POSTs export bodies to one destination over a keep-alive connection pool.

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
        self._timeout = dest.timeout_seconds
        static: CIMultiDict[str] = CIMultiDict()
        static["Content-Type"] = content_type(dest)
        static["User-Agent"] = USER_AGENT
        for name, value in dest.header_pairs:
            static[name] = value  # the user's headers may override the defaults above
        self._static = static
        secret = dest.signing_secret.get_secret_value() if dest.signing_secret else None
        self._signer = Signer(secret) if secret else None
        self._config_secrets = tuple(
            v
            for name, v in [("signing_secret", secret), *dest.header_pairs, *dest.query_pairs]
            if v and _SECRET_NAME.search(name)
        )
        self._session: aiohttp.ClientSession | None = None
        self._setup_error: str | None = None

    async def __aenter__(self) -> Sender:
        ca = str(self.dest.ca_bundle) if self.dest.ca_bundle else None
        try:
            ctx = ssl_context(ca)
        except (OSError, ssl.SSLError) as exc:
            # Reported on every send as a final outcome rather than raised here, so a bad
            # bundle lands in the failed store (replayable once fixed) like any config error.
            self._setup_error = f"cannot load ca_bundle {ca}: {getattr(exc, 'strerror', None) or type(exc).__name__}"
            ctx = ssl.create_default_context()
        connector = aiohttp.TCPConnector(limit=self.dest.max_in_flight, ssl=ctx)
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
        """POST one export; never raises for network, TLS, auth or HTTP problems.

        A 401 gets one immediate retry with a renewed token (auth renewal, not a delivery
        retry). ``keep_body`` puts the start of the response (redacted) in
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

        renewed = False
        while True:
            try:
                auth = await self.provider.header(session)
            except AuthError as exc:
                return self._auth_failed(exc, None, started)
            if auth is not None:
                headers["Authorization"] = auth
            try:
                async with session.post(
                    self.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    start = await self._drain(resp)
                    reason = resp.reason
                    retry_after = resp.headers.get("Retry-After")
            except Exception as exc:
                kind = classify_exception(exc)
                if kind is None:
                    raise
                error = f"POST {self.where}: {describe_exception(exc, self._timeout)}"
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
            error += f" (request body of {len(body):,} bytes)"
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

"""The one classification of delivery outcomes that every retry decision is driven by.

The dispatch task's ``retry_condition_fn``, the failed-request store and ``test-send`` all
read an :class:`Outcome`; nothing else decides what is worth retrying. Error texts built
here are safe to store and log: they name a host and path at most, never headers, query
strings (tokens hide there) or credentials.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp

Kind = Literal["delivered", "retryable", "final"]

REDACTED = "***"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to.

    ``body_start`` holds the first bytes of the response only when the caller asked for
    it (``test-send``); it may echo what we sent, so it is redacted but never stored.
    """

    kind: Kind
    status: int | None
    error: str | None
    retry_after: float | None
    latency_ms: float
    body_start: bytes = b""

    @property
    def delivered(self) -> bool:
        return self.kind == "delivered"

    @property
    def retryable(self) -> bool:
        return self.kind == "retryable"


def classify_status(status: int) -> Kind:
    """2xx delivered; 408, 429, 5xx worth another try; anything else is final.

    3xx is final because redirects are never followed (a redirect would replay the body
    and the Authorization header to a host the user did not configure).
    """
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or 500 <= status < 600:
        return "retryable"
    return "final"


# Config problems and broken trust do not heal by waiting, so they are final.
_FINAL_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorCertificateError,
    ssl.CertificateError,
    aiohttp.ServerFingerprintMismatch,
    aiohttp.InvalidURL,
    aiohttp.NonHttpUrlClientError,
    ValueError,  # bad header values and the like, raised before anything is sent
)
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,
    aiohttp.ClientConnectionError,  # includes ServerDisconnectedError and connector errors
    aiohttp.ClientPayloadError,
    OSError,
)


def classify_exception(exc: BaseException) -> Kind | None:
    """Retryable for network trouble, final for certificate and config errors.

    Returns None for exceptions that are not delivery problems (programming errors),
    which the caller should let propagate.
    """
    if isinstance(exc, _FINAL_ERRORS):
        return "final"
    if isinstance(exc, _RETRYABLE_ERRORS):
        return "retryable"
    if isinstance(exc, aiohttp.ClientError):
        return "retryable"
    return None


def describe_exception(exc: BaseException, timeout: float | None = None) -> str:
    """A short, secret-free description of a transport error.

    ``str(exc)`` is avoided on purpose: aiohttp puts whole URLs (query strings included)
    into some messages.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        detail = getattr(cert, "verify_message", None) or type(cert).__name__
        return f"TLS certificate error for {exc.host}:{exc.port}: {detail}"
    if isinstance(exc, ssl.CertificateError):
        return f"TLS certificate error: {getattr(exc, 'verify_message', None) or 'verification failed'}"
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return "TLS certificate fingerprint mismatch"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        reason = getattr(exc.os_error, "reason", None) or "handshake failed"
        return f"TLS error connecting to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        detail = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {detail}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection without a response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body was cut short or malformed"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "invalid URL"
    if isinstance(exc, ValueError):
        return f"invalid request ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP-date).

    ``now`` is wall-clock epoch seconds (``time.time()``). Dates in the past give 0;
    anything unparseable gives None, so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds != float("inf") else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a zone-less one is taken as UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every known secret value in ``text``; a last line of defence for errors.

    Values shorter than 4 characters are left alone (replacing them would garble text).
    """
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """:func:`redact` for response bodies shown by ``test-send``."""
    for secret in secrets:
        raw = secret.encode()
        if raw and len(raw) >= 4 and raw in data:
            data = data.replace(raw, REDACTED.encode())
    return data

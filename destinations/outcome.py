"""The one classification of delivery outcomes that every retry decision is driven by.

The dispatch task's ``retry_condition_fn``, the failed-request store and ``test-send`` all
read an :class:`Outcome`; nothing else decides what is worth retrying. Error texts built
here are safe to store and log: they name a host and path at most, never headers, query
strings (tokens hide there) or credentials.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple

import aiohttp

Kind = Literal["delivered", "retryable", "final"]

REDACTED = "***"


class Outcome(NamedTuple):
    """What one delivery attempt came to (a named tuple: one is made per request).

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


# TLS alerts by which a server refuses our certificate (or its absence): a config problem.
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the TLS handshake (handshake "
                                     "failure alert, as servers that require a client "
                                     "certificate answer when they get none)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA "
                              "(unknown CA alert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate (bad "
                                   "certificate alert)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate "
                                       "(certificate unknown alert)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says the client certificate has expired",
    "TLSV1_ALERT_ACCESS_DENIED": "the server refused the client certificate (access "
                                 "denied alert)",
}
# OpenSSL verify codes (X509_V_ERR_*) of a server certificate we cannot trust.
_UNKNOWN_ISSUER_CODES = {2, 18, 19, 20, 21}  # issuer unknown, self-signed, leaf unverifiable
_NAME_MISMATCH_CODES = {62, 63, 64}  # host name, e-mail, IP address mismatch
_EXPIRED_CODES = {9, 10}  # not yet valid, expired


def _ssl_reason(exc: BaseException) -> str | None:
    """OpenSSL's reason code behind an aiohttp error: on the error itself, its ``os_error``
    or its cause (a TLS 1.3 server's alert arrives after the handshake, while the request
    is sent). aiohttp's own SSL error classes carry none; the wrapped one does."""
    for candidate in (exc, getattr(exc, "os_error", None), exc.__cause__, exc.__context__):
        reason = getattr(candidate, "reason", None)
        if isinstance(candidate, ssl.SSLError) and reason:
            return str(reason)
    return None


def _alert(exc: BaseException) -> str | None:
    """The OpenSSL reason of a TLS alert about our client certificate, if that is what
    ``exc`` is."""
    reason = _ssl_reason(exc)
    return reason if reason in _CLIENT_CERT_ALERTS else None


def classify_exception(exc: BaseException) -> Kind | None:
    """Retryable for network trouble, final for certificate and config errors.

    Returns None for exceptions that are not delivery problems (programming errors),
    which the caller should let propagate.
    """
    if isinstance(exc, _FINAL_ERRORS) or _alert(exc) is not None:
        return "final"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # the proxy refused the tunnel: its 407 or 403 is final, its 502 or 503 retried
        kind = classify_status(exc.status)
        return "final" if kind == "delivered" else kind
    if isinstance(exc, _RETRYABLE_ERRORS):
        return "retryable"
    if isinstance(exc, aiohttp.ClientError):
        return "retryable"
    return None


def _certificate_problem(cert: BaseException) -> str:
    """Why the server's certificate is not trusted, and what to change."""
    code = getattr(cert, "verify_code", None)
    detail = getattr(cert, "verify_message", None) or type(cert).__name__
    if code in _UNKNOWN_ISSUER_CODES:
        return (f"{detail}: the server's certificate is not signed by a trusted CA; for a "
                "private CA, set ca_bundle to its certificate")
    if code in _NAME_MISMATCH_CODES:
        return (f"{detail} (hostname mismatch): write the URL with a host name the "
                "certificate is issued for, or have the certificate reissued")
    if code in _EXPIRED_CODES:
        return f"{detail}: the server's certificate must be renewed"
    return detail


def _client_cert_problem(reason: str, client_cert: bool) -> str:
    """A server's TLS alert about our certificate, and what to change."""
    what = _CLIENT_CERT_ALERTS[reason]
    if not client_cert and reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED",
                                      "SSLV3_ALERT_HANDSHAKE_FAILURE"):
        return f"{what}; set client_cert and client_key (mutual TLS)"
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        return f"{what}; check that the server accepts client_cert and shares a TLS version"
    return f"{what}; check client_cert and client_key"


def describe_exception(exc: BaseException, timeout: float | None = None, *,
                       client_cert: bool | None = None) -> str:
    """A short, secret-free description of a transport error, with what to change when
    the cause is known (TLS trust, a client certificate, a proxy).

    ``client_cert`` says whether the request went over TLS with a client certificate
    (True), over TLS without one (False), or is unknown (None); it shapes the advice.
    ``str(exc)`` is avoided on purpose: aiohttp puts whole URLs (query strings, proxy
    credentials) into some messages.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"TLS certificate error for {exc.host}:{exc.port}: "
                f"{_certificate_problem(exc.certificate_error)}")
    if isinstance(exc, ssl.CertificateError):
        return f"TLS certificate error: {_certificate_problem(exc)}"
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return "TLS certificate fingerprint mismatch"
    if (reason := _alert(exc)) is not None:
        where = (f" with {exc.host}:{exc.port}"
                 if isinstance(exc, aiohttp.ClientConnectorError) else "")
        return f"TLS error{where}: {_client_cert_problem(reason, bool(client_cert))}"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return (f"the proxy answered {exc.status} {exc.message} to CONNECT"
                + ("; check the proxy's user and password" if exc.status == 407 else ""))
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        detail = exc.os_error.strerror or type(exc.os_error).__name__
        return f"proxy {exc.host}:{exc.port} unreachable: {detail}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        reason = getattr(exc.os_error, "reason", None) or "handshake failed"
        return f"TLS error connecting to {exc.host}:{exc.port}: {reason}"
    if _is_reset(exc) and client_cert is False:
        # an asyncio (Python) server cuts a client without a certificate this way, alert unsent
        return ("connection reset by the server; if it requires a client certificate, set "
                "client_cert and client_key")
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


def _is_reset(exc: BaseException) -> bool:
    """A connection reset, whether aiohttp met it while connecting or while sending."""
    error = getattr(exc, "os_error", exc)
    return isinstance(error, OSError) and error.errno == errno.ECONNRESET


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

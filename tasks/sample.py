"""`test-send`: one sample export sent through the real sender, and a diagnosis of failures.

The sample is what the first dataflow using the destination would export: its mapped
attributes filled with sample values, its mapped segments as realized, a sample identity,
rendered by the one body builder (segment names and timestamps as configured, through the
destination's template, in its batch format). It goes out through
:class:`destinations.sender.Sender`, so auth, headers, query parameters and signing are
exactly those of a real delivery; ``--dry-run`` shows that request without sending it.
``validate`` renders each destination's template against the same sample
(:func:`template_problems`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from config import (
    BearerAuth,
    Config,
    Dataflow,
    Destination,
    OAuth2ClientCredentialsAuth,
    OAuth2PasswordAuth,
)
from destinations.outcome import Outcome
from destinations.sender import USER_AGENT, Sender, content_type
from state.db import now_ms
from state.model import StoredProfile
from tasks.body import BodySpec, TemplateError, document, frame, render, set_path, template_for
from tasks.dispatch import BATCH_SIZE_HEADER

SAMPLE_PROFILE_ID = "profile-relay-test-send"
SHOW_BODY_BYTES = 300
MASK = "***"
# Header and query names whose values are never printed.
_SECRET_NAME = re.compile(r"auth|token|key|secret|sig|pass|cookie|session|credential", re.I)
_NOT_SECRET = {"idempotency-key"}

# (substring of the lower-cased leaf name, sample value); first match wins.
_SAMPLES: tuple[tuple[str, Any], ...] = (
    ("firstname", "Jane"), ("givenname", "Jane"), ("lastname", "Doe"), ("familyname", "Doe"),
    ("surname", "Doe"), ("middlename", "Q"), ("fullname", "Jane Doe"),
    ("birthdate", "1990-04-12"), ("dateofbirth", "1990-04-12"), ("birthyear", 1990),
    ("birthdayandmonth", "04-12"), ("gender", "female"), ("phone", "+1-555-0100"),
    ("number", "+1-555-0100"), ("email", "jane.doe@example.com"), ("street", "1 Sample Street"),
    ("city", "Springfield"), ("postalcode", "12345"), ("zip", "12345"), ("region", "IL"),
    ("state", "IL"), ("countrycode", "US"), ("country", "United States"), ("language", "en-US"),
    ("locale", "en-US"), ("age", 34), ("points", 1200), ("score", 87), ("tier", "gold"),
    ("count", 3), ("amount", 42.5), ("date", "2026-01-11"), ("time", "2026-01-11T21:24:39Z"),
    ("url", "https://example.com/jane"), ("id", "sample-id-0001"), ("name", "Jane Doe"),
)


def sample_value(path: str) -> Any:
    """A plausible value for an attribute path, judged from its names."""
    parts = [p.lower() for p in path.split(".")]
    leaf = parts[-1]
    if any("email" in p for p in parts) and leaf in ("address", "email", "emailaddress"):
        return "jane.doe@example.com"
    if leaf.startswith(("is", "has")) and len(leaf) > 3 and leaf[2:3].isalpha():
        return True
    for needle, value in _SAMPLES:
        if needle in leaf:
            return value
    return "sample value"


@dataclass(frozen=True)
class SampleExport:
    dataflow: str | None   # the dataflow it was modelled on (None: no dataflow uses it)
    document: dict[str, Any]
    body: bytes            # the request body: rendered (template) and framed (batch)
    batched: bool = False


def sample_export(config: Config, destination: str) -> SampleExport:
    """The request the first dataflow to ``destination`` would send for a sample profile:
    the export object, and the body as the destination's template and batch format make
    it (a batch of one). Raises :class:`TemplateError` when the template fails on it."""
    profile, spec, flow = _sample(config, destination)
    body = frame([render(profile, spec)], spec)
    return SampleExport(flow, document(profile, spec), body, spec.batched)


def template_problems(config: Config) -> list[tuple[str, str]]:
    """Each destination template that fails on the sample profile, as (field path, error
    with the template's line): what ``validate`` reports."""
    problems = []
    for i, dest in enumerate(config.destinations):
        if dest.template is None:
            continue
        try:
            sample_export(config, dest.name)
        except TemplateError as exc:
            problems.append((f"destinations[{i}].template",
                             f"{exc} (rendering the sample profile)"))
    return problems


def _sample(config: Config, destination: str) -> tuple[StoredProfile, BodySpec, str | None]:
    dest = config.destination(destination)
    flow: Dataflow | None = next((f for f in config.dataflows if f.destination == dest.name), None)
    attributes: dict[str, Any] = {}
    segments: dict[str, tuple[str, str | None]] = {}
    now_iso = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    mapping_times: dict[str, tuple[int, int]] = {}
    if flow is not None:
        for path in flow.attributes:
            set_path(attributes, path.split("."), sample_value(path))
        now = now_ms()
        for seg in flow.segments:
            segments[seg] = ("realized", now_iso)
            mapping_times[seg] = (now, now)
        spec = BodySpec.for_dataflow(config, flow, mapping_times)
    else:
        spec = BodySpec(dataflow="", attribute_paths=(), include_names=dest.include_segment_names,
                        include_timestamps=dest.include_segment_timestamps,
                        catalogue={s.id: s for s in config.segments}, mapping_times={},
                        template=template_for(dest.template, dest.template_strict, dest.name,
                                              dest.description),
                        batch=dest.batch)
    profile = StoredProfile(
        profile_id=SAMPLE_PROFILE_ID,
        attributes=attributes,
        identity_map={"ecid": [{"id": "00000000000000000000000000000000000001"}],
                      "email": [{"id": "jane.doe@example.com"}]},
        segments=segments,
    )
    return profile, spec, flow.name if flow else None


def _mask(name: str, value: str) -> str:
    if name.lower() in _NOT_SECRET or not _SECRET_NAME.search(name):
        return value
    return MASK


def display_url(sender: Sender) -> str:
    """The request URL with the values of secret-looking query parameters masked."""
    url = URL(str(sender.url), encoded=True)
    if not url.query:
        return str(url)
    pairs = [(k, _mask(k, v)) for k, v in url.query.items()]
    return str(url.with_query(pairs))


def request_headers(dest: Destination, idempotency_key: str,
                    extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The headers the sender puts on the request, secret-looking values masked."""
    headers: dict[str, tuple[str, str]] = {}
    for name, value in [("Content-Type", content_type(dest)), ("User-Agent", USER_AGENT),
                        *dest.header_pairs]:
        headers[name.lower()] = (name, _mask(name, value))
    for name, value in (extra or {}).items():
        headers[name.lower()] = (name, value)
    headers["idempotency-key"] = ("Idempotency-Key", idempotency_key)
    auth = dest.auth
    if isinstance(auth, BearerAuth):
        headers["authorization"] = ("Authorization", f"Bearer {MASK}")
    elif isinstance(auth, OAuth2PasswordAuth | OAuth2ClientCredentialsAuth):
        token_url = URL(auth.token_url)
        grant = "password" if isinstance(auth, OAuth2PasswordAuth) else "client_credentials"
        headers["authorization"] = (
            "Authorization",
            f"Bearer {MASK} (token from {token_url.host}{token_url.path}, {grant} grant)")
    if dest.signing_secret is not None:
        for name in ("webhook-id", "webhook-timestamp"):
            headers[name] = (name, "(set per request)")
        headers["webhook-signature"] = ("webhook-signature", f"v1,{MASK}")
    return list(headers.values())


@dataclass(frozen=True)
class Diagnosis:
    reason: str   # DNS failure, connection refused, TLS/certificate, timeout, auth, status, ...
    detail: str   # the sender's (redacted) error
    hint: str


async def _probe(host: str, port: int, timeout: float) -> str:
    """Why a connection to host:port fails: 'dns', 'refused', 'timeout' or 'ok'/'other'."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except socket.gaierror:
        return "dns"
    except TimeoutError:
        return "timeout"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "other"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "ok"


_CONNECT_REASONS = {
    "dns": ("DNS failure", "the host name {host} does not resolve; check the URL"),
    "refused": ("connection refused", "nothing accepts connections on {host}:{port}; is the "
                                      "service running and the port right?"),
    "timeout": ("timeout", "{host}:{port} did not answer in time; a firewall may drop packets"),
}


async def diagnose(outcome: Outcome, dest: Destination) -> Diagnosis:
    """Put a failed outcome into one of the reasons test-send reports."""
    error = outcome.error or ""
    status = outcome.status
    if "token endpoint" in error or "token request" in error:
        auth = dest.auth
        url = URL(getattr(auth, "token_url", dest.endpoint))
        sub = ""
        if "cannot connect" in error and url.host:
            probe = await _probe(url.host, url.port or 443, min(dest.timeout_seconds, 5.0))
            if probe in _CONNECT_REASONS:
                sub = f" ({_CONNECT_REASONS[probe][0]})"
        return Diagnosis(f"auth: token endpoint failed{sub}", error,
                         "check token_url, client id/secret (and username/password)")
    if status in (401, 403):
        return Diagnosis(f"auth: endpoint answered {status}", error,
                         "the endpoint refused the credentials; check the auth block and token")
    if status is not None:
        if 300 <= status < 400:
            hint = "redirects are not followed; point the endpoint at the final URL"
        elif status in (408, 429) or status >= 500:
            hint = "a real delivery would retry this twice, then keep it in the failed store"
        else:
            hint = "a real delivery would not retry this; it goes to the failed store"
        return Diagnosis(f"status {status}", error, hint)
    if "TLS" in error or "certificate" in error.lower():
        return Diagnosis("TLS/certificate", error,
                         "the server's certificate is not trusted; set ca_bundle for a private CA")
    if "timed out" in error:
        return Diagnosis("timeout", error,
                         f"no answer within timeout_seconds ({dest.timeout_seconds:g} s)")
    url = URL(dest.endpoint)
    if "cannot connect" in error and url.host:
        probe = await _probe(url.host, url.port or (443 if url.scheme == "https" else 80),
                             min(dest.timeout_seconds, 5.0))
        if probe in _CONNECT_REASONS:
            reason, hint = _CONNECT_REASONS[probe]
            return Diagnosis(reason, error, hint.format(host=url.host, port=url.port))
        return Diagnosis("connection failed", error, "check the endpoint URL and the network")
    return Diagnosis("request failed", error, "see the error above")


@dataclass(frozen=True)
class SampleSendResult:
    sample: SampleExport
    method: str
    url: str
    headers: list[tuple[str, str]]
    outcome: Outcome
    diagnosis: Diagnosis | None

    @property
    def ok(self) -> bool:
        return self.outcome.status is not None and 200 <= self.outcome.status < 300

    @property
    def body_start(self) -> bytes:
        return self.outcome.body_start[:SHOW_BODY_BYTES]


@dataclass(frozen=True)
class SampleRequest:
    """The test-send request as it goes out (headers with secret values masked)."""

    sample: SampleExport
    method: str
    url: str
    headers: list[tuple[str, str]]
    key: str
    extra_headers: dict[str, str]


def sample_request(config: Config, destination: str) -> SampleRequest:
    """The request test-send makes, without sending it (``--dry-run``). Its
    Idempotency-Key is new on every test-send, so a receiver that drops duplicates still
    answers each one. Raises :class:`TemplateError` when the template fails."""
    dest = config.destination(destination)
    sample = sample_export(config, destination)
    key = str(uuid.uuid4())
    extra = {BATCH_SIZE_HEADER: "1"} if sample.batched else {}
    url = display_url(Sender(dest))
    return SampleRequest(sample, "POST", url, request_headers(dest, key, extra), key, extra)


async def send_sample(config: Config, destination: str) -> SampleSendResult:
    """Send one sample export to ``destination`` and diagnose the answer."""
    dest = config.destination(destination)
    request = sample_request(config, destination)
    async with Sender(dest) as sender:
        outcome = await sender.send(request.sample.body, request.key, request.extra_headers,
                                    keep_body=True)
    result_ok = outcome.status is not None and 200 <= outcome.status < 300
    diagnosis = None if result_ok else await diagnose(outcome, dest)
    return SampleSendResult(request.sample, request.method, request.url, request.headers,
                            outcome, diagnosis)


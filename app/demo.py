"""`profile-relay demo`: the whole job on this machine, end to end, checked.

In a scratch folder: a config with one dataflow to a local receiver (started in-process on
a free port), the bundled sample profiles ingested, the stream flow run once (the new
dataflow's backfill delivers every qualified profile), then a handful of changes that the
spec treats differently, the stream flow run once more, and for each change what reached
the receiver and why. The receiver's requests are checked against what the export rules say
must arrive; any difference makes the demo fail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from app.receiver import Receiver, first_identity
from config import load_config
from state import open_store
from state.model import QUALIFIED
from tasks.ingest import ingest_files

MARKER = ".profile-relay-demo"
MAPPED_SEGMENTS = ("seg-vip", "seg-cart")
MAPPED_ROOTS = {"person", "personalEmail", "segmentMembership", "identityMap"}
WEBHOOK_TOLERANCE_SECONDS = 300  # Standard Webhooks: reject older or newer messages

CONFIG_TEMPLATE = """\
# Written by `profile-relay demo`; the receiver listened on port {port}.
state: relay.db
segments:
  - {{id: seg-vip, name: "High-value customers", createdAt: 1767225600000, updatedAt: 1767830400000}}
  - {{id: seg-cart, name: "Abandoned cart, last 7 days", createdAt: 1767312000000, updatedAt: 1767312000000}}
  - {{id: seg-news, name: "Newsletter subscribers", createdAt: 1735689600000, updatedAt: 1767225600000}}
destinations:
  - name: demo-receiver
    description: the demo's local receiver
    endpoint: http://127.0.0.1:{port}/hook
    auth: {{type: none}}
    headers: "X-Source:profile-relay-demo"
    query_parameters: "source=demo"
    include_segment_names: true
    include_segment_timestamps: true
    # Inline only because this throwaway config must work after the demo (status, stream);
    # real configs write ${{ENV_VAR}} or {{{{ prefect.blocks.secret.NAME }}}} instead.
    signing_secret: "{signing_secret}"
    rate_limit: 1000
    max_in_flight: 16
    timeout_seconds: 10
    retry_backoff_seconds: 0.2
dataflows:
  - name: demo-stream
    destination: demo-receiver
    segments: [seg-vip, seg-cart]         # seg-news stays unmapped
    attributes: [person.name.firstName, person.name.lastName, person.birthDate, personalEmail.address]
"""


class DemoError(Exception):
    """The demo cannot go on: a folder it will not wipe (exit 2), a failed flow run (1)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def sample_profiles() -> bytes:
    """The bundled sample profiles (package data, so an installed package has them)."""
    return (resources.files("app") / "examples" / "profiles.ndjson").read_bytes()


def prepare_folder(directory: Path) -> None:
    """Create the scratch folder, wiping an earlier demo's. Never wipes anything else."""
    if directory.exists():
        if not directory.is_dir():
            raise DemoError(f"{directory} exists and is not a folder")
        if any(directory.iterdir()) and not (directory / MARKER).exists():
            raise DemoError(f"{directory} is not empty and was not made by the demo; "
                            "pick another folder with --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("scratch folder of `profile-relay demo`; wiped on each run\n")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _get(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


@dataclass(frozen=True)
class Change:
    title: str
    profile: str
    fragment: dict[str, Any]
    expect: bool                                # one export expected, or none
    why: str
    check: Callable[[dict[str, Any]], str | None] | None = None  # body -> problem
    shows: Callable[[dict[str, Any]], str] | None = None         # body -> what to point out


def _expect_equal(label: str, keys: tuple[str, ...], want: Any
                  ) -> Callable[[dict[str, Any]], str | None]:
    def check(body: dict[str, Any]) -> str | None:
        got = _get(body, *keys)
        return None if got == want else f"{label}: expected {want!r}, got {got!r}"
    return check


def changes(now: str) -> list[Change]:
    """The changes of step 2, one profile each, with what the export rules say they cause."""
    def frag(pid: str, **parts: Any) -> dict[str, Any]:
        return {"profileId": pid, "timestamp": now, **parts}

    return [
        Change("mapped attribute rewritten with the same value", "p-0001",
               frag("p-0001", attributes={"person": {"name": {"firstName": "John"}}}), True,
               "a write to a mapped attribute triggers an export even when the value is "
               "unchanged (export trigger 3 in the README)",
               _expect_equal("firstName", ("person", "name", "firstName"), "John"),
               lambda b: f"person.name.firstName = {_get(b, 'person', 'name', 'firstName')!r}"),
        Change("unmapped attribute written", "p-0002",
               frag("p-0002", attributes={"loyalty": {"points": 777}}), False,
               "unmapped attribute: no export (as the export rules say: writes to unmapped "
               "attributes trigger nothing)"),
        Change("segment exit", "p-0003",
               frag("p-0003", segmentMembership={"ups": {"seg-vip": {
                   "status": "exited", "lastQualificationTime": now}}}), True,
               "leaving a mapped segment is a membership change; the profile is exported "
               "once more so the endpoint learns it left (export trigger 1 in the README)",
               _expect_equal("seg-vip status", ("segmentMembership", "ups", "seg-vip", "status"),
                             "exited"),
               lambda b: "seg-vip: "
                         f"{_get(b, 'segmentMembership', 'ups', 'seg-vip', 'status')}"),
        Change("identity added", "p-0004",
               frag("p-0004", identityMap={"phone": [{"id": "+33612345678"}]}), True,
               "an identity added to the identity map triggers an export (export trigger 2 in the README)",
               lambda b: None if _get(b, "identityMap", "phone") == [{"id": "+33612345678"}]
               else f"identityMap.phone missing: {_get(b, 'identityMap')!r}",
               lambda b: f"identityMap namespaces {sorted(_get(b, 'identityMap') or {})}"),
        Change("profile qualifying", "p-0041",
               frag("p-0041", segmentMembership={"ups": {"seg-cart": {
                   "status": "realized", "lastQualificationTime": now}}}), True,
               "qualifying for a mapped segment is a membership change (export trigger 1 in the README)",
               _expect_equal("seg-cart status", ("segmentMembership", "ups", "seg-cart", "status"),
                             "realized"),
               lambda b: "seg-cart: "
                         f"{_get(b, 'segmentMembership', 'ups', 'seg-cart', 'status')}"),
        Change("unmapped segment joined", "p-0005",
               frag("p-0005", segmentMembership={"ups": {"seg-news": {
                   "status": "realized", "lastQualificationTime": now}}}), False,
               "unmapped segment: no export (its status shows in the profile's next export)"),
        Change("realized -> existing in a mapped segment", "p-0006",
               frag("p-0006", segmentMembership={"ups": {"seg-vip": {
                   "status": "existing", "lastQualificationTime": now}}}), False,
               "still qualified: a change between realized and existing alone is not a "
               "membership change"),
        Change("mapped attribute written on a profile in no mapped segment", "p-0045",
               frag("p-0045", attributes={"personalEmail": {"address": "new@example.com"}}),
               False,
               "not a member of any mapped segment: nothing to export"),
    ]


@dataclass
class Sample:
    pid_by_identity: dict[str, str]
    qualified: list[str]    # profiles qualified for a mapped segment after ingest


def read_sample(data: bytes) -> Sample:
    pid_by_identity: dict[str, str] = {}
    segments: dict[str, dict[str, str]] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        doc = orjson.loads(line)
        pid = doc["profileId"]
        ident = first_identity(doc)
        if ident != "-":
            pid_by_identity.setdefault(ident, pid)
        for seg, entry in (_get(doc, "segmentMembership", "ups") or {}).items():
            segments.setdefault(pid, {})[seg] = entry["status"]
    qualified = sorted(pid for pid, segs in segments.items()
                       if any(segs.get(s) in QUALIFIED for s in MAPPED_SEGMENTS))
    return Sample(pid_by_identity, qualified)


def webhook_problem(secret: str, headers: Mapping[str, str], body: bytes,
                    now: float | None = None) -> str | None:
    """Standard Webhooks verification as a receiver does it, written from the spec text
    (independently of ``destinations.signing``); None when ``body`` verifies.

    The signed content is ``webhook-id.webhook-timestamp.body``; the key is the base64
    after the ``whsec_`` prefix; ``webhook-signature`` is a space-delimited list of
    ``v1,<base64 HMAC-SHA256>``; the timestamp must be within the tolerance of ``now``
    (epoch seconds, default the clock)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, sig = (lowered.get(h) for h in
                          ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and sig):
        return "missing webhook-id/-timestamp/-signature headers"
    try:
        sent_at = int(stamp)
    except ValueError:
        return "webhook-timestamp is not a number of seconds"
    if abs((time.time() if now is None else now) - sent_at) > WEBHOOK_TOLERANCE_SECONDS:
        return "webhook-timestamp is too far from now"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256)
    want = base64.b64encode(mac.digest()).decode()
    for entry in sig.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(want, signature):
            return None
    return "webhook-signature does not verify"


def verify_signature(secret: str, request: dict[str, Any]) -> str | None:
    """A received request's signature, and its webhook-id against its Idempotency-Key."""
    if problem := webhook_problem(secret, request["headers"], request["raw"]):
        return problem
    headers = {k.lower(): v for k, v in request["headers"].items()}
    if headers["webhook-id"] != headers.get("idempotency-key"):
        return "webhook-id differs from Idempotency-Key"
    return None


class Report:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.echo(f"   PROBLEM: {text}")


def _pid(request: dict[str, Any], sample: Sample) -> str:
    return sample.pid_by_identity.get(first_identity(request["body"]), "?")


def check_backfill(requests: list[dict[str, Any]], sample: Sample, secret: str,
                   report: Report) -> None:
    got = [_pid(r, sample) for r in requests]
    if sorted(got) != sample.qualified:
        missing = sorted(set(sample.qualified) - set(got))
        extra = sorted(set(got) - set(sample.qualified))
        dupes = sorted({p for p in got if got.count(p) > 1})
        report.problem(f"backfill: expected one request per qualified profile "
                       f"({len(sample.qualified)}); missing {missing}, unexpected {extra}, "
                       f"duplicated {dupes}")
    for request, pid in zip(requests, got, strict=True):
        check_request(request, pid, secret, report)


def check_request(request: dict[str, Any], pid: str, secret: str, report: Report) -> None:
    body = request["body"]
    if not isinstance(body, dict):
        report.problem(f"{pid}: body is not a JSON object")
        return
    extra = set(body) - MAPPED_ROOTS
    if extra:
        report.problem(f"{pid}: unmapped attributes exported: {sorted(extra)}")
    ups = _get(body, "segmentMembership", "ups") or {}
    for seg, entry in ups.items():
        if "name" not in entry:
            report.problem(f"{pid}: segment {seg} has no name (include_segment_names is on)")
        if seg in MAPPED_SEGMENTS and "mappingCreatedAt" not in entry:
            report.problem(f"{pid}: mapped segment {seg} has no mappingCreatedAt")
    if request["query"].get("source") != "demo":
        report.problem(f"{pid}: query parameter source=demo missing")
    headers = {k.lower(): v for k, v in request["headers"].items()}
    if headers.get("x-source") != "profile-relay-demo":
        report.problem(f"{pid}: custom header X-Source missing")
    if problem := verify_signature(secret, request):
        report.problem(f"{pid}: {problem}")


def write_changes(directory: Path, items: list[Change]) -> Path:
    path = directory / "changes.ndjson"
    path.write_bytes(b"".join(orjson.dumps(c.fragment) + b"\n" for c in items))
    return path


async def _stream_once(stream_flow: Any, config_path: Path) -> dict[str, Any]:
    """One whole pass of the stream flow (a Prefect flow run) in this process."""
    try:
        return await stream_flow(str(config_path), None, 1.0, True, 60.0)
    except Exception as exc:  # Prefect server trouble and the like: say so plainly
        raise DemoError(f"the stream flow run failed: {type(exc).__name__}: "
                        f"{str(exc)[:500]}", exit_code=1) from exc


async def run_demo(directory: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Run the demo in ``directory``; returns the problems found (empty: all as expected)."""
    from flows.stream import stream_flow

    started = time.monotonic()
    report = Report(echo)
    directory = directory.resolve()
    prepare_folder(directory)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    data = sample_profiles()
    sample = read_sample(data)
    async with Receiver(record=directory / "receiver.ndjson") as receiver:
        config_path = directory / "relay.yaml"
        config_path.write_text(CONFIG_TEMPLATE.format(port=receiver.port, signing_secret=secret),
                               encoding="utf-8")
        config = load_config(config_path)
        store = open_store(config.state_target)
        catalogue = frozenset(s.id for s in config.segments)
        echo(f"demo folder {directory}")
        echo(f"receiver on {receiver.base_url} (requests recorded in receiver.ndjson)")

        echo("\n1. ingest the sample profiles")
        profiles_path = directory / "profiles.ndjson"
        profiles_path.write_bytes(data)
        result = ingest_files(store, [str(profiles_path)], catalogue)
        echo(f"   ingested {result.ingested} profile fragments, rejected {result.rejected}")
        if result.rejected:
            report.problem(f"{result.rejected} sample line(s) rejected: {result.rejections[:3]}")

        echo("\n2. stream once: the new dataflow 'demo-stream' backfills its qualified profiles")
        totals = await _stream_once(stream_flow, config_path)
        first = list(receiver.requests)
        echo(f"   stream run: {orjson.dumps(totals).decode()}")
        echo(f"   receiver got {len(first)} request(s); {len(sample.qualified)} profiles are "
             f"qualified for seg-vip or seg-cart ({sample.qualified[0]} .. "
             f"{sample.qualified[-1]})")
        check_backfill(first, sample, secret, report)

        items = changes(_now_iso())
        echo(f"\n3. apply {len(items)} changes (changes.ndjson) and stream once more")
        changes_path = write_changes(directory, items)
        result = ingest_files(store, [str(changes_path)], catalogue)
        if result.rejected:
            report.problem(f"{result.rejected} change(s) rejected: {result.rejections[:3]}")
        totals = await _stream_once(stream_flow, config_path)
        echo(f"   stream run: {orjson.dumps(totals).decode()}")
        second = receiver.requests[len(first):]
        by_profile: dict[str, list[dict[str, Any]]] = {}
        for request in second:
            by_profile.setdefault(_pid(request, sample), []).append(request)

        for number, change in enumerate(items, start=1):
            got = by_profile.pop(change.profile, [])
            echo(f"\n   {chr(ord('a') + number - 1)}) {change.title} ({change.profile})")
            for request in got:
                headers = {k.lower(): v for k, v in request["headers"].items()}
                shown = f"; shows {change.shows(request['body'])}" if change.shows else ""
                echo(f"      delivered: POST {request['path']} -> {request['status']}, "
                     f"X-Relay-Sequence {headers.get('x-relay-sequence', '-')}{shown}")
            if not got:
                echo("      delivered: nothing")
            echo(f"      why: {change.why}")
            if len(got) != int(change.expect):
                report.problem(f"{change.title}: expected {int(change.expect)} request(s), "
                               f"got {len(got)}")
            for request in got:
                check_request(request, change.profile, secret, report)
                if change.check and (problem := change.check(request["body"])):
                    report.problem(f"{change.title}: {problem}")
        for pid, extra in by_profile.items():
            report.problem(f"unexpected request(s) for {pid}: {len(extra)}")

        expected = len(sample.qualified) + sum(c.expect for c in items)
        total = len(receiver.requests)
        store.close()
    elapsed = time.monotonic() - started
    echo("")
    if report.problems:
        echo(f"demo FAILED: {len(report.problems)} problem(s); the receiver got {total} "
             f"request(s), {expected} expected ({elapsed:.0f} s)")
    else:
        echo(f"demo OK: the receiver got exactly the {expected} expected requests, every one "
             f"signed (Standard Webhooks) and carrying only mapped attributes ({elapsed:.0f} s)")
    echo(f"look around: profile-relay status -c {config_path}")
    echo(f"             {directory / 'receiver.ndjson'} (what the endpoint received)")
    echo("             the two flow runs: `prefect server start`, then the UI's Runs page")
    return report.problems


def main(directory: Path) -> int:
    return 1 if asyncio.run(run_demo(directory)) else 0

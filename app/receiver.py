"""`profile-relay receiver`: a local endpoint for trying things out.

Accepts a POST on any path, answers 200 (or a fixed status, or a 500 now and then), prints
one line per request and appends each request to an NDJSON record file. ``make_app`` and
:class:`Receiver` let tests and the demo run it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import orjson
from aiohttp import web

RECORD_DEFAULT = "receiver.ndjson"
_DROP_HEADERS = {"authorization", "proxy-authorization"}
REQUESTS: web.AppKey[list[dict[str, Any]]] = web.AppKey("requests", list)


@dataclass
class ReceiverOptions:
    status: int | None = None          # always answer this status
    fail_rate: float = 0.0             # else a 500 with this probability
    record: Path | None = None         # NDJSON file requests are appended to
    echo: TextIO | None = None         # where the one-line summaries go (None: silent)
    seed: int | None = None
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code (100-599), got {self.status}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail rate must be between 0 and 1, got {self.fail_rate}")
        self.rng = random.Random(self.seed)

    def answer(self) -> int:
        if self.status is not None:
            return self.status
        if self.fail_rate and self.rng.random() < self.fail_rate:
            return 500
        return 200


def first_identity(body: Any) -> str:
    """``namespace:id`` of the first identity of the body's identityMap, or ``-``."""
    if isinstance(body, dict) and isinstance(body.get("identityMap"), dict):
        for ns, entries in body["identityMap"].items():
            if isinstance(entries, list):
                for entry in entries:
                    if isinstance(entry, dict) and "id" in entry:
                        return f"{ns}:{entry['id']}"
    return "-"


def segment_summary(body: Any) -> str:
    """``seg:status`` for every segment of the body's segmentMembership.ups."""
    try:
        ups = body["segmentMembership"]["ups"]
    except (KeyError, TypeError):
        return "-"
    if not isinstance(ups, dict) or not ups:
        return "-"
    return ",".join(f"{seg}:{(v or {}).get('status', '?') if isinstance(v, dict) else '?'}"
                    for seg, v in ups.items())


def summary_line(entry: dict[str, Any]) -> str:
    headers = {k.lower(): v for k, v in entry["headers"].items()}
    return (f"{entry['time']} {entry['method']} {entry['path']} -> {entry['status']}  "
            f"profile {first_identity(entry['body'])}  "
            f"segments {segment_summary(entry['body'])}  "
            f"Idempotency-Key {headers.get('idempotency-key', '-')}  "
            f"X-Relay-Sequence {headers.get('x-relay-sequence', '-')}")


def make_app(status: int | None = None, fail_rate: float = 0.0, record: str | Path | None = None,
             echo: TextIO | None = None, seed: int | None = None) -> web.Application:
    """The receiver as an aiohttp app. Every request is also kept in ``app[REQUESTS]``, with
    its raw body under ``raw`` (not recorded to the file)."""
    opts = ReceiverOptions(status=status, fail_rate=fail_rate,
                           record=Path(record) if record is not None else None,
                           echo=echo, seed=seed)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[REQUESTS] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.json_response({"error": "POST only"}, status=405,
                                     headers={"Allow": "POST"})
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        answered = opts.answer()
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": request.method,
            "path": request.path,
            "query": {str(k): v for k, v in request.query.items()},
            "headers": {str(k): v for k, v in request.headers.items()
                        if k.lower() not in _DROP_HEADERS},
            "body": body,
            "status": answered,
        }
        if opts.record is not None:
            line = orjson.dumps(entry) + b"\n"
            with opts.record.open("ab") as fh:  # no await in between: lines never interleave
                fh.write(line)
        app[REQUESTS].append({**entry, "raw": raw})  # in memory only: for signature checks
        if opts.echo is not None:
            print(summary_line(entry), file=opts.echo, flush=True)
        if 200 <= answered < 300:
            return web.json_response({"received": True}, status=answered)
        return web.json_response({"error": f"answering {answered} as asked"}, status=answered)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class Receiver:
    """The receiver on loopback, started and stopped in-process.

    ``async with Receiver(record=path) as r: ... r.url, r.requests``; port 0 picks a free one.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", **options: Any) -> None:
        self.host = host
        self.port = port
        self.app = make_app(**options)
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.app[REQUESTS]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def serve_until_stopped(port: int, host: str, status: int | None, fail_rate: float,
                              record: Path, echo: TextIO = sys.stdout, seed: int | None = None,
                              on_ready: Callable[[Receiver], None] | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the number of requests received."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not possible outside the main thread or on Windows: Ctrl-C then ends via KeyboardInterrupt
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    receiver = Receiver(port=port, host=host, status=status, fail_rate=fail_rate, record=record,
                        echo=echo, seed=seed)
    await receiver.start()
    try:
        if on_ready:
            on_ready(receiver)
        await stop.wait()
    finally:
        await receiver.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return len(receiver.requests)

"""Ingest: NDJSON lines -> validated fragments -> the store, one transaction per batch."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, Queue
from threading import Thread
from typing import BinaryIO

from state import Store
from state.db import now_ms
from state.model import Fragment
from tasks.fragments import MAX_LINE_BYTES, FragmentError, parse_fragment

BATCH_LINES = 5_000
STDIN_LINGER_SECONDS = 0.2  # a live feed on stdin is committed at least this often
BATCH_BYTES = 32 << 20  # a batch of long lines is cut short so memory stays bounded


@dataclass
class Rejection:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class IngestResult:
    ingested: int = 0
    rejected: int = 0
    last_seq: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def _lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | int]]:
    """Numbered non-blank lines. A line over the size limit is never held whole in
    memory: the rest of it is skipped and its length (an int) stands in for it."""
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            total = len(line)
            while chunk := stream.readline(1 << 20):
                total += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield number, total
        elif line.strip():
            yield number, line


def _batches(stream: BinaryIO, size: int,
             linger: float | None = None) -> Iterator[list[tuple[int, bytes | int]]]:
    """Lines in batches of ``size`` (or BATCH_BYTES). With ``linger`` (a pipe, where lines
    trickle in), a batch is also cut when its first line has waited that long, so a slow
    producer's changes are committed within about ``linger`` seconds, not ``size`` lines."""
    source: Iterator[tuple[int, bytes | int] | None]
    source = _lines(stream) if linger is None else _timed(_lines(stream), linger)
    batch: list[tuple[int, bytes | int]] = []
    held = 0
    for item in source:
        if item is not None:
            batch.append(item)
            held += len(item[1]) if isinstance(item[1], bytes) else 0
        if batch and (item is None or len(batch) >= size or held >= BATCH_BYTES):
            yield batch
            batch = []
            held = 0
    if batch:
        yield batch


_END = object()


def _timed(lines: Iterator[tuple[int, bytes | int]],
           linger: float) -> Iterator[tuple[int, bytes | int] | None]:
    """Lines read by a thread; ``None`` marks a pause of ``linger`` seconds with a batch
    open, which tells ``_batches`` to commit what it has."""
    queue: Queue = Queue(maxsize=BATCH_LINES * 4)

    def read() -> None:
        try:
            for line in lines:
                queue.put(line)
        finally:
            queue.put(_END)

    Thread(target=read, name="ingest-reader", daemon=True).start()
    opened: float | None = None
    while True:
        timeout = None if opened is None else max(0.0, opened + linger - time.monotonic())
        try:
            item = queue.get(timeout=timeout)
        except Empty:
            opened = None
            yield None
            continue
        if item is _END:
            return
        opened = opened or time.monotonic()
        yield item


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one batch. Parsing allocates hundreds of
    thousands of JSON containers that live until the batch is written, and each automatic
    collection would walk them all again (about 3/4 of the parse time, measured); they hold
    no reference cycles, so reference counting frees them either way."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def ingest_stream(
    store: Store,
    stream: BinaryIO,
    source: str,
    catalogue: frozenset[str],
    result: IngestResult | None = None,
    on_reject: Callable[[Rejection], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    batch_lines: int = BATCH_LINES,
    linger: float | None = None,
) -> IngestResult:
    """Ingest one NDJSON stream. Bad lines are reported and skipped, good ones kept.
    ``linger``: for a live pipe, commit at least this often (seconds) while lines trickle in."""
    result = result or IngestResult()
    for batch in _batches(stream, batch_lines, linger):
        now = now_ms()
        good: list[Fragment] = []
        with _gc_paused():
            for number, line in batch:
                try:
                    if isinstance(line, int):
                        raise FragmentError(
                            f"line is {line} bytes, over the {MAX_LINE_BYTES} byte limit")
                    good.append(parse_fragment(line, catalogue, now))
                except FragmentError as exc:
                    rejection = Rejection(source, number, str(exc))
                    result.rejected += 1
                    if len(result.rejections) < 1000:
                        result.rejections.append(rejection)
                    if on_reject:
                        on_reject(rejection)
            if good:
                result.last_seq = store.append_changes(good)
                result.ingested += len(good)
            del good
        if on_progress:
            on_progress(sum(line if isinstance(line, int) else len(line) for _, line in batch))
    return result


def ingest_files(
    store: Store,
    paths: Iterable[str],
    catalogue: frozenset[str],
    on_reject: Callable[[Rejection], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Ingest files in order; ``-`` reads standard input."""
    result = IngestResult()
    for path in paths:
        if path == "-":
            ingest_stream(store, sys.stdin.buffer, "<stdin>", catalogue, result, on_reject,
                          on_progress, linger=STDIN_LINGER_SECONDS)
            continue
        with open(path, "rb") as fh:
            ingest_stream(store, fh, path, catalogue, result, on_reject, on_progress)
    return result

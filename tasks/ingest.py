"""Ingest: NDJSON lines -> validated fragments -> the store, one transaction per batch.

A batch (``BATCH_LINES`` lines or ``BATCH_BYTES`` bytes, whichever comes first; in a pipe
also whatever came before a pause) is one transaction. Inside it, lines are read, parsed
and handed to the store a group at a time (``GROUP_LINES`` lines or ``GROUP_BYTES``
bytes), so neither the batch's lines nor its decoded fragments are ever held at once:
memory follows the group, not the batch.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, Queue
from threading import Condition, Thread
from typing import BinaryIO

from state import Store
from state.db import now_ms
from state.model import Fragment
from tasks.fragments import MAX_LINE_BYTES, FragmentError, parse_fragment

# 20,000 lines a transaction: 1.3x the rate of 5,000 (bench/ingest.py), since each profile
# page written is written once per commit whatever number of its rows changed
BATCH_LINES = 20_000
BATCH_BYTES = 32 << 20  # a batch of long lines is cut short so a transaction stays bounded
GROUP_LINES = 2_000
GROUP_BYTES = 256 << 10  # what is decoded at once: a group, whatever the batch
STDIN_LINGER_SECONDS = 0.2  # a live feed on stdin is committed at least this often
READ_AHEAD_BYTES = 8 << 20  # what the reader of a pipe may hold before it is taken
READ_BLOCK = 1 << 20


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


Line = tuple[int, bytes | None, int]  # number, the line (None: over the limit), bytes read


def _lines(stream: BinaryIO) -> Iterator[Line]:
    """Numbered non-blank lines, their line feed dropped, with the bytes each took. Read
    in blocks and split (about 10x cheaper than a readline per line). A line over the size
    limit (line feed included) is never held whole in memory: the rest of it is skipped and
    None stands in for it. ``read1`` returns what a pipe has, so a live feed is not held
    back waiting for a full block."""
    read = getattr(stream, "read1", stream.read)
    number = 0
    rest = b""
    skipping = 0  # bytes of an over-long line seen so far
    while block := read(READ_BLOCK):
        if skipping:
            end = block.find(b"\n")
            if end < 0:
                skipping += len(block)
                continue
            number += 1
            yield number, None, skipping + end + 1
            skipping = 0
            block = block[end + 1:]
        lines = (rest + block).split(b"\n") if rest else block.split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if len(line) >= MAX_LINE_BYTES:
                yield number, None, len(line) + 1
            elif line.strip():
                yield number, line, len(line) + 1
            # a blank line is counted, not yielded
        if len(rest) > MAX_LINE_BYTES:
            skipping, rest = len(rest), b""
    if skipping:
        yield number + 1, None, skipping
    elif rest:
        number += 1
        if len(rest) > MAX_LINE_BYTES:
            yield number, None, len(rest)
        elif rest.strip():
            yield number, rest, len(rest)


_END = object()


def _timed(lines: Iterator[Line], linger: float) -> Iterator[Line | None]:
    """Lines read by a thread; ``None`` marks a pause of ``linger`` seconds with a batch
    open, which tells the batch to commit what it has. The thread stops reading ahead once
    it holds ``READ_AHEAD_BYTES`` not yet taken."""
    queue: Queue = Queue()
    room = Condition()
    held = [0]

    def read() -> None:
        try:
            for item in lines:
                size = item[2]
                with room:
                    room.wait_for(lambda: held[0] < READ_AHEAD_BYTES)
                    held[0] += size
                queue.put((item, size))
        finally:
            queue.put(_END)

    Thread(target=read, name="ingest-reader", daemon=True).start()
    opened: float | None = None
    while True:
        timeout = None if opened is None else max(0.0, opened + linger - time.monotonic())
        try:
            got = queue.get(timeout=timeout)
        except Empty:
            opened = None
            yield None
            continue
        if got is _END:
            return
        item, size = got
        with room:
            held[0] -= size
            room.notify()
        opened = opened or time.monotonic()
        yield item


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one batch. Parsing allocates hundreds of
    thousands of JSON containers that live until their group is written, and each
    automatic collection would walk them all again (about 3/4 of the parse time, measured);
    they hold no reference cycles, so reference counting frees them either way."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Batch:
    """One batch's lines, parsed as the store asks for its groups."""

    def __init__(self, items: Iterator[Line | None], size: int,
                 catalogue: frozenset[str], reject: Callable[[int, str], None]) -> None:
        self.items = items
        self.size = size
        self.catalogue = catalogue
        self.reject = reject
        self.now = now_ms()
        self.bytes = 0       # read so far, good lines and bad
        self.good = 0
        self.ended = False   # the stream has no more lines

    def groups(self) -> Iterator[list[Fragment]]:
        """The batch's good fragments, a group at a time; rejected lines are reported as
        they are met."""
        group: list[Fragment] = []
        group_bytes = lines = 0
        catalogue, now = self.catalogue, self.now
        for item in self.items:
            if item is None:  # a pause in a pipe: commit what came before it
                if lines:
                    break
                continue
            number, line, size = item
            lines += 1
            self.bytes += size
            group_bytes += size
            try:
                if line is None:
                    raise FragmentError(
                        f"line is {size} bytes, over the {MAX_LINE_BYTES} byte limit")
                group.append(parse_fragment(line, catalogue, now))
            except FragmentError as exc:
                self.reject(number, str(exc))
            if len(group) >= GROUP_LINES or group_bytes >= GROUP_BYTES:
                if group:
                    self.good += len(group)
                    yield group
                group = []
                group_bytes = 0
            if lines >= self.size or self.bytes >= BATCH_BYTES:
                break
        else:
            self.ended = True
        if group:
            self.good += len(group)
            yield group


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

    def reject(number: int, reason: str) -> None:
        rejection = Rejection(source, number, reason)
        result.rejected += 1
        if len(result.rejections) < 1000:
            result.rejections.append(rejection)
        if on_reject:
            on_reject(rejection)

    items = _lines(stream) if linger is None else _timed(_lines(stream), linger)
    while True:
        batch = _Batch(items, batch_lines, catalogue, reject)
        with _gc_paused():
            groups = batch.groups()
            first = next(groups, None)  # parsed before the transaction opens
            if first is not None:
                result.last_seq = store.append_change_groups(itertools.chain((first,), groups))
                result.ingested += batch.good
            del first, groups
        if on_progress and batch.bytes:
            on_progress(batch.bytes)
        if batch.ended:
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

"""Prefect's temporary server, started under a file lock the first time in a PREFECT_HOME.

Without ``PREFECT_API_URL``, a command that runs a flow (``stream``, ``backfill``,
``replay``) starts Prefect's temporary server on the database in ``PREFECT_HOME``. The
first start there creates the database and registers Prefect's block types; two commands
started at once on a fresh ``PREFECT_HOME`` both insert them, and one server logs an ERROR
traceback (``UNIQUE constraint failed: block_type.slug``) before both recover. So the first
start is made here, holding an exclusive lock on a file in ``PREFECT_HOME`` until the server
answers; a marker file then records that the home is ready (per Prefect version: an
upgrade registers new block types), and later starts take no lock. The flow's client
reuses the server started here (Prefect keeps one temporary server per process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".profile-relay-server-start.lock"
LOCK_WAIT_SECONDS = 300.0  # a first start migrates the database: ~15 s, more on a busy machine
logger = logging.getLogger("profile_relay.tempserver")


def _ready_marker(home: Path) -> Path:
    from importlib.metadata import version

    return home / f".profile-relay-server-ready-{version('prefect')}"


def _database_file() -> Path | None:
    """The SQLite file of the server's database, None for another database."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value() or "")
    scheme, _, rest = url.partition(":///")
    return Path(rest) if scheme.startswith("sqlite") and rest else None


def needs_first_start() -> bool:
    """True when no API URL is set and this PREFECT_HOME has not seen a temporary server
    start yet (no marker, or no database file)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return False
    home = Path(PREFECT_HOME.value()).expanduser()
    database = _database_file()
    return not _ready_marker(home).exists() or (database is not None and not database.exists())


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if this process dies);
    yields False when it could not be had within ``timeout`` (or on a system without
    ``flock``): the caller goes on without it, as it would have without this module."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning("%s stayed locked for %.0f s; starting without it", path,
                                   timeout)
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def start_temporary_server(wait: float = LOCK_WAIT_SECONDS) -> bool:
    """Start Prefect's temporary server now if this is the first start in PREFECT_HOME,
    holding the home's lock until it answers. Returns True when it started one here."""
    if not needs_first_start():
        return False
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    with _exclusive(home / LOCK_FILE, wait):
        if not needs_first_start():  # another command made the first start meanwhile
            return False
        SubprocessASGIServer().start()  # the flow's client reuses this one
        _ready_marker(home).touch()
        return True

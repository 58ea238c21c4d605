"""A real, throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a
temporary folder, on a free port, with its unix socket in that folder.

Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the
server lives for one test session and its data is thrown away. ``pg_ctl`` refuses to run
as root, so as root the folder is handed to the ``postgres`` user and every server command
runs through ``runuser -u postgres``. The binaries are found in PATH or in
``/usr/lib/postgresql/*/bin`` (Debian's layout); ``apt-get install -y postgresql`` brings
them (``make test`` and ``.ci/run`` do that when they are missing).

    with PostgresServer() as server:
        url = server.create_database("t1")          # postgresql://postgres@/t1?host=...
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200 -c shared_buffers=32MB -c log_min_messages=warning")
START_ATTEMPTS = 3  # a free port can be taken by another process before the server binds it


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started; the message says why."""


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's layout
    (newest version first)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise PostgresUnavailable("initdb and pg_ctl not found in PATH or /usr/lib/postgresql/*/bin "
                              "(apt-get install -y postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, started by :meth:`start` and removed
    by :meth:`stop`. ``superuser`` connects without a password (trust, local only)."""

    superuser = "postgres"

    def __init__(self, parent: str | Path | None = None, settings: str = "") -> None:
        """``settings``: more server options, as ``-c name=value`` words."""
        self.bindir = find_binaries()
        self.settings = f"{SERVER_SETTINGS} {settings}".strip()
        self.folder = Path(tempfile.mkdtemp(prefix="relay-pg-", dir=parent))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        self.as_root = os.geteuid() == 0

    # -- running commands ----------------------------------------------------------------

    def _cmd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            argv = ["runuser", "-u", self.superuser, "--", *argv]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=True, cwd=self.folder)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{args[0]} failed (exit {exc.returncode}): "
                                      + " | ".join(detail)) from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{args[0]} could not run: {exc}") from None

    def start(self) -> PostgresServer:
        if self.as_root:
            try:
                shutil.chown(self.folder, self.superuser, self.superuser)
            except (LookupError, OSError) as exc:
                raise PostgresUnavailable(f"running as root, but the folder cannot be handed "
                                          f"to user {self.superuser!r}: {exc}") from None
            os.chmod(self.folder, 0o700)
        atexit.register(self.stop)  # a script or test process that dies of an exception
        self._cmd("initdb", "-D", str(self.data), "-U", self.superuser, "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        problem = ""
        for _ in range(START_ATTEMPTS):
            self.port = _free_port()
            try:
                self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                          "-o", f"-p {self.port} -k {self.folder} -h 127.0.0.1 {self.settings}",
                          "start")
                return self
            except PostgresUnavailable as exc:
                problem = f"{exc}; server log: {self._log_tail()}"
                time.sleep(0.1)
        raise PostgresUnavailable(problem)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(none)"

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove the folder; a
        second call does nothing."""
        if self.port and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresUnavailable):
                self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, tcp: bool = False, user: str | None = None,
            password: str | None = None, schema: str | None = None) -> str:
        """A connection URL; by default over the unix socket in the server's folder.
        ``schema``: the connection's search_path is that schema alone."""
        auth = user or self.superuser
        if password is not None:
            auth += f":{password}"
        options = f"options=-csearch_path%3D{schema}" if schema else ""
        if tcp:
            return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}" + (
                f"?{options}" if options else "")
        return (f"postgresql://{auth}@/{database}?host={self.folder}&port={self.port}"
                + (f"&{options}" if options else ""))

    def execute(self, statement: str, database: str = "postgres") -> None:
        """One statement as the superuser, outside a transaction (CREATE DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)

    def create_schema(self, database: str, name: str) -> str:
        """A new, empty schema in ``database``; returns a URL whose search_path is it
        (about 5 ms, against about 100 ms for a database copied from a template)."""
        self.execute(f'CREATE SCHEMA "{name}"', database)
        return self.url(database, schema=name)

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of ``template`` when given); returns its URL."""
        clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        self.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


__all__ = ["PostgresServer", "PostgresUnavailable", "find_binaries"]

"""Leases: who owns a dataflow's shard group, with an epoch that grows on every change of
owner, so a writer can tell that it lost ownership."""

from __future__ import annotations

import os
import socket

import sqlite_utils

from state.db import write_txn

WORKER_ENV = "PREFECT__WORKER_NAME"  # a Prefect worker sets it in the flow runs it starts


def machine() -> str:
    """Where this process runs, for placing standbys apart from their active runs: the
    Prefect worker that started it (one per machine), else the host."""
    return os.environ.get(WORKER_ENV) or socket.gethostname()


def owner_id(run: str) -> str:
    """An owner name that says where the owner runs: host, process id, ``run``, then the
    machine after an ``@``."""
    return f"{socket.gethostname()}:{os.getpid()}:{run}@{machine()}"


def machine_of(owner: str) -> str:
    """The machine an owner name says (its host for names without one)."""
    return owner.rpartition("@")[2] if "@" in owner else owner.partition(":")[0]


def _gone(owner: str) -> bool:
    """An owner on this host whose process has exited: its lease need not run out. (The
    embedded store lives on one machine, so a restart after a crash takes over at once.)"""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(db: sqlite_utils.Database, dataflow: str, group: int, owner: str, ttl_ms: int,
            now: int) -> int | None:
    """Take or renew the lease; returns its epoch, or None while another owner holds it.
    Renewing keeps the epoch; taking over an expired lease increments it."""
    with write_txn(db) as conn:
        row = conn.execute("SELECT owner, epoch, expires_at FROM leases WHERE dataflow = ? "
                           "AND grp = ?", (dataflow, group)).fetchone()
        if row is None:
            epoch = 1
            conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?)",
                         (dataflow, group, owner, epoch, now + ttl_ms))
            return epoch
        held_by, epoch, expires_at = row
        if held_by != owner:
            if expires_at > now and not _gone(held_by):
                return None
            epoch += 1
        conn.execute("UPDATE leases SET owner = ?, epoch = ?, expires_at = ? WHERE dataflow = ? "
                     "AND grp = ?", (owner, epoch, now + ttl_ms, dataflow, group))
        return epoch


def holds(db: sqlite_utils.Database, dataflow: str, group: int, epoch: int, now: int) -> bool:
    row = db.conn.execute("SELECT epoch, expires_at FROM leases WHERE dataflow = ? AND grp = ?",
                          (dataflow, group)).fetchone()
    return row is not None and row[0] == epoch and row[1] > now


def release(db: sqlite_utils.Database, dataflow: str, group: int, owner: str) -> None:
    """Let the lease lapse at once, so the next owner need not wait for the TTL."""
    with write_txn(db) as conn:
        conn.execute("UPDATE leases SET expires_at = 0 WHERE dataflow = ? AND grp = ? "
                     "AND owner = ?", (dataflow, group, owner))

"""The profile store's write path (ingest) and its reads (payloads, backfill).

A profile is one row (state/schema.py, migration 6): attributes, identity map and segment
statuses as orjson documents, and ``qualified``, its qualified segments as a framed string.
A batch of fragments reads the rows of the profiles it touches once, merges in Python, and
writes each touched row once plus one change-log row per fragment: no row per membership.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import sqlite_utils

from state.db import now_ms, shard_of, write_txn
from state.model import (
    QUALIFIED,
    Fragment,
    StoredProfile,
    deep_merge,
    leaf_paths,
    merge_identities,
)

_EMPTY = b"{}"
_EMPTIES = (_EMPTY, "{}")  # a document the store holds as text (migration 6) reads as str
_dumps = orjson.dumps
_loads = orjson.loads

_INSERT_CHANGES = (
    "INSERT INTO changes (profile_id, shard, ts, committed_at, attr_paths, identities, "
    "identity_changed, segments) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_PROFILES = (
    "INSERT INTO profiles (profile_id, shard, attributes, identity_map, segments, qualified, "
    "created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (profile_id) DO UPDATE SET attributes = excluded.attributes, "
    "identity_map = excluded.identity_map, segments = excluded.segments, "
    "qualified = excluded.qualified, updated_at = excluded.updated_at, "
    "last_seq = excluded.last_seq")


def _json_list(values: Iterable[str]) -> str:
    return orjson.dumps(list(values)).decode()


def qualified_of(segments: dict[str, Any]) -> str:
    """The ``qualified`` column for a segments document: the segments whose status is
    realized or existing, sorted, each between line feeds ("" for none), so one
    ``instr(qualified, char(10) || segment || char(10))`` tells a member."""
    keys = sorted(seg for seg, entry in segments.items() if entry[0] in QUALIFIED)
    return "\n" + "\n".join(keys) + "\n" if keys else ""


def _clean(encoded: bytes) -> bool:
    """Whether an encoded attributes patch holds no null and no empty object, so merging it
    into an empty profile gives the patch itself. (A string holding ``null`` or ``{}`` only
    sends it the long way, through ``deep_merge``.)"""
    return b"null" not in encoded and b"{}" not in encoded


class _State:
    """A touched profile while a group of fragments is merged. Each document stays as the
    bytes (or text) read from the store until a fragment needs it decoded, and is encoded again only
    if it was decoded: a fragment that writes only segments leaves the attributes' bytes
    alone."""

    __slots__ = ("attrs", "created", "ids", "last", "qualified", "requalify", "segs")

    def __init__(self, attrs: Any, ids: Any, segs: Any, created: int, qualified: str) -> None:
        self.attrs = attrs
        self.ids = ids
        self.segs = segs
        self.created = created
        self.qualified = qualified
        self.requalify = False
        self.last = 0


def apply_fragments(db: sqlite_utils.Database, fragments: Sequence[Fragment]) -> int:
    """Merge fragments, in order, into the store and append one change-log row each,
    all in one transaction. Returns the last change seq written."""
    return apply_fragment_groups(db, (fragments,))


def apply_fragment_groups(db: sqlite_utils.Database,
                          groups: Iterable[Sequence[Fragment]]) -> int:
    """``apply_fragments`` for a batch handed over in groups: every group in one
    transaction, each merged and written before the next is taken, so a caller that parses
    lines as the groups are asked for never holds a whole batch decoded. Returns the last
    change seq written (0 when no group held a fragment)."""
    last_seq = 0
    with write_txn(db) as conn:
        for fragments in groups:
            if fragments:
                last_seq = _apply_group(conn, fragments)
    return last_seq


def _apply_group(conn: Any, fragments: Sequence[Fragment]) -> int:
    ids = list(dict.fromkeys(f.profile_id for f in fragments))
    states: dict[str, _State] = {
        pid: _State(attrs, idmap, segs, created, qualified)
        for pid, attrs, idmap, segs, created, qualified in conn.execute(
            "SELECT profile_id, attributes, identity_map, segments, created_at, qualified "
            "FROM profiles WHERE profile_id IN (SELECT value FROM json_each(?))",
            (_json_list(ids),))
    }
    committed = now_ms()
    changes = []
    shards = {pid: shard_of(pid) for pid in ids}
    for frag in fragments:
        pid = frag.profile_id
        state = states.get(pid)
        if state is None:
            state = states[pid] = _State(_EMPTY, _EMPTY, _EMPTY, committed, "")
        paths = None
        attributes = frag.attributes
        if attributes:
            held = state.attrs
            if held.__class__ is not dict:
                if held in _EMPTIES:
                    encoded = _dumps(attributes)
                    if _clean(encoded):
                        held = encoded  # the patch is the whole document: no merge
                    else:
                        held = {}
                        deep_merge(held, attributes)
                else:
                    held = _loads(held)
                    deep_merge(held, attributes)
            else:
                deep_merge(held, attributes)
            state.attrs = held
            written = frag.paths if frag.paths is not None else leaf_paths(attributes)
            paths = "\n".join(written) or None
        identities = frag.identities
        identity_changed = 0
        identities_json = None
        if identities:
            held = state.ids
            if held.__class__ is not dict:
                held = state.ids = _loads(held)
            identity_changed = int(merge_identities(held, identities))
            identities_json = _dumps(identities).decode()
        segments_json = None
        if frag.segments:
            held = state.segs
            if held.__class__ is not dict:
                held = state.segs = _loads(held)
            statuses = {}
            for seg, entry in frag.segments.items():
                before = held.get(seg)
                held[seg] = entry
                statuses[seg] = entry[0]
                if before is None or (before[0] in QUALIFIED) != (entry[0] in QUALIFIED):
                    state.requalify = True
            segments_json = _dumps(statuses).decode()
        changes.append((pid, shards[pid], frag.ts, committed, paths, identities_json,
                        identity_changed, segments_json))
    conn.executemany(_INSERT_CHANGES, changes)
    last_seq = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
    # seqs of one transaction are consecutive (AUTOINCREMENT, under the write lock)
    seq = last_seq - len(changes)
    for row in changes:
        seq += 1
        states[row[0]].last = seq
    rows = []
    for pid in sorted(states):  # key order: neighbouring rows share pages
        state = states[pid]
        if not state.last:
            continue
        attrs, idmap, segs = state.attrs, state.ids, state.segs
        qualified = state.qualified
        if state.requalify:
            qualified = qualified_of(segs)
        rows.append((pid, shards[pid],
                     _dumps(attrs) if attrs.__class__ is dict else attrs,
                     _dumps(idmap) if idmap.__class__ is dict else idmap,
                     _dumps(segs) if segs.__class__ is dict else segs,
                     qualified, state.created, committed, state.last))
    conn.executemany(_UPSERT_PROFILES, rows)
    return last_seq


def load_profiles(db: sqlite_utils.Database, profile_ids: Sequence[str]) -> dict[str, StoredProfile]:
    """The merged state of these profiles, for building payloads."""
    if not profile_ids:
        return {}
    return {
        pid: StoredProfile(pid, _loads(attrs), _loads(idmap),
                           {seg: tuple(entry) for seg, entry in _loads(segs).items()}, last_seq)
        for pid, attrs, idmap, segs, last_seq in db.conn.execute(
            "SELECT profile_id, attributes, identity_map, segments, last_seq FROM profiles "
            "WHERE profile_id IN (SELECT value FROM json_each(?))", (_json_list(profile_ids),))
    }


def profile_count(db: sqlite_utils.Database) -> int:
    return db.conn.execute("SELECT count(*) FROM profiles").fetchone()[0]

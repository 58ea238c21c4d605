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
_INSERT_PROFILES = (
    "INSERT INTO profiles (profile_id, shard, attributes, identity_map, segments, qualified, "
    "created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# The segment statuses a group wrote are patched into the stored document by SQLite
# (json_patch: new keys added, written ones replaced), so ingest never decodes it.
_UPDATE_PROFILES = (
    "UPDATE profiles SET attributes = ?, identity_map = ?, segments = CASE WHEN ?3 IS NULL "
    "THEN segments ELSE json_patch(CAST(segments AS TEXT), ?3) END, qualified = ?, "
    "updated_at = ?, last_seq = ? WHERE profile_id = ?")


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


def _requalified(qualified: str, patch: dict[str, tuple[str, str]]) -> str:
    """``qualified`` after the statuses of ``patch``, or itself when no qualification
    flipped (the usual case: realized -> existing, or the same status again)."""
    if all((f"\n{seg}\n" in qualified) == (entry[0] in QUALIFIED) for seg, entry in patch.items()):
        return qualified
    members = set(qualified[1:-1].split("\n")) if qualified else set()
    for seg, entry in patch.items():
        if entry[0] in QUALIFIED:
            members.add(seg)
        else:
            members.discard(seg)
    return "\n" + "\n".join(sorted(members)) + "\n" if members else ""


class _State:
    """A touched profile while a group of fragments is merged. The attributes and the
    identity map stay the bytes read from the store until a fragment needs them decoded,
    and are encoded again only if they were; the segment statuses written are only
    collected (``patch``), for SQLite to merge into the stored document."""

    __slots__ = ("attrs", "created", "exists", "ids", "last", "patch", "qualified")

    def __init__(self, attrs: Any, ids: Any, created: int, qualified: str, exists: bool) -> None:
        self.attrs = attrs
        self.ids = ids
        self.created = created
        self.qualified = qualified
        self.exists = exists
        self.patch: dict[str, tuple[str, str]] | None = None
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
        pid: _State(attrs, idmap, created, qualified, True)
        for pid, attrs, idmap, created, qualified in conn.execute(
            "SELECT profile_id, attributes, identity_map, created_at, qualified "
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
            state = states[pid] = _State(_EMPTY, _EMPTY, committed, "", False)
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
        segments = frag.segments
        if segments:
            if state.patch is None:
                state.patch = dict(segments)
            else:
                state.patch.update(segments)
            segments_json = _dumps({seg: entry[0] for seg, entry in segments.items()}).decode()
        changes.append((pid, shards[pid], frag.ts, committed, paths, identities_json,
                        identity_changed, segments_json))
    conn.executemany(_INSERT_CHANGES, changes)
    last_seq = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
    # seqs of one transaction are consecutive (AUTOINCREMENT, under the write lock)
    seq = last_seq - len(changes)
    for row in changes:
        seq += 1
        states[row[0]].last = seq
    inserts, updates = [], []
    for pid in sorted(states):  # key order: neighbouring rows share pages
        state = states[pid]
        attrs, idmap, patch = state.attrs, state.ids, state.patch
        attrs = _dumps(attrs) if attrs.__class__ is dict else attrs
        idmap = _dumps(idmap) if idmap.__class__ is dict else idmap
        qualified = state.qualified if patch is None else _requalified(state.qualified, patch)
        if state.exists:
            updates.append((attrs, idmap, None if patch is None else _dumps(patch).decode(),
                            qualified, committed, state.last, pid))
        else:
            inserts.append((pid, shards[pid], attrs, idmap,
                            "{}" if patch is None else _dumps(patch).decode(), qualified,
                            state.created, committed, state.last))
    if inserts:
        conn.executemany(_INSERT_PROFILES, inserts)
    if updates:
        conn.executemany(_UPDATE_PROFILES, updates)
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

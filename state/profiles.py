"""The profile store's write path (ingest) and its reads (payloads, backfill)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import orjson
import sqlite_utils

from state.db import now_ms, shard_of, write_txn
from state.model import Fragment, StoredProfile, deep_merge, leaf_paths, merge_identities


def _json_list(values: Iterable[str]) -> str:
    return orjson.dumps(list(values)).decode()


def apply_fragments(db: sqlite_utils.Database, fragments: Sequence[Fragment]) -> int:
    """Merge fragments, in order, into the store and append one change-log row each,
    all in one transaction. Returns the last change seq written."""
    if not fragments:
        return 0
    ids = {f.profile_id for f in fragments}
    with write_txn(db) as conn:
        existing = {
            pid: [orjson.loads(attrs), orjson.loads(idmap), created]
            for pid, attrs, idmap, created in conn.execute(
                "SELECT profile_id, attributes, identity_map, created_at FROM profiles "
                "WHERE profile_id IN (SELECT value FROM json_each(?))", (_json_list(ids),))
        }
        committed = now_ms()
        changes = []
        shards: dict[str, int] = {}
        segment_rows: dict[tuple[str, str], tuple[str, str, str, str]] = {}
        for frag in fragments:
            state = existing.get(frag.profile_id)
            if state is None:
                state = existing[frag.profile_id] = [{}, {}, committed]
            paths = None
            if frag.attributes:
                deep_merge(state[0], frag.attributes)
                written = frag.paths if frag.paths is not None else leaf_paths(frag.attributes)
                paths = "\n".join(written) or None
            identity_changed = int(bool(frag.identities) and merge_identities(state[1],
                                                                              frag.identities))
            for seg, (status, lqt) in frag.segments.items():
                segment_rows[(frag.profile_id, seg)] = (frag.profile_id, seg, status, lqt)
            shard = shards.get(frag.profile_id)
            if shard is None:
                shard = shards[frag.profile_id] = shard_of(frag.profile_id)
            changes.append((
                frag.profile_id, shard, frag.ts, committed, paths,
                orjson.dumps(frag.identities).decode() if frag.identities else None,
                identity_changed,
                orjson.dumps({s: v[0] for s, v in frag.segments.items()}).decode()
                if frag.segments else None,
            ))
        cur = conn.executemany(
            "INSERT INTO changes (profile_id, shard, ts, committed_at, attr_paths, identities, "
            "identity_changed, segments) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", changes)
        last_seq = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
        del cur
        last_by_profile: dict[str, int] = {}
        first = last_seq - len(changes) + 1
        for offset, row in enumerate(changes):
            last_by_profile[row[0]] = first + offset
        conn.executemany(
            "INSERT INTO profiles (profile_id, shard, attributes, identity_map, created_at, "
            "updated_at, last_seq) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (profile_id) DO UPDATE "
            "SET attributes = excluded.attributes, identity_map = excluded.identity_map, "
            "updated_at = excluded.updated_at, last_seq = excluded.last_seq",
            [(pid, shards[pid], orjson.dumps(a), orjson.dumps(i), created, committed,
              last_by_profile[pid]) for pid, (a, i, created) in existing.items()
             if pid in last_by_profile])
        if segment_rows:
            conn.executemany(
                "INSERT INTO profile_segments (profile_id, segment_id, status, "
                "last_qualification_time) VALUES (?, ?, ?, ?) ON CONFLICT (profile_id, segment_id) "
                "DO UPDATE SET status = excluded.status, "
                "last_qualification_time = excluded.last_qualification_time",
                list(segment_rows.values()))
    return last_seq


def load_profiles(db: sqlite_utils.Database, profile_ids: Sequence[str]) -> dict[str, StoredProfile]:
    """The merged state of these profiles, for building payloads."""
    if not profile_ids:
        return {}
    arg = (_json_list(profile_ids),)
    conn = db.conn
    out = {
        pid: StoredProfile(pid, orjson.loads(attrs), orjson.loads(idmap), {}, last_seq)
        for pid, attrs, idmap, last_seq in conn.execute(
            "SELECT profile_id, attributes, identity_map, last_seq FROM profiles "
            "WHERE profile_id IN (SELECT value FROM json_each(?))", arg)
    }
    for pid, seg, status, lqt in conn.execute(
            "SELECT profile_id, segment_id, status, last_qualification_time FROM profile_segments "
            "WHERE profile_id IN (SELECT value FROM json_each(?))", arg):
        if pid in out:
            out[pid].segments[seg] = (status, lqt)
    return out


def profile_count(db: sqlite_utils.Database) -> int:
    return db.conn.execute("SELECT count(*) FROM profiles").fetchone()[0]

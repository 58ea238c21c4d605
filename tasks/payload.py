"""Export payloads: the seed's JSON for one profile and one dataflow, encoded with orjson."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from destinations.config import Config, Dataflow, Segment
from state.profiles import StoredProfile


@dataclass(frozen=True)
class PayloadSpec:
    """Everything a payload needs besides the profile, computed once per dataflow pass."""

    attribute_paths: tuple[tuple[str, ...], ...]
    include_names: bool
    include_timestamps: bool
    catalogue: Mapping[str, Segment]
    mapping_times: Mapping[str, tuple[int, int]]

    @classmethod
    def for_dataflow(cls, config: Config, flow: Dataflow,
                     mapping_times: Mapping[str, tuple[int, int]]) -> PayloadSpec:
        dest = config.destination(flow.destination)
        return cls(
            attribute_paths=tuple(tuple(p.split(".")) for p in flow.attributes),
            include_names=dest.include_segment_names,
            include_timestamps=dest.include_segment_timestamps,
            catalogue={s.id: s for s in config.segments},
            mapping_times=dict(mapping_times),
        )


def idempotency_key(dataflow: str, profile_id: str, seq: int, body: bytes) -> str:
    """Stable per export: fixed when the export is decided and kept on every retry and
    replay. The body's digest is part of it, so the same state sent with other content
    (a backfill for a newly mapped segment adds its mapping times) gets its own key, while
    the very same content always gets the same one and a receiver may drop it."""
    text = f"{dataflow}\0{profile_id}\0{seq}\0".encode() + hashlib.sha256(body).digest()
    digest = hashlib.sha256(text).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _pick(attributes: dict[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths:
        node: Any = attributes
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            set_path(out, path, node)
    return out


def set_path(doc: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Put ``value`` at ``path`` in ``doc``, making the objects on the way."""
    for key in path[:-1]:
        child = doc.get(key)
        if not isinstance(child, dict):
            child = doc[key] = {}
        doc = child
    doc[path[-1]] = value


def segment_extras(seg_id: str, spec: PayloadSpec) -> dict[str, Any]:
    """What the destination's options add to a segment's entry, after its status."""
    entry: dict[str, Any] = {}
    meta = spec.catalogue.get(seg_id)
    if spec.include_timestamps:
        if meta is not None and meta.createdAt is not None:
            entry["createdAt"] = meta.createdAt
        if meta is not None and meta.updatedAt is not None:
            entry["updatedAt"] = meta.updatedAt
        if seg_id in spec.mapping_times:
            entry["mappingCreatedAt"], entry["mappingUpdatedAt"] = spec.mapping_times[seg_id]
    if spec.include_names and meta is not None and meta.name is not None:
        entry["name"] = meta.name
    return entry


def segment_entries(segments: Mapping[str, tuple[str, str | None]],
                    spec: PayloadSpec) -> dict[str, dict[str, Any]]:
    ups: dict[str, dict[str, Any]] = {}
    for seg_id in sorted(segments):
        status, lqt = segments[seg_id]
        entry: dict[str, Any] = {}
        if lqt is not None:
            entry["lastQualificationTime"] = lqt
        entry["status"] = status
        entry.update(segment_extras(seg_id, spec))
        ups[seg_id] = entry
    return ups


def build_payload(profile: StoredProfile, spec: PayloadSpec) -> dict[str, Any]:
    """Mapped attributes present on the profile, all its segments, all its identities."""
    doc = _pick(profile.attributes, spec.attribute_paths)
    doc["segmentMembership"] = {"ups": segment_entries(profile.segments, spec)}
    doc["identityMap"] = profile.identity_map
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


# --- the export path: the same document as build_payload, straight from the stored rows ----
# A backfill encodes every qualified profile, so this path skips what the generic one
# spends its time on: the identity map is stored as orjson output and goes out as it is,
# the segment entries are put together by SQLite with each segment's option keys encoded
# once, and the mapped paths are walked as one tree. tests/test_export.py checks that both
# paths give equal documents.

_Tree = dict[str, "_Tree | None"]  # None: a mapped leaf (take the value whole)


class Encoder:
    """Encodes export bodies for one PayloadSpec."""

    def __init__(self, spec: PayloadSpec) -> None:
        self.spec = spec
        self.tree: _Tree = {}
        for path in spec.attribute_paths:
            node: _Tree = self.tree
            for key in path[:-1]:
                nxt = node.setdefault(key, {})
                if nxt is None:  # a shorter mapped path already takes this subtree whole
                    break
                node = nxt
            else:
                node[path[-1]] = None
        tails = {}
        for seg_id in {*spec.catalogue, *spec.mapping_times}:
            extras = orjson.dumps(segment_extras(seg_id, spec))
            if extras != b"{}":
                tails[seg_id] = "," + extras[1:].decode()
        self.segment_tails = orjson.dumps(tails).decode()  # for state.dataflows.payload_rows

    def body(self, attributes: bytes | str, identity_map: bytes | str, ups: bytes | str) -> bytes:
        """One export body from the stored attributes and identity map (orjson documents)
        and the ``ups`` JSON that state.dataflows.payload_rows assembles."""
        doc = _pick_tree(orjson.loads(attributes), self.tree) if self.tree else {}
        doc["segmentMembership"] = {"ups": orjson.Fragment(ups)}
        doc["identityMap"] = orjson.Fragment(identity_map)
        return orjson.dumps(doc)


def _pick_tree(node: dict[str, Any], tree: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key in node:
            value = node[key]
            if sub is None:
                out[key] = value
            elif isinstance(value, dict) and (picked := _pick_tree(value, sub)):
                out[key] = picked
    return out

"""The one place an export becomes a request body.

``render`` turns a profile's stored state into the seed's JSON object for one dataflow:
the mapped attributes present on the profile (nested as stored), ``segmentMembership.ups``
with all of its segments (plus names and timestamps as the destination asks) and the whole
``identityMap``. Stream, backfill, replay and test-send all send what this renders, at
send time, from the profile's state then; the idempotency key is derived from that state
(``idempotency_key``), so the same body always carries the same key and a newer state a
new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from config import Config, Dataflow, Segment
from state.model import StoredProfile

_Tree = dict[str, "_Tree | None"]  # None: a mapped leaf (take the value whole)


@dataclass(frozen=True)
class BodySpec:
    """Everything a body needs besides the profile, fixed for one dataflow and mapping."""

    dataflow: str
    attribute_paths: tuple[tuple[str, ...], ...]
    include_names: bool
    include_timestamps: bool
    catalogue: Mapping[str, Segment]
    mapping_times: Mapping[str, tuple[int, int]]
    tree: _Tree = field(init=False, repr=False, compare=False)
    extras: Mapping[str, dict[str, Any]] = field(init=False, repr=False, compare=False)
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tree: _Tree = {}
        for path in self.attribute_paths:
            node: _Tree = tree
            for key in path[:-1]:
                nxt = node.setdefault(key, {})
                if nxt is None:  # a shorter mapped path already takes this subtree whole
                    break
                node = nxt
            else:
                node[path[-1]] = None
        extras = {seg: e for seg in {*self.catalogue, *self.mapping_times}
                  if (e := _segment_extras(seg, self))}
        # what, besides the profile's state, decides the body's bytes
        shape = orjson.dumps([self.attribute_paths, extras], option=orjson.OPT_SORT_KEYS)
        object.__setattr__(self, "tree", tree)
        object.__setattr__(self, "extras", extras)
        object.__setattr__(self, "fingerprint", hashlib.sha256(shape).hexdigest()[:16])

    @classmethod
    def for_dataflow(cls, config: Config, flow: Dataflow,
                     mapping_times: Mapping[str, tuple[int, int]]) -> BodySpec:
        dest = config.destination(flow.destination)
        return cls(
            dataflow=flow.name,
            attribute_paths=tuple(tuple(p.split(".")) for p in flow.attributes),
            include_names=dest.include_segment_names,
            include_timestamps=dest.include_segment_timestamps,
            catalogue={s.id: s for s in config.segments},
            mapping_times=dict(mapping_times),
        )


def _segment_extras(seg_id: str, spec: BodySpec) -> dict[str, Any]:
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


def _pick(node: dict[str, Any], tree: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key in node:
            value = node[key]
            if sub is None:
                out[key] = value
            elif isinstance(value, dict) and (picked := _pick(value, sub)):
                out[key] = picked
    return out


def document(profile: StoredProfile, spec: BodySpec) -> dict[str, Any]:
    """The export object for ``profile`` (what ``render`` encodes)."""
    doc = _pick(profile.attributes, spec.tree) if spec.tree else {}
    ups: dict[str, dict[str, Any]] = {}
    extras = spec.extras
    for seg_id in sorted(profile.segments):
        status, lqt = profile.segments[seg_id]
        entry: dict[str, Any] = {}
        if lqt is not None:
            entry["lastQualificationTime"] = lqt
        entry["status"] = status
        if seg_id in extras:
            entry.update(extras[seg_id])
        ups[seg_id] = entry
    doc["segmentMembership"] = {"ups": ups}
    doc["identityMap"] = profile.identity_map
    return doc


def render(profile: StoredProfile, spec: BodySpec) -> bytes:
    """The request body for one export of ``profile``."""
    return orjson.dumps(document(profile, spec))


def idempotency_key(spec: BodySpec, profile_id: str, state_seq: int) -> str:
    """Identifies the state sent: (dataflow, profile, the change that made its state, the
    body's shape). A retry, redelivery or replay of the same state repeats it; a newer
    state, or the same state with other mapping times (a backfill for a newly mapped
    segment), gets a new one."""
    text = f"{spec.dataflow}\0{profile_id}\0{state_seq}\0{spec.fingerprint}".encode()
    digest = hashlib.sha256(text).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def set_path(doc: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Put ``value`` at ``path`` in ``doc``, making the objects on the way."""
    for key in path[:-1]:
        child = doc.get(key)
        if not isinstance(child, dict):
            child = doc[key] = {}
        doc = child
    doc[path[-1]] = value

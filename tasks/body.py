"""The one place an export becomes a request body.

``document`` turns a profile's stored state into the seed's JSON object for one dataflow:
the mapped attributes present on the profile (nested as stored), ``segmentMembership.ups``
with all of its segments (plus names and timestamps as the destination asks) and the whole
``identityMap``. ``render`` encodes it, or, when the destination has a ``template``, gives
it to the template (``tasks.template``) and returns the template's JSON. With batching
(``batch.max_profiles`` above 1), ``frame`` puts several rendered exports into one body,
as a JSON array or as NDJSON, and ``fits`` says where ``batch.max_bytes`` cuts. Stream,
backfill, replay and test-send all send what this renders, at send time, from the
profile's state then; the idempotency key is derived from that state
(``idempotency_key``), so the same body always carries the same key and a newer state a
new one; a batch's key is derived from its members' keys (``batch_key``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from config import Batch, Config, Dataflow, Segment
from state.model import StoredProfile
from tasks.template import ExportTemplate, TemplateError

__all__ = ["BodySpec", "TemplateError", "batch_key", "document", "fits", "frame",
           "idempotency_key", "render", "set_path"]

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
    template: ExportTemplate | None = field(default=None, compare=False)
    batch: Batch = field(default_factory=Batch)
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
        what: list[Any] = [self.attribute_paths, extras]
        if self.template is not None:
            what.append(self.template.identity)
        shape = orjson.dumps(what, option=orjson.OPT_SORT_KEYS)
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
            template=template_for(dest.template, dest.template_strict, dest.name,
                                  dest.description),
            batch=dest.batch,
        )

    @property
    def batched(self) -> bool:
        """Whether requests carry a batch (``frame``) rather than one export's body."""
        return self.batch.max_profiles > 1


def template_for(source: str | None, strict: bool, name: str,
                 description: str) -> ExportTemplate | None:
    """A destination's compiled template, or None when it has none."""
    if source is None:
        return None
    return ExportTemplate(source, strict, {"name": name, "description": description})


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
    """One export of ``profile``: the seed's object, or the destination template's JSON
    (raises :class:`TemplateError`). Unbatched, this is the request body; batched, one
    member of it (``frame``)."""
    if spec.template is None:
        return orjson.dumps(document(profile, spec))
    part = spec.template.render(document(profile, spec), profile.profile_id, spec.dataflow,
                                profile.last_seq)
    if spec.batch.format == "ndjson" and spec.batched:
        # one line per export: a line break in JSON text is only ever whitespace between
        # tokens (strings cannot hold a raw one), so a space says the same thing
        part = part.translate(_LINE_BREAKS_TO_SPACES)
    return part


_LINE_BREAKS_TO_SPACES = bytes.maketrans(b"\r\n", b"  ")


def frame(parts: Sequence[bytes], spec: BodySpec) -> bytes:
    """The request body carrying ``parts`` (rendered exports): the one part as it is when
    batching is off, else a JSON array (``[a,b]``) or NDJSON (``a\\nb\\n``)."""
    if not spec.batched:
        [part] = parts
        return part
    if spec.batch.format == "ndjson":
        return b"".join(p + b"\n" for p in parts)
    return b"[" + b",".join(parts) + b"]"


def fits(size_so_far: int, members: int, part: int, spec: BodySpec) -> bool:
    """Whether a part of ``part`` bytes may join a batch of ``members`` parts that take
    ``size_so_far`` bytes (their sizes summed). ``max_bytes`` cuts before the limit; the
    first part always goes, so an export larger than ``max_bytes`` is sent alone."""
    if members == 0:
        return True
    if members >= spec.batch.max_profiles:
        return False
    framing = members + 1 + (1 if spec.batch.format == "json_array" else 0)
    return size_so_far + part + framing <= spec.batch.max_bytes


def idempotency_key(spec: BodySpec, profile_id: str, state_seq: int) -> str:
    """Identifies the state sent: (dataflow, profile, the change that made its state, the
    body's shape). A retry, redelivery or replay of the same state repeats it; a newer
    state, or the same state with other mapping times (a backfill for a newly mapped
    segment), gets a new one."""
    text = f"{spec.dataflow}\0{profile_id}\0{state_seq}\0{spec.fingerprint}".encode()
    digest = hashlib.sha256(text).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def batch_key(spec: BodySpec, member_keys: Sequence[str]) -> str:
    """The Idempotency-Key of a batch: derived from its members' keys, in order, and its
    format. The same exports in the same states, batched the same way, repeat it (a retry
    of the batch); any newer state among them, or other members, gives a new one."""
    text = "\0".join(("batch", spec.batch.format, *member_keys)).encode()
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

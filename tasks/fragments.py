"""Parsing and validating one NDJSON profile fragment (the README's "Ingest format").

Hand-written rather than a pydantic model per line: ingest runs at tens of thousands of
lines a second and every rejection must name the field in plain words.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from state.model import AUTHENTICATED_STATES, STATUSES, Fragment, iso_utc

MAX_LINE_BYTES = 1_048_576
MAX_DEPTH = 32
MAX_PROFILE_ID = 256
_TOP_KEYS = frozenset({"profileId", "timestamp", "attributes", "identityMap", "segmentMembership"})


class FragmentError(ValueError):
    """Why a line was rejected; the message is shown to the user with the line number."""


# orjson decodes an integer outside [-2**63, 2**64 - 1] as a float, silently rounded, so
# it lands at or beyond those bounds. The validating walks flag such a float (a cheap test
# per value they visit anyway); only then is the line parsed again, exactly, by the
# standard library, which keeps integers whole and tells a float literal from an integer.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_ROUNDED_LO, _ROUNDED_HI = float(_INT_MIN), float(_INT_MAX + 1)


class _Wide(int):
    """An integer literal beyond what is kept exactly, as the exact check met it."""


def _exact_int(text: str) -> int:
    value = int(text)
    return _Wide(value) if not _INT_MIN <= value <= _INT_MAX else value


def _wide_integer(line: bytes | str) -> str | None:
    """Where the first integer beyond 64 bits sits in ``line`` (a JSON path, such as
    ``attributes.loyalty.points`` or ``identityMap.ecid[0].xid``), or None."""
    try:
        doc = json.loads(line, parse_int=_exact_int)
    except (ValueError, RecursionError):  # orjson took it: only nesting deeper than ours
        return None
    todo: list[tuple[str, Any]] = [("", doc)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, _Wide):
            return path or "the line"
        if isinstance(value, dict):
            todo += [(f"{path}.{key}" if path else key, child)
                     for key, child in reversed(value.items())]
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", child) for i, child in reversed(list(enumerate(value)))]
    return None


def _check_nesting(value: Any, path: str, depth: int, rounded: list[float]) -> None:
    """Bound the depth inside lists and identity entries too: they are stored with orjson,
    whose encoder refuses documents nested deeper than 255 levels. Floats that may be a
    rounded integer go to ``rounded``."""
    if depth > MAX_DEPTH:
        raise FragmentError(f"{path} is nested deeper than {MAX_DEPTH} levels")
    items = value.values() if isinstance(value, dict) else value
    for child in items:
        if isinstance(child, (dict, list)):
            _check_nesting(child, path, depth + 1, rounded)
        elif child.__class__ is float and not _ROUNDED_LO < child < _ROUNDED_HI:
            rounded.append(child)


@lru_cache(maxsize=8192)
def _instant(value: str) -> tuple[int, str]:
    """(epoch ms, ISO 8601 UTC) of a time string. Cached: a stream repeats its timestamps.
    Raises ValueError or OverflowError; ``_instant_of`` turns those into reasons."""
    parsed = datetime.fromisoformat(value)
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return int(parsed.timestamp() * 1000), parsed.isoformat(timespec="seconds")[:-6] + "Z"


def _instant_of(value: Any, where: str) -> tuple[int, str]:
    if not isinstance(value, str):
        raise FragmentError(f"{where} must be an ISO 8601 string, got {type(value).__name__}")
    try:
        return _instant(value)
    except ValueError:
        raise FragmentError(f"{where} is not an ISO 8601 time: {value[:40]!r}") from None
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise FragmentError(f"{where} is out of range: {value[:40]!r}") from None


def _check_attributes(value: dict[str, Any], prefix: str, depth: int, out: list[str],
                      rounded: list[float]) -> None:
    """Validate keys and depth, and append the leaf paths (as ``leaf_paths`` gives them) to
    ``out``: one walk instead of two. ``prefix`` is the dotted path so far plus a dot."""
    if depth > MAX_DEPTH:
        raise FragmentError(f"{_where(prefix)} is nested deeper than {MAX_DEPTH} levels")
    for key, child in value.items():
        if not key or "." in key:
            raise FragmentError(f"{_where(prefix)} has an invalid key {key[:40]!r} "
                                "(empty or containing '.')")
        if isinstance(child, dict):
            _check_attributes(child, f"{prefix}{key}.", depth + 1, out, rounded)
        else:
            if isinstance(child, list):
                _check_nesting(child, f"{_where(prefix)}.{key}", depth + 1, rounded)
            elif child.__class__ is float and not _ROUNDED_LO < child < _ROUNDED_HI:
                rounded.append(child)
            out.append(prefix + key)


def _check_identity_fields(entry: dict[str, Any], where: str, rounded: list[float]) -> None:
    """The fields of an identity entry besides its id: ``removed`` (true removes the
    identity), and the known ones with their types; other fields are kept as given."""
    removed = entry.get("removed", False)
    if not isinstance(removed, bool):
        raise FragmentError(f"{where}.removed must be true (remove this identity) or false, "
                            f"got {str(removed)[:40]!r}")
    primary = entry.get("primary")
    if primary is not None and not isinstance(primary, bool):
        raise FragmentError(f"{where}.primary must be true or false, got {str(primary)[:40]!r}")
    state = entry.get("authenticatedState")
    if state is not None and (state.__class__ is not str or state not in AUTHENTICATED_STATES):
        raise FragmentError(f"{where}.authenticatedState must be one of "
                            f"{', '.join(sorted(AUTHENTICATED_STATES))}, got {str(state)[:40]!r}")
    _check_nesting(entry, where, 3, rounded)


def _where(prefix: str) -> str:
    return f"attributes.{prefix[:-1]}" if prefix else "attributes"


def parse_fragment(line: bytes | str, catalogue: frozenset[str], now_ms: int) -> Fragment:
    """Parse one line; raise FragmentError with a reason a user can act on."""
    if len(line) > MAX_LINE_BYTES:
        raise FragmentError(f"line is {len(line)} bytes, over the {MAX_LINE_BYTES} byte limit")
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise FragmentError(f"not valid JSON ({exc.args[0] if exc.args else exc})") from None
    if not isinstance(doc, dict):
        raise FragmentError(f"a fragment must be a JSON object, got {type(doc).__name__}")
    unknown = doc.keys() - _TOP_KEYS
    if unknown:
        raise FragmentError(f"unknown field(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    pid = doc.get("profileId")
    if not isinstance(pid, str) or not pid.strip():
        raise FragmentError("profileId is required and must be a non-empty string")
    if len(pid) > MAX_PROFILE_ID:
        raise FragmentError(f"profileId is longer than {MAX_PROFILE_ID} characters")
    if "\x00" in pid:  # SQLite's JSON functions, which the store's lookups use, end text there
        raise FragmentError("profileId must not contain a NUL character (\\u0000)")
    stamp = doc.get("timestamp")
    if stamp is not None:
        ts, iso = _instant_of(stamp, "timestamp")
    else:
        ts, iso = now_ms, ""  # the ISO form is only made if a segment needs it
    frag = Fragment(pid, ts)
    rounded: list[float] = []  # floats at the integer bounds, seen by the walks below

    attrs = doc.get("attributes")
    if attrs is not None:
        if not isinstance(attrs, dict):
            raise FragmentError(f"attributes must be an object, got {type(attrs).__name__}")
        paths: list[str] = []
        _check_attributes(attrs, "", 1, paths, rounded)
        frag.attributes = attrs
        frag.paths = paths

    ids = doc.get("identityMap")
    if ids is not None:
        if not isinstance(ids, dict):
            raise FragmentError(f"identityMap must be an object, got {type(ids).__name__}")
        for ns, entries in ids.items():
            if not ns:
                raise FragmentError("identityMap has an empty namespace")
            if entries is None:  # removes the namespace
                frag.identities[ns] = None
                continue
            if not isinstance(entries, list):
                raise FragmentError(f"identityMap.{ns} must be a list of {{\"id\": ...}}, "
                                    "or null to remove the namespace")
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
                    raise FragmentError(f"identityMap.{ns}[{i}] must be an object with a string id")
                if len(entry) > 1:
                    _check_identity_fields(entry, f"identityMap.{ns}[{i}]", rounded)
            frag.identities[ns] = entries

    membership = doc.get("segmentMembership")
    if membership is not None:
        if not isinstance(membership, dict) or not isinstance(membership.get("ups", {}), dict):
            raise FragmentError("segmentMembership must be {\"ups\": {segment: {status, ...}}}")
        extra = membership.keys() - {"ups"}
        if extra:
            raise FragmentError(f"segmentMembership has unknown key(s) {sorted(extra)}; only ups")
        for seg, entry in (membership.get("ups") or {}).items():
            where = f"segmentMembership.ups.{seg}"
            if seg not in catalogue:
                raise FragmentError(f"{where}: segment {seg!r} is not in the config's catalogue")
            if not isinstance(entry, dict):
                raise FragmentError(f"{where} must be an object with a status")
            status = entry.get("status")
            if status.__class__ is not str or status not in STATUSES:  # a list is unhashable
                raise FragmentError(f"{where}.status must be realized, existing or exited, "
                                    f"got {str(status)[:40]!r}")
            lqt = entry.get("lastQualificationTime")
            if lqt is not None:
                frag.segments[seg] = (status, _instant_of(lqt, f"{where}.lastQualificationTime")[1])
            else:
                if not iso:
                    iso = iso_utc(datetime.fromtimestamp(now_ms / 1000, UTC))
                frag.segments[seg] = (status, iso)
    if rounded and (where := _wide_integer(line)) is not None:
        raise FragmentError(f"{where} is an integer beyond 64 bits, which would not be kept "
                            "exactly (integers from -2^63 to 2^64-1 are); send it as a string")
    return frag

"""What a config's ``state`` names: a SQLite file (the default) or a PostgreSQL URL, and
how to show a URL without its password (logs, errors, ``status``, artifact keys)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")
_SECRET_PARAMS = {"password", "sslpassword"}


class StateUnavailable(RuntimeError):
    """The store a config's ``state`` names cannot be opened; the message is one line that
    names ``state`` and never holds a password."""


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.split(":", 1)[0].lower() in POSTGRES_SCHEMES \
        and "://" in target


def redact(url: str) -> str:
    """The URL with its password (in the authority or as a ``password=`` parameter)
    replaced by ``***``; anything that is not a URL passes through."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, host = netloc.rpartition("@")
        if ":" in auth:
            auth = auth.split(":", 1)[0] + ":***"
        netloc = f"{auth}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v)
                               for k, v in pairs], safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def without_password(url: str) -> str:
    """The URL with no password at all (not even a placeholder): what identifies a store,
    e.g. in artifact keys, whatever its password is or becomes."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, host = netloc.rpartition("@")
        netloc = f"{auth.split(':', 1)[0]}@{host}"
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in _SECRET_PARAMS]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(pairs, safe="/"),
                       parts.fragment))


def identity(target: str | Path) -> str:
    """What tells two stores apart, with nothing secret in it: a file's resolved path, or a
    URL without its password (the same store whatever its password is or becomes)."""
    return without_password(target) if is_postgres_url(target) else str(Path(target).resolve())


def describe(target: str | Path) -> str:
    """How to show a state target to a person: a path as is, a URL redacted."""
    return redact(target) if is_postgres_url(target) else str(target)


__all__ = ["StateUnavailable", "describe", "identity", "is_postgres_url", "redact",
           "without_password"]

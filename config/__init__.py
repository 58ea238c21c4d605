"""Config models: the YAML file is validated once here, at the edge, and passed in.

Secrets are ``SecretStr``. In the file they are ``${ENV_VAR}`` or a Prefect Secret block
reference (``{{ prefect.blocks.secret.NAME }}``); both are resolved when the config is
loaded and live only in memory.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from state.target import describe, is_postgres_url

MAX_RATE_LIMIT = 10_000
MAX_BATCH_PROFILES = 10_000
MAX_BATCH_BYTES = 100_000_000
DEFAULT_REDELIVER_AFTER = (60.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)
MAX_REDELIVERIES = 20
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_BLOCK_REF = re.compile(r"^\{\{\s*prefect\.blocks\.secret\.([A-Za-z0-9_-]+)\s*\}\}$")
_PATH_PART = r"[A-Za-z0-9_@$-][A-Za-z0-9_@$:-]*"
ATTRIBUTE_PATH = re.compile(rf"^{_PATH_PART}(\.{_PATH_PART})*$")
RESERVED_ROOTS = {"segmentMembership", "identityMap"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds ``(field path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"{path}: {msg}" if path else msg for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def _resolve_secret(value: Any) -> Any:
    """Turn an env or Prefect block reference into its value; plain text passes through."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    text = value.strip()
    if m := _ENV_REF.match(text):
        name = m.group(1)
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if m := _BLOCK_REF.match(text):
        name = m.group(1)
        try:
            from prefect.blocks.system import Secret

            # _sync: a config is loaded inside async flows too, where load() would
            # otherwise hand back a coroutine
            return str(Secret.load(name, _sync=True).get())
        except Exception as exc:  # the block API's errors vary; name the block, not a value
            raise ValueError(f"Prefect Secret block {name!r} could not be loaded "
                             f"({type(exc).__name__})") from None
    return value


def is_reference(value: str) -> bool:
    """True when a secret is written as a reference rather than inline."""
    text = value.strip()
    return bool(_ENV_REF.match(text) or _BLOCK_REF.match(text))


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret), Field(min_length=1)]


def _check_path(path: str) -> str:
    if not ATTRIBUTE_PATH.match(path):
        raise ValueError(f"{path!r} is not a dotted attribute path like person.name.firstName")
    root = path.split(".", 1)[0]
    if root in RESERVED_ROOTS:
        raise ValueError(f"{path!r}: {root} is always exported, do not map it")
    return path


AttributePath = Annotated[str, AfterValidator(_check_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _check_url(value: str, what: str) -> str:
    if any(c in value for c in "\r\n\t\x00"):
        raise ValueError(f"{what} contains a line break, tab or NUL character")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{what} must be an http(s) URL, got scheme {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError(f"{what} has no host")
    return value


class Segment(_Model):
    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\n\r\x00]+$")
    name: str | None = None
    createdAt: int | None = Field(default=None, ge=0)
    updatedAt: int | None = Field(default=None, ge=0)


class NoAuth(_Model):
    type: Literal["none"]


class BearerAuth(_Model):
    type: Literal["bearer"]
    token: Secret


class _OAuth2(_Model):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: Secret
    scope: str | None = None
    audience: str | None = None

    @field_validator("token_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, "token_url")


class OAuth2PasswordAuth(_OAuth2):
    type: Literal["oauth2_password"]
    username: str = Field(min_length=1)
    password: Secret


class OAuth2ClientCredentialsAuth(_OAuth2):
    type: Literal["oauth2_client_credentials"]
    credentials_type: Literal["body_form_encoded", "basic_authorization"] = "body_form_encoded"


Auth = Annotated[
    NoAuth | BearerAuth | OAuth2PasswordAuth | OAuth2ClientCredentialsAuth,
    Field(discriminator="type"),
]


# Headers that frame or route the request (or belong to one connection): the sender sets
# them; a custom value would cut bodies short (Content-Length) or send them elsewhere (Host).
RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection",
                              "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})


def parse_headers(text: str) -> list[tuple[str, str]]:
    """``h1:v1,h2:v2`` as the reference platform writes custom headers."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not _HEADER_NAME.match(name):
            raise ValueError(f"cannot parse header {item!r}: expected name:value")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} frames or routes the request and is set by "
                             "profile-relay itself; remove it")
        if name.lower() == "content-encoding":
            raise ValueError(f"header {name!r} is set by profile-relay itself (compression: "
                             "gzip); remove it")
        value = value.strip()
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"header {name!r}: the value contains a line break or NUL character")
        pairs.append((name, value))
    return pairs


def parse_query(text: str) -> list[tuple[str, str]]:
    """``p1=v&p2=v`` query parameters appended to the endpoint."""
    text = text.strip().lstrip("?")
    if not text:
        return []
    for item in text.split("&"):
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"cannot parse query parameter {item!r}: expected name=value")
    return parse_qsl(text, keep_blank_values=True, strict_parsing=True)


def _check_proxy(value: SecretStr) -> SecretStr:
    """``http(s)://[user:password@]host:port``. Messages never echo the URL: it may hold a
    password."""
    raw = value.get_secret_value()
    _check_url(raw, "proxy")
    parts = urlsplit(raw)
    try:
        _ = parts.port  # raises for a port that is not a number in range
    except ValueError:
        raise ValueError("proxy has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy must be scheme://[user:password@]host:port, without a path "
                         "or query")
    return value


# A proxy URL may carry ``user:password@``, so it is a secret like the others (a reference
# such as ``${RELAY_PROXY}`` works too).
ProxyUrl = Annotated[SecretStr, BeforeValidator(_resolve_secret), Field(min_length=1),
                     AfterValidator(_check_proxy)]
Method = Annotated[Literal["POST", "PUT", "PATCH"],
                   BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)]
RedeliveryDelay = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """A file path as written, read from beside the config file when relative (the loader
    passes ``base_dir`` in the validation context); it must exist."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = value if value.is_absolute() or base is None else Path(base) / value
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _no_password() -> bytes:
    """For ``load_cert_chain``: never let OpenSSL prompt on the terminal for a passphrase."""
    return b""


def check_client_certificate(cert: Path) -> None:
    """The file holds at least one PEM certificate (the client's, maybe with its chain)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ValueError(f"no PEM certificate could be read from {cert} ({reason})") from None


def check_client_key(cert: Path, key: Path) -> None:
    """The key loads (unencrypted PEM) and belongs to the certificate, as the sender will
    load them: a mismatch is reported at ``validate`` rather than on every request."""
    try:
        text = key.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {key}: {exc.strerror or type(exc).__name__}") from None
    if b"ENCRYPTED" in text:
        raise ValueError(f"{key} is password-protected; give an unencrypted PEM key (a file "
                         "only the relay's user can read)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"the key in {key} does not match the certificate in client_cert "
                             f"({cert})") from None
        raise ValueError(f"no PEM private key for client_cert could be read from {key} "
                         f"({exc.reason or 'unreadable'})") from None


class Batch(_Model):
    """How many exports one request may carry; ``max_profiles: 1`` (the default) sends the
    seed's one-object body."""

    max_profiles: int = Field(default=1, ge=1, le=MAX_BATCH_PROFILES)
    max_bytes: int = Field(default=1_000_000, ge=1, le=MAX_BATCH_BYTES)
    max_wait_ms: int = Field(default=0, ge=0, le=60_000)
    format: Literal["json_array", "ndjson"] = "json_array"

    @property
    def enabled(self) -> bool:
        return self.max_profiles > 1


def check_template_syntax(source: str) -> None:
    """Compile a destination's template (the same sandbox and filter names the sender uses),
    so a syntax error or an unknown filter is reported with its line when loading."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not source.strip():
        raise ValueError("the template is empty")
    class _Checking(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})  # never folded (run) while compiling

    try:
        _Checking(autoescape=False).from_string(source)
    except JinjaError as exc:
        line = getattr(exc, "lineno", None)
        raise ValueError(f"line {line}: {exc.message}" if line else str(exc.message)) from None


class Destination(_Model):
    name: str = Field(min_length=1)
    description: str = ""
    endpoint: str
    auth: Auth = Field(default_factory=lambda: NoAuth(type="none"))
    headers: str = ""
    query_parameters: str = ""
    include_segment_names: bool = False
    include_segment_timestamps: bool = False
    rate_limit: float = Field(default=MAX_RATE_LIMIT, ge=1, le=MAX_RATE_LIMIT)
    max_in_flight: int = Field(default=64, ge=1, le=4096)
    timeout_seconds: float = Field(default=10.0, ge=0.001, le=600)
    retry_backoff_seconds: float = Field(default=1.0, ge=0, le=300)
    max_retry_after_seconds: float = Field(default=60.0, ge=0, le=3600)
    ca_bundle: Path | None = None
    # mutual TLS: both or neither (checked on client_key, which is validated after client_cert)
    client_cert: Path | None = None
    client_key: Path | None = Field(default=None, validate_default=True)
    proxy: ProxyUrl | None = None
    method: Method = "POST"
    compression: Literal["none", "gzip"] = "none"
    signing_secret: Secret | None = None
    batch: Batch = Field(default_factory=Batch)
    template: str | None = None
    template_strict: bool = False
    # automatic redelivery of the failed store, and the circuit breaker
    redeliver_after: list[RedeliveryDelay] = Field(
        default_factory=lambda: list(DEFAULT_REDELIVER_AFTER), max_length=MAX_REDELIVERIES)
    pause_after_failures: int = Field(default=50, ge=1)
    probe_seconds: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            check_template_syntax(v)
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return _check_url(v, "endpoint")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: str) -> str:
        parse_headers(v)
        return v

    @field_validator("query_parameters")
    @classmethod
    def _query(cls, v: str) -> str:
        parse_query(v)
        return v

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @field_validator("client_cert")
    @classmethod
    def _client_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        path = _existing_file(v, info)
        if path is not None:
            check_client_certificate(path)
        return path

    @field_validator("client_key")
    @classmethod
    def _client_key(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        key = _existing_file(v, info)
        if "client_cert" not in info.data:
            return key  # client_cert itself is invalid; its own error says why
        cert = info.data["client_cert"]
        if cert is None and key is not None:
            raise ValueError("client_key is given without client_cert: give both or neither")
        if cert is not None and key is None:
            raise ValueError("client_cert is given without client_key: give both or neither")
        if cert is not None and key is not None:
            check_client_key(cert, key)
        return key

    @field_validator("signing_secret")
    @classmethod
    def _signing(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        import base64
        import binascii

        raw = v.get_secret_value()
        if not raw.startswith("whsec_"):
            raise ValueError("must start with 'whsec_' followed by base64 (Standard Webhooks)")
        try:
            if not base64.b64decode(raw[6:], validate=True):
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("the part after 'whsec_' is not base64") from None
        return v

    @property
    def header_pairs(self) -> list[tuple[str, str]]:
        return parse_headers(self.headers)

    @property
    def query_pairs(self) -> list[tuple[str, str]]:
        return parse_query(self.query_parameters)


class Dataflow(_Model):
    name: str = Field(min_length=1)
    destination: str
    segments: list[str] = Field(min_length=1)
    attributes: list[AttributePath] = Field(default_factory=list)


class StateUrl(str):
    """A PostgreSQL URL for ``state``: its repr hides the password (the value is the URL)."""

    def __repr__(self) -> str:
        return repr(describe(str(self)))


def _state(value: Any) -> Path | StateUrl:
    """``state``: a SQLite file path, or a PostgreSQL URL, either possibly ``${ENV_VAR}``
    (resolved here, at load time)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("state must be a SQLite file path or a postgresql:// URL")
    text = _resolve_secret(value.strip()).strip()
    if is_postgres_url(text):
        return StateUrl(text)
    if "://" in text:
        raise ValueError(f"state: {describe(text).split('://')[0]}:// is not a supported "
                         "store; use a SQLite file path or a postgresql:// URL")
    return Path(text)


StateTarget = Annotated[Path | StateUrl, PlainValidator(_state),
                        PlainSerializer(describe, return_type=str)]


class Config(_Model):
    state: StateTarget = Path("relay.db")
    # change log and delivery records are kept this long (once every dataflow read them)
    retention_days: int = Field(default=7, ge=1, le=3650)
    segments: list[Segment] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    dataflows: list[Dataflow] = Field(default_factory=list)
    base_dir: Path = Field(default=Path("."), exclude=True)
    # field paths of secrets written inline in the file (``validate`` warns about them)
    inline_secret_fields: list[str] = Field(default_factory=list, exclude=True)

    @model_validator(mode="after")
    def _relative_paths(self) -> Config:
        """Relative TLS files are read from beside the config file, as ``state`` is (the
        loader resolves them while validating; this covers a Config built without it)."""
        for dest in self.destinations:
            for field in ("ca_bundle", "client_cert", "client_key"):
                path = getattr(dest, field)
                if path is not None and not path.is_absolute():
                    setattr(dest, field, self.base_dir / path)
        return self

    @property
    def state_path(self) -> Path:
        """The SQLite file of ``state``, relative to the config's folder."""
        if not isinstance(self.state, Path):
            raise ValueError("state is a PostgreSQL URL, not a file (use state_target)")
        return self.state if self.state.is_absolute() else self.base_dir / self.state

    @property
    def state_target(self) -> Path | str:
        """What ``state.open_store`` opens: the SQLite file, or the PostgreSQL URL (show it
        with ``state.target.describe``, which hides the password)."""
        return self.state_path if isinstance(self.state, Path) else self.state

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(f"no destination named {name!r}")

    def dataflow(self, name: str) -> Dataflow:
        for f in self.dataflows:
            if f.name == name:
                return f
        raise KeyError(f"no dataflow named {name!r}; known: {[f.name for f in self.dataflows]}")

    def select_dataflows(self, name: str | None) -> list[Dataflow]:
        """One named dataflow, or all of them."""
        return list(self.dataflows) if name is None else [self.dataflow(name)]

    def segment(self, seg_id: str) -> Segment | None:
        return next((s for s in self.segments if s.id == seg_id), None)


_IDENTITY_WORDS = re.compile(r"email|phone", re.I)
_IDENTITY_SUFFIX = re.compile(r"(^id|Id|ID|[_-]id)$")


def identity_bearing(path: str) -> bool:
    """Whether a mapped attribute path can tell a receiver whom a profile is: one of its
    parts contains ``email`` or ``phone`` (any case), or is ``id`` or ends in ``Id``,
    ``ID``, ``_id`` or ``-id`` (``personalEmail.address``, ``mobilePhone.number``,
    ``crmId``, ``loyalty.member_id``)."""
    return any(_IDENTITY_WORDS.search(part) or _IDENTITY_SUFFIX.search(part)
               for part in path.split("."))


def identity_warnings(config: Config) -> list[str]:
    """One line per dataflow that maps no identity-bearing attribute (``identity_bearing``):
    its receivers can tell profiles apart by the identity map alone."""
    return [f"dataflows[{i}] ({flow.name}) maps no identity-bearing attribute (a path with "
            "email, phone or an id); its receivers can tell profiles apart only by their "
            "identity map, and a profile without identities is not sent"
            for i, flow in enumerate(config.dataflows)
            if not any(identity_bearing(p) for p in flow.attributes)]


def _cross_check(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks across sections, run on the raw document so they show beside field errors."""
    problems: list[tuple[str, str]] = []

    def items(field: str) -> list[dict[str, Any]]:
        value = data.get(field) or []
        return [v if isinstance(v, dict) else {} for v in value] if isinstance(value, list) else []

    for field, key in (("segments", "id"), ("destinations", "name"), ("dataflows", "name")):
        seen: dict[Any, int] = {}
        for i, item in enumerate(items(field)):
            value = item.get(key)
            if not isinstance(value, str):  # missing or wrong type: the model reports it
                continue
            if value in seen:
                problems.append((f"{field}[{i}].{key}",
                                 f"duplicate {value!r} (also {field}[{seen[value]}])"))
            seen.setdefault(value, i)
    dests = {d.get("name") for d in items("destinations") if isinstance(d.get("name"), str)}
    segs = {s.get("id") for s in items("segments") if isinstance(s.get("id"), str)}
    for i, flow in enumerate(items("dataflows")):
        if isinstance(flow.get("destination"), str) and flow["destination"] not in dests:
            problems.append((f"dataflows[{i}].destination",
                             f"unknown destination {flow['destination']!r}; "
                             f"known: {sorted(str(d) for d in dests if d is not None)}"))
        mapped = flow.get("segments")
        for j, seg in enumerate(mapped if isinstance(mapped, list) else []):
            if isinstance(seg, str) and seg not in segs:
                problems.append((f"dataflows[{i}].segments[{j}]",
                                 f"segment {seg!r} is not in the segments catalogue"))
    return problems


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    """``('destinations', 0, 'auth', 'oauth2_password', 'token_url')`` -> ``destinations[0].auth.token_url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("none", "bearer", "oauth2_password", "oauth2_client_credentials") and out.endswith("auth"):
            continue  # pydantic puts the union tag in the path; users never write it
        else:
            out += f".{part}" if out else str(part)
    return out


def _friendly(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "union_tag_invalid":
        return "type must be one of none, bearer, oauth2_password, oauth2_client_credentials"
    if err["type"] == "union_tag_not_found":
        return "missing 'type' (none, bearer, oauth2_password, oauth2_client_credentials)"
    return msg.removeprefix("Value error, ")


def parse_config(data: Any, base_dir: Path = Path("."), source: str = "config") -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem with its path."""
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a YAML mapping")], source)
    problems: list[tuple[str, str]] = []
    config = None
    try:
        config = Config.model_validate({**data, "base_dir": base_dir},
                                       context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [(_loc_to_path(e["loc"]), _friendly(e)) for e in exc.errors(include_url=False)]
    problems += _cross_check(data)
    if config is not None and isinstance(config.state, Path) and config.state_path.is_dir():
        problems.append(("state", f"{config.state_path} is a directory; state names the "
                                  "store's SQLite file (e.g. relay.db)"))
    if problems or config is None:
        raise ConfigError(problems, source)
    config.inline_secret_fields = inline_secrets(data)
    return config


CONFIG_BLOCK_SCHEME = "prefect-block://"


def config_location(target: str | Path) -> str:
    """Where a config is, as every process reads it: a file's absolute path, or a
    ``prefect-block://NAME`` reference as it is."""
    text = str(target)
    return text if text.startswith(CONFIG_BLOCK_SCHEME) else str(Path(text).resolve())


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file, or a config kept in Prefect
    (``prefect-block://NAME``, see ``config.blocks``; relative paths in it are taken from
    the working directory)."""
    if str(path).startswith(CONFIG_BLOCK_SCHEME):
        name = str(path)[len(CONFIG_BLOCK_SCHEME):]
        try:
            from config.blocks import read_config_text

            text = read_config_text(name)
        except Exception as exc:  # the block API's errors vary; name the block
            raise ConfigError([("", f"cannot read the config block {name!r} from Prefect "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")],
                              str(path)) from None
        return parse_config_text(text, Path.cwd(), str(path))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror or exc}")], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError([("", "not UTF-8 text")], str(path)) from None
    return parse_config_text(text, path.resolve().parent, str(path))


def parse_config_text(text: str, base_dir: Path, source: str) -> Config:
    """Parse and validate the YAML text of a config."""
    try:
        # the C loader where PyYAML has it: about 6x faster on a config of thousands of
        # segments, and the same documents
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([("", f"{where}not valid YAML ({getattr(exc, 'problem', exc)})")],
                          source) from None
    return parse_config(data, base_dir=base_dir, source=source)


def _has_password(url: str) -> bool:
    try:
        return urlsplit(url.strip()).password is not None
    except ValueError:
        return False


def inline_secrets(data: dict[str, Any]) -> list[str]:
    """Field paths of secrets written inline in the raw YAML instead of as references."""
    found: list[str] = []
    for i, dest in enumerate(data.get("destinations") or []):
        if not isinstance(dest, dict):
            continue
        if isinstance(dest.get("signing_secret"), str) and not is_reference(dest["signing_secret"]):
            found.append(f"destinations[{i}].signing_secret")
        proxy = dest.get("proxy")
        if isinstance(proxy, str) and not is_reference(proxy) and _has_password(proxy):
            found.append(f"destinations[{i}].proxy")
        auth = dest.get("auth") or {}
        if isinstance(auth, dict):
            for key in ("token", "client_secret", "password"):
                if isinstance(auth.get(key), str) and not is_reference(auth[key]):
                    found.append(f"destinations[{i}].auth.{key}")
    return found

"""Destination templates: Jinja2 text that turns one export into the JSON the endpoint
expects, rendered in a sandbox.

A template sees ``profile`` (the export object ``tasks.body.document`` builds),
``profile_id``, ``sequence`` (the change sequence of the state), ``dataflow`` (its name),
``destination`` (its name and description only: never auth, headers or secrets) and the
filter ``tojson``. A missing attribute, however deep, is undefined (``null`` through
``tojson``); with ``template_strict`` it is an error. It runs in Jinja's immutable sandbox with autoescaping off: attributes
starting with ``_`` and Python internals are refused (the refusal raises at once, it never
renders as an empty string), the objects it gets cannot be modified, ``range`` and
repetition are bounded, and nothing that makes the output vary between two renderings of
the same state (``random``, ``lipsum``) is there, so the same state always gives the same
bytes and the same Idempotency-Key. The output, trimmed of surrounding whitespace, must be
JSON; anything else is a :class:`TemplateError` with the template line where it can tell.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Mapping
from typing import Any

import orjson
from jinja2 import ChainableUndefined, StrictUndefined, Undefined
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_NAME = "<template>"
MAX_REPEAT = 1_000_000  # characters or items a `*` may build
MAX_POWER = 1_000       # largest exponent of `**`
_ERROR_CHARS = 300


class TemplateError(Exception):
    """A template that failed to render one export, or rendered something that is not JSON.
    ``line`` is the template's line (None when the output, not a line, is at fault)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message = message
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, stricter where it would otherwise stay quiet."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Any attribute whose name starts with "_", of anything (undefined values
        # included), is refused outright; a profile key that starts with one (an XDM
        # tenant namespace such as "_acme") is read as profile["_acme"].
        if attribute.startswith("_"):
            hint = (f" (write [{attribute!r}] to read a key)"
                    if isinstance(obj, Mapping) else "")
            raise SecurityError(f"access to attribute {attribute!r} of "
                                f"{type(obj).__name__!r} object is unsafe{hint}")
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # The stock sandbox returns an Undefined that a lenient template renders as "";
        # reaching for Python internals is always an error here.
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER:
                raise SecurityError(f"exponent {right} is above {MAX_POWER}")
            return left ** right
        for seq, times in ((left, right), (right, left)):
            if (isinstance(seq, str | list | tuple) and isinstance(times, int)
                    and len(seq) * times > MAX_REPEAT):
                raise SecurityError(f"repetition would build more than {MAX_REPEAT:,} items")
        return left * right


def _no_random(*_args: Any, **_kw: Any) -> Any:
    raise SecurityError("the random filter is not available: a state must always render "
                        "to the same body")


def _environment(strict: bool) -> _Sandbox:
    env = _Sandbox(autoescape=False,
                   undefined=StrictUndefined if strict else ChainableUndefined)
    env.globals.pop("lipsum", None)
    env.filters["random"] = _no_random

    def _default(value: Any) -> Any:
        if isinstance(value, Undefined):
            if strict:
                value._fail_with_undefined_error()
            return None
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    def tojson(value: Any, indent: int | None = None) -> str:
        """The value as JSON (UTF-8, compact; ``indent`` gives two-space indentation); an
        undefined value is ``null`` unless the template is strict."""
        if isinstance(value, Undefined):
            value = _default(value)
        option = orjson.OPT_INDENT_2 if indent else 0
        return orjson.dumps(value, default=_default, option=option).decode()

    env.filters["tojson"] = tojson
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at (Jinja rewrites its traceback so that
    the template's frames carry the template's line numbers)."""
    line = getattr(exc, "lineno", None)
    if isinstance(line, int) and line > 0:
        return line
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == TEMPLATE_NAME and frame.lineno:
            return frame.lineno
    return None


def _clip(text: str) -> str:
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + "..."


class ExportTemplate:
    """A compiled destination template; :meth:`render` gives one export's JSON bytes."""

    def __init__(self, source: str, strict: bool, destination: Mapping[str, str]) -> None:
        self.source = source
        self.strict = strict
        self.destination = {"name": destination.get("name", ""),
                            "description": destination.get("description", "")}
        try:
            self._template = _compiled(source, strict)
        except JinjaTemplateError as exc:
            raise TemplateError(_clip(str(exc.message)), _template_line(exc)) from None

    @property
    def identity(self) -> list[str]:
        """What, besides the export object, decides the output's bytes."""
        return [self.source, self.destination["name"], self.destination["description"]]

    def render(self, document: dict[str, Any], profile_id: str, dataflow: str,
               sequence: int) -> bytes:
        try:
            text = self._template.render(profile=document, profile_id=profile_id,
                                         sequence=sequence, dataflow=dataflow,
                                         destination=dict(self.destination))
        except Exception as exc:  # anything a template does wrong is its own error
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if isinstance(exc, SecurityError):
                message = f"refused by the sandbox: {message}"
            raise TemplateError(_clip(str(message)), _template_line(exc)) from None
        body = text.strip().encode()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            where = (f" (output line {exc.lineno}, column {exc.colno})"
                     if body.count(b"\n") else f" (output character {exc.pos + 1})")
            raise TemplateError(f"the output is not JSON: {exc.msg}{where}") from None
        return body


@functools.lru_cache(maxsize=64)
def _compiled(source: str, strict: bool) -> Any:
    return _environment(strict).from_string(source)

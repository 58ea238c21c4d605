"""How a destination is reached: its TLS context and its proxy, decided once per sender.

The proxy is chosen here rather than by aiohttp's ``trust_env``: with ``trust_env`` aiohttp
reads the proxy variables and ``~/.netrc`` again on every request, in a worker thread each
time, which a sender doing 10,000 requests/s cannot afford (and a netrc entry for the
endpoint would clash with our own ``Authorization`` header). The rules are the same ones
curl and aiohttp follow: ``https_proxy`` for https URLs, ``http_proxy`` for http URLs
(lower-case names win over upper-case ones), ``no_proxy`` lists hosts reached directly, and
a destination's ``proxy`` overrides all three.
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from yarl import URL

log = logging.getLogger(__name__)


def _no_password() -> bytes:
    """OpenSSL must never prompt on a terminal for a key's passphrase."""
    return b""


def ssl_context(ca_bundle: str | Path | None = None, client_cert: str | Path | None = None,
                client_key: str | Path | None = None) -> ssl.SSLContext:
    """Verification always on; a ``ca_bundle`` is trusted in addition to the system CAs,
    and ``client_cert``/``client_key`` are presented to servers that ask (mutual TLS).

    Added rather than replacing, because the token URL may sit behind a public CA while
    the endpoint uses a private one, and both go through the same session (which presents
    the client certificate to both).
    """
    ctx = ssl.create_default_context()
    if ca_bundle:
        ctx.load_verify_locations(cafile=ca_bundle)
    if client_cert and client_key:
        ctx.load_cert_chain(client_cert, client_key, password=_no_password)
    return ctx


@dataclass(frozen=True)
class Proxy:
    """The proxy one URL goes through. ``url`` may hold credentials: never print it."""

    url: URL
    source: str  # "proxy" (the destination's) or the environment variable's name

    @property
    def where(self) -> str:
        """``host:port``, for messages (never the credentials)."""
        return f"{self.url.host}:{self.url.port}"

    def secret_values(self) -> tuple[str, ...]:
        """The password, as written and decoded, for redacting error texts. Messages never
        carry the user name either (they name the proxy by host and port), but it is not
        redacted: a user called ``proxy`` would garble every message that says "proxy"."""
        values = (self.url.raw_password, self.url.password)
        return tuple(dict.fromkeys(v for v in values if v))


def proxy_for(url: str | URL, configured: SecretStr | str | None) -> Proxy | None:
    """The proxy ``url`` goes through: the destination's ``proxy`` when set, else the
    environment's (``https_proxy``/``http_proxy``, unless ``no_proxy`` lists the host),
    else None. An environment proxy of a scheme aiohttp cannot use (``socks5://``) is
    ignored with a warning, as aiohttp itself does."""
    if configured is not None:
        raw = configured.get_secret_value() if isinstance(configured, SecretStr) else configured
        return Proxy(URL(raw), "proxy")
    target = URL(url) if isinstance(url, str) else url
    proxies = urllib.request.getproxies_environment()
    value = proxies.get(target.scheme or "")
    if not value:
        return None
    host = target.host or ""
    if urllib.request.proxy_bypass_environment(host, proxies):
        return None
    name = f"{target.scheme}_proxy"  # which variable it came from: lower-case wins, as in urllib
    name = name if name in os.environ else name.upper()
    if "://" not in value:
        value = f"http://{value}"  # curl's reading of a bare host:port
    try:
        proxy = URL(value)
        usable = proxy.scheme in ("http", "https") and bool(proxy.host) and proxy.port is not None
    except ValueError:
        usable = False
    if not usable:
        log.warning("%s is not an http(s) proxy URL; connecting to %s directly", name, host)
        return None
    return Proxy(proxy, name)

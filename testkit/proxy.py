"""A real forward proxy on loopback for tests: ``CONNECT`` tunnels (what an https endpoint
goes through) and plain-HTTP forwarding (absolute-form requests, for http endpoints),
recording every request it was asked to pass, optionally demanding Basic credentials
(``Proxy-Authorization``) the way a corporate proxy does, and optionally spoken to over
TLS itself (an ``https://`` proxy).

It forwards to 127.0.0.1 only; anything else is answered 403.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_LOOPBACK = {"127.0.0.1", "localhost"}
_HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy was asked to pass (as it arrived, before any refusal)."""

    method: str               # CONNECT, or the forwarded request's method
    target: str               # host:port for CONNECT, the absolute URL otherwise
    headers: dict[str, str]   # lower-case names
    body: bytes = b""         # plain-HTTP forwarding only (a tunnel's bytes stay encrypted)


class ForwardProxy:
    """``async with ForwardProxy() as proxy``: listens on ``proxy.url``; ``requests`` holds
    what passed. With ``credentials=(user, password)`` a request without the matching
    ``Proxy-Authorization`` is answered 407 and goes no further."""

    def __init__(self, credentials: tuple[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.credentials = credentials
        self._ssl = ssl_context  # an https:// proxy (TLS between the client and the proxy)
        self.requests: list[ProxiedRequest] = []
        self.refused = 0  # answered 407
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def url_with_credentials(self) -> str:
        assert self.credentials is not None
        user, password = self.credentials
        return self.url.replace("://", f"://{user}:{password}@", 1)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return headers.get("proxy-authorization") == f"Basic {expected}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in filter(None, lines[1:]):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = b""
            if method != "CONNECT" and headers.get("content-length"):
                body = await reader.readexactly(int(headers["content-length"]))
            self.requests.append(ProxiedRequest(method, target, headers, body))
            if not self._authorized(headers):
                self.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b'Proxy-Authenticate: Basic realm="test"\r\n'
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
            else:
                await self._forward(method, target, headers, body, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _tunnel(self, target: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        if host not in _LOOPBACK:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _forward(self, method: str, target: str, headers: dict[str, str], body: bytes,
                       writer: asyncio.StreamWriter) -> None:
        """One request, on a connection of its own to the origin; the answer comes back
        with ``Connection: close`` (this proxy does not keep connections alive)."""
        url = urlsplit(target)
        if url.hostname not in _LOOPBACK:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        sent = [f"{method} {path} HTTP/1.1"]
        sent += [f"{k}: {v}" for k, v in headers.items() if k not in _HOP_BY_HOP]
        sent.append("Connection: close")
        up_writer.write(("\r\n".join(sent) + "\r\n\r\n").encode("latin-1") + body)
        await up_writer.drain()
        answer = await up_reader.read()
        up_writer.close()
        answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
        kept = [line for line in answer_head.split(b"\r\n")
                if not line.lower().startswith((b"connection:", b"keep-alive:"))]
        writer.write(b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n" + answer_body)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


__all__ = ["ForwardProxy", "ProxiedRequest"]

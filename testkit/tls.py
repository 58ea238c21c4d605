"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate for mutual TLS, and the wrong ones (another CA, a name
the server does not have, a key that matches nothing), written as PEM files. Elliptic-curve
keys, so a whole set is made in milliseconds inside a test.

:class:`TlsFront` terminates TLS in front of a plain loopback endpoint, as nginx or Envoy
do for a receiver that requires client certificates. It runs blocking ``ssl`` in a thread
because an asyncio server drops a refused client without sending it the TLS alert that
says why; real servers send it, and that alert is what the relay explains.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs, under one directory."""

    ca: Path               # the CA that signed server and client (what ca_bundle trusts)
    server: Pair           # for 127.0.0.1 and localhost, signed by ``ca``
    client: Pair           # clientAuth, signed by ``ca``
    other_ca: Path         # a CA nobody trusts
    untrusted_client: Pair  # signed by ``other_ca``: a server trusting ``ca`` refuses it
    wrong_name: Pair       # signed by ``ca`` but only for wrong.example
    stray_key: Path        # a key that belongs to no certificate here

    def server_context(self, *, require_client_cert: bool = False,
                       pair: Pair | None = None) -> ssl.SSLContext:
        """A server-side context presenting ``pair`` (default: the server certificate); with
        ``require_client_cert`` it refuses clients without a certificate signed by ``ca``."""
        pair = pair or self.server
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pair.cert, pair.key)
        if require_client_cert:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             ) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)))


def _ca(directory: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = _key()
    name = _name(f"profile-relay test {stem}")
    cert = (_builder(f"profile-relay test {stem}", name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key, _write_cert(cert, directory / f"{stem}.pem")


def _leaf(directory: Path, stem: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
          names: tuple[str, ...], usage: x509.ObjectIdentifier) -> Pair:
    ca_cert, ca_key = ca
    key = _key()
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    builder = (_builder(names[0], ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pair(_write_cert(cert, directory / f"{stem}.pem"),
                _write_key(key, directory / f"{stem}.key"))


def make_pki(directory: Path) -> Pki:
    """Write a fresh :class:`Pki` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _ca(directory, "ca")
    other_cert, other_key, other_path = _ca(directory, "other-ca")
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    return Pki(
        ca=ca_path,
        server=_leaf(directory, "server", (ca_cert, ca_key), LOOPBACK_NAMES, server_auth),
        client=_leaf(directory, "client", (ca_cert, ca_key), ("relay-client",), client_auth),
        other_ca=other_path,
        untrusted_client=_leaf(directory, "untrusted-client", (other_cert, other_key),
                               ("relay-client",), client_auth),
        wrong_name=_leaf(directory, "wrong-name", (ca_cert, ca_key), ("wrong.example",),
                         server_auth),
        stray_key=_write_key(_key(), directory / "stray.key"),
    )


@dataclass
class TlsFront:
    """``with TlsFront(ctx, upstream_port) as front``: accepts TLS on ``front.port`` with
    ``ctx`` (e.g. ``Pki.server_context(require_client_cert=True)``) and forwards each
    accepted connection's bytes to ``127.0.0.1:upstream_port``. ``clients`` holds the
    common name of each accepted client certificate ("" without one), ``refused`` the
    reason of each handshake it refused."""

    ctx: ssl.SSLContext
    upstream_port: int
    port: int = 0
    clients: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def start(self) -> Self:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        tls = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.refused.append(getattr(exc, "reason", None) or type(exc).__name__)
            _close_gently(tls)
            return
        peer = tls.getpeercert() or {}
        names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        self.clients.append(names[0] if names else "")
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            tls.close()
            return
        with contextlib.suppress(OSError), tls, upstream:
            self._relay(tls, upstream)

    def _relay(self, tls: ssl.SSLSocket, upstream: socket.socket) -> None:
        """Both directions in one thread: an SSL object must not be used by two at once."""
        while not self._stop.is_set():
            ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 0.1)[0]
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (upstream if sock is tls else tls).sendall(data)


def _close_gently(sock: socket.socket) -> None:
    """Close after a refused handshake without a TCP reset: the client must get to read the
    alert already sent, so its own unread bytes are drained first (briefly)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_WR)
        sock.settimeout(1)
        while socket.socket.recv(sock, 65536):
            pass
    with contextlib.suppress(OSError):
        socket.socket.close(sock)


__all__ = ["LOOPBACK_NAMES", "Pair", "Pki", "TlsFront", "make_pki"]

"""Serving the mock IdP with uvicorn: in the foreground (the CLI) or in a background thread (tests).

uvicorn does not put the TLS peer certificate in the ASGI scope, so :class:`_TlsAwareProtocol` adds the
ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM) from the transport's
``ssl_object``; the app derives RFC 8705 ``cnf.x5t#S256`` from it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from authz.clock import Clock, system_clock
from authz.errors import DependencyError
from authz.idp.app import build_app
from authz.idp.config import IdpConfig
from authz.idp.issuer import Issuer
from authz.idp.provider import Idp

__all__ = ["RunningIdp", "TlsFiles", "bind_socket", "running_idp", "serve"]

STARTUP_TIMEOUT = 10.0  # seconds for uvicorn to start listening; it takes ~50 ms on an idle machine
SHUTDOWN_TIMEOUT = 10.0  # seconds to wait for the server thread to finish after should_exit


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate and key (PEM files); with ``client_ca``, client certs are requested (optional)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class _TlsAwareProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that exposes the peer certificate as the ASGI TLS extension."""

    _peer_chain: list[str]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._peer_chain = []
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self._peer_chain = [ssl.DER_cert_to_PEM_cert(der)]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._peer_chain:
            self.scope["extensions"] = {"tls": {"client_cert_chain": list(self._peer_chain)}}


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), IPv6 when ``host`` is an IPv6 literal."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket, tls: TlsFiles | None) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _server(idp: Idp, tls: TlsFiles | None, log_level: str) -> uvicorn.Server:
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            # RFC 8705 section 2: request (but do not require) a client certificate.
            kwargs.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    config = uvicorn.Config(
        build_app(idp),
        http=_TlsAwareProtocol,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        server_header=False,
        **kwargs,
    )
    return uvicorn.Server(config)


def serve(
    idp: Idp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    log_level: str = "info",
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted (the CLI). ``announce(url)`` is called once the socket is bound."""
    sock = bind_socket(host, port)
    idp.base_url = _url(sock, tls)
    if announce is not None:
        announce(_url(sock, tls))
    _server(idp, tls, log_level).run(sockets=[sock])


@dataclass
class RunningIdp:
    """A server running in a background thread. ``url`` is its base URL (``http://127.0.0.1:PORT``)."""

    idp: Idp
    url: str

    def issuer(self, name: str = "") -> Issuer:
        return self.idp.issuer(name)

    def issuer_url(self, name: str = "") -> str:
        return self.idp.issuer(name).issuer_url

    def endpoint(self, path: str, name: str = "") -> str:
        """``endpoint("jwks")`` -> ``http://127.0.0.1:PORT/issuers/<name>/jwks``."""
        return f"{self.idp.issuer(name).endpoint_base}/{path.lstrip('/')}"


@contextlib.contextmanager
def running_idp(
    config: IdpConfig | Idp | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    clock: Clock = system_clock,
    log_level: str = "warning",
) -> Iterator[RunningIdp]:
    """Run the IdP on ``host:port`` (default: a free loopback port) in a thread for the ``with`` block."""
    idp = config if isinstance(config, Idp) else Idp.from_config(config, clock=clock)
    sock = bind_socket(host, port)
    url = _url(sock, tls)
    idp.base_url = url
    server = _server(idp, tls, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mock-idp", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DependencyError("the mock IdP did not start")
            time.sleep(0.01)
        yield RunningIdp(idp=idp, url=url)
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        sock.close()

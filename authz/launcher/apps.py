"""The demo services: tiny asyncio HTTP/1.1 apps (no framework) that show what reached them.

* ``orders`` (``--version v1|v2``) answers ``/orders...`` with JSON naming its version and the identity
  the sidecar passed on: the caller's SPIFFE ID (``x-forwarded-client-cert``, RFC-less Envoy XFCC) and the
  token's claims (``x-jwt-*`` from RequestAuthentication ``outputClaimToHeaders``).
* ``shadow`` receives mirrored traffic (its Host ends in ``-shadow``, Envoy ``RequestMirrorPolicy``).
* ``frontend`` answers ``/orders...`` by calling ``orders`` (``--upstream``), forwarding ``Authorization``,
  over mTLS with its own SVID (``--svid``) or through its sidecar's outbound listener.

Every app counts what it served at ``GET /_stats`` and answers ``GET /healthz``. Run one with
``python -m authz.launcher.apps orders --port 9081 --version v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "AppRequest",
    "AppResponse",
    "HttpRequestError",
    "frontend_handler",
    "main",
    "orders_handler",
    "parse_head",
    "serve_app",
    "shadow_handler",
]

MAX_HEAD_BYTES = 64 * 1024  # Envoy's default max_request_headers_kb is 60: nothing legitimate is larger
MAX_BODY_BYTES = 1024 * 1024  # the demo posts tiny JSON bodies
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle before the app closes it
UPSTREAM_TIMEOUT = 5.0  # frontend -> orders: bounded, so a stuck sidecar shows as a 504, not a hang
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Content Too Large", 502: "Bad Gateway"}
_REASONS |= {504: "Gateway Timeout", 401: "Unauthorized", 403: "Forbidden", 431: "Header Too Large"}


class HttpRequestError(ValueError):
    """A request the app cannot parse; answered with ``status`` and the connection closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AppRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class AppResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> AppResponse:
        return cls(
            status,
            json.dumps(payload, sort_keys=True).encode(),
            (("content-type", "application/json"), *headers),
        )

    def encode(self, *, keep_alive: bool) -> bytes:
        """RFC 9112 section 4 status line, section 6.2 Content-Length framing."""
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        lines += [
            f"content-length: {len(self.body)}",
            f"connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and header fields (RFC 9112 sections 3 and 5); names lower-cased, repeats joined
    with ``,`` (RFC 9110 section 5.3). Raises :class:`HttpRequestError`."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise HttpRequestError("undecodable head") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise HttpRequestError(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpRequestError(f"bad header line {line[:80]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]},{value.strip()}" if key in headers else value.strip()
    return parts[0].upper(), parts[1], headers


Handler = Callable[[AppRequest], Awaitable[AppResponse]]


async def _read_request(reader: asyncio.StreamReader) -> AppRequest | None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    except asyncio.LimitOverrunError as exc:
        raise HttpRequestError("request head too large", 431) from exc
    method, target, headers = parse_head(head[:-4])
    if "transfer-encoding" in headers:
        raise HttpRequestError("chunked request bodies are not supported by the demo apps")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise HttpRequestError("bad content-length")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise HttpRequestError("body too large", 413)
    body = await reader.readexactly(length) if length else b""
    return AppRequest(method, target, headers, body)


@dataclass
class AppStats:
    """What an app served, by (path kind, host suffix) -- the demo reads it at ``/_stats``."""

    requests: Counter[str] = field(default_factory=Counter)


async def serve_app(
    handler: Handler, host: str, port: int, *, name: str, stats: AppStats | None = None
) -> asyncio.Server:
    """Start an HTTP/1.1 keep-alive server; ``/healthz`` and ``/_stats`` are answered before ``handler``."""
    counts = stats or AppStats()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except HttpRequestError as exc:
                    writer.write(AppResponse.json(exc.status, {"error": str(exc)}).encode(keep_alive=False))
                    break
                if request is None:
                    break
                if request.path == "/healthz":
                    response = AppResponse.json(200, {"status": "ok", "app": name})
                elif request.path == "/_stats":
                    response = AppResponse.json(200, {"app": name, "requests": dict(counts.requests)})
                else:
                    host_header = request.headers.get("host", "")
                    counts.requests[
                        "shadow" if host_header.split(":")[0].endswith("-shadow") else "primary"
                    ] += 1
                    response = await handler(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                writer.write(response.encode(keep_alive=keep_alive))
                await writer.drain()
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    return await asyncio.start_server(connection, host, port, limit=MAX_HEAD_BYTES)


def _identity(headers: dict[str, str]) -> dict[str, str]:
    """What the sidecar told the app about the caller: XFCC (Envoy ``forward_client_cert_details``) and
    the ``x-jwt-*`` claim headers (Istio RequestAuthentication ``outputClaimToHeaders``)."""
    keys = ("x-forwarded-client-cert", "x-authz-principal", "x-request-id")
    return {k: v for k, v in headers.items() if k in keys or k.startswith("x-jwt-")}


def orders_handler(version: str) -> Handler:
    async def handle(request: AppRequest) -> AppResponse:
        if not request.path.startswith("/orders"):
            return AppResponse.json(404, {"error": "no such path", "path": request.path})
        return AppResponse.json(
            200,
            {
                "service": "orders",
                "version": version,
                "method": request.method,
                "path": request.target,
                "identity": _identity(request.headers),
                "authorization_forwarded": "authorization" in request.headers,
            },
            (("x-orders-version", version),),
        )

    return handle


async def shadow_handler(request: AppRequest) -> AppResponse:
    return AppResponse.json(200, {"service": "orders-shadow", "path": request.target})


def frontend_handler(client: httpx.AsyncClient, upstream: str, host_header: str) -> Handler:
    """Answer ``/orders...`` with the orders service's answer (status and JSON), forwarding the caller's
    ``Authorization`` header; trace headers are copied as Istio asks of applications."""
    forwarded = ("authorization", "x-request-id", "traceparent", "tracestate", "b3")

    async def handle(request: AppRequest) -> AppResponse:
        if not request.path.startswith("/orders"):
            return AppResponse.json(404, {"error": "no such path", "path": request.path})
        headers = {k: v for k, v in request.headers.items() if k in forwarded}
        if host_header:
            headers["host"] = host_header
        try:
            reply = await client.request(
                request.method, upstream + request.target, headers=headers, content=request.body
            )
        except httpx.TimeoutException:
            return AppResponse.json(
                504, {"service": "frontend", "error": f"orders did not answer in {UPSTREAM_TIMEOUT}s"}
            )
        except httpx.HTTPError as exc:
            return AppResponse.json(502, {"service": "frontend", "error": f"orders unreachable: {exc}"})
        try:
            body: object = reply.json()
        except ValueError:
            body = reply.text
        passed = tuple(
            (k, v)
            for k, v in reply.headers.items()
            if k in ("www-authenticate", "x-authz-decision-id", "x-orders-version")
        )
        return AppResponse.json(reply.status_code, {"service": "frontend", "orders": body}, passed)

    return handle


def _mtls_context(svid: Path) -> ssl.SSLContext:
    """Client side of mesh mTLS with an SVID: chain verified against the trust bundle; no host name check,
    since an SVID names a SPIFFE ID in a URI SAN, not a DNS name (SPIFFE X509-SVID section 2)."""
    ctx = ssl.create_default_context(cafile=str(svid / "bundle.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(svid / "chain.pem"), str(svid / "key.pem"))
    return ctx


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client: httpx.AsyncClient | None = None
    if args.app == "orders":
        handler = orders_handler(args.version)
    elif args.app == "shadow":
        handler = shadow_handler
    else:
        verify: ssl.SSLContext | bool = _mtls_context(Path(args.svid)) if args.svid else True
        client = httpx.AsyncClient(verify=verify, timeout=UPSTREAM_TIMEOUT)
        handler = frontend_handler(client, args.upstream.rstrip("/"), args.upstream_host)
    server = await serve_app(
        handler, args.host, args.port, name=f"{args.app}-{args.version}" if args.app == "orders" else args.app
    )
    print(f"{args.app} listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        if client is not None:
            await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.launcher.apps", description="a demo service")
    parser.add_argument("app", choices=["orders", "shadow", "frontend"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", default="v1", help="orders: the version it reports")
    parser.add_argument("--upstream", default="", help="frontend: base URL of orders (https:// for mTLS)")
    parser.add_argument(
        "--upstream-host", default="", help="frontend: Host header for orders (sidecar routing)"
    )
    parser.add_argument("--svid", default="", help="frontend: SVID directory for mTLS to orders")
    args = parser.parse_args(argv)
    if args.app == "frontend" and not args.upstream:
        parser.error("frontend needs --upstream")
    try:
        asyncio.run(_run(args))
    except OSError as exc:
        print(f"{args.app}: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

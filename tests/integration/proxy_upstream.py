"""Test upstreams for the proxy tests: an h11 HTTP/1.1 server (an independent parser, not ours) that records
every request and answers per a behaviour function. Binds 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

__all__ = ["Action", "Recorded", "ThreadedUpstream", "Upstream", "echo"]


@dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    port: int
    peer_principal: str = ""


@dataclass
class Action:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    hang: bool = False
    reset: bool = False
    delay: float = 0.0
    chunked: bool = False
    informational: bool = False


Behaviour = Callable[[Recorded], Awaitable[Action] | Action]


def echo(rec: Recorded) -> Action:
    data = json.dumps(
        {"method": rec.method, "target": rec.target, "headers": rec.headers, "port": rec.port}
    ).encode()
    return Action(200, [("content-type", "application/json")], data + rec.body)


class Upstream:
    def __init__(self, behaviour: Behaviour = echo, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.requests: list[Recorded] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        principal = ""
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.getpeercert():
            uris = [v for k, v in sslobj.getpeercert().get("subjectAltName", ()) if k == "URI"]
            principal = uris[0] if uris else ""
        try:
            while True:
                req = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.DONE:
                            return
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert req is not None
                raw = [(k.decode().lower(), v.decode()) for k, v in req.headers]
                joined: dict[str, str] = {}
                for k, v in raw:
                    joined[k] = f"{joined[k]},{v}" if k in joined else v
                rec = Recorded(
                    req.method.decode(), req.target.decode(), joined, raw, body, self.port, principal
                )
                self.requests.append(rec)
                result = self.behaviour(rec)
                action = await result if asyncio.iscoroutine(result) else result
                assert isinstance(action, Action)
                if action.delay:
                    await asyncio.sleep(action.delay)
                if action.hang:
                    await reader.read()  # until the proxy gives up and closes
                    return
                if action.reset:
                    writer.transport.abort()
                    return
                if action.informational:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                headers = list(action.headers)
                if action.chunked:
                    headers.append(("transfer-encoding", "chunked"))
                elif not any(k.lower() == "content-length" for k, _ in headers):
                    headers.append(("content-length", str(len(action.body))))
                writer.write(conn.send(h11.Response(status_code=action.status, headers=headers)))
                if action.body and req.method != b"HEAD":
                    if action.chunked:
                        for i in range(0, len(action.body), 7):
                            writer.write(conn.send(h11.Data(data=action.body[i : i + 7])))
                    else:
                        writer.write(conn.send(h11.Data(data=action.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError, ssl.SSLError):
            return
        finally:
            writer.close()
            self._tasks.discard(task)
            self._writers.discard(writer)


def sidecar_config(text: str) -> object:
    """Parse a multi-document YAML string into a SidecarConfig."""
    from authz.proxy.loader import parse_resources
    from authz.resources import parse_documents

    return parse_resources(parse_documents(text, "test.yaml"))


def service_entry(
    host: str, ports: list[int], *, labels: list[dict[str, str]] | None = None, extra: str = ""
) -> str:
    """A ServiceEntry with STATIC endpoints 127.0.0.1:<port> (service port 80, endpoint port: ports.http)."""
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        f"metadata: {{name: {host.split('.', maxsplit=1)[0]}, namespace: default}}",
        "spec:",
        f"  hosts: [{host}]",
        "  ports: [{number: 80, name: http, protocol: HTTP}]",
        "  resolution: STATIC",
        "  endpoints:",
    ]
    for i, port in enumerate(ports):
        lab = (labels or [{}] * len(ports))[i]
        lines.append(
            f"  - address: 127.0.0.1\n    ports: {{http: {port}}}\n    labels: {json.dumps(lab)}{extra}"
        )
    return "\n".join(lines) + "\n"


async def raw_exchange(
    port: int, data: bytes, *, timeout: float = 3.0, read_until_close: bool = True
) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the peer closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
                if not read_until_close:
                    break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return out


class ThreadedUpstream:
    """A thread-backed HTTP/1.1 upstream (stdlib ``http.server``, another parser again) that records the
    request line and raw header list of every request. Shared by a real Envoy and our proxy in the oracle
    tests: it runs outside the test's event loop, so either can reach it while the loop waits.

    ``/status/<code>`` answers that status (no body for 204/304), with the reason phrase "Made Up Phrase"
    under ``/status/<code>/odd-reason``; ``/hop-response`` answers with hop-by-hop fields; anything else
    answers 200 with a short body.
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Head and body go out in two writes: without TCP_NODELAY each response waits ~40 ms on
            # Nagle and the client's delayed ACK.
            disable_nagle_algorithm = True

            def _reply(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                # The target as it came on the wire: ``self.path`` folds a leading "//" into "/".
                target = self.raw_requestline.decode("latin-1").split(" ")[1]
                seen.append((self.command, target, [(k.lower(), v) for k, v in self.headers.items()]))
                status, headers, body = 200, [("content-type", "text/plain")], b"upstream-body"
                phrase = "Made Up Phrase" if self.path.endswith("/odd-reason") else None
                if self.path.startswith("/status/"):
                    status = int(self.path.split("/")[2])
                    body = b"" if status in (204, 304) else b"status-body"
                elif self.path == "/hop-response":
                    headers += [("connection", "x-secret"), ("x-secret", "1"), ("keep-alive", "timeout=5")]
                self.send_response(status, phrase)
                for k, v in headers:
                    self.send_header(k, v)
                if status not in (204, 304):
                    self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD" and status not in (204, 304):
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _reply

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ThreadedUpstream:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

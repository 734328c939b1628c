"""The inbound fast path (``Sidecar._serve_inbound_fast``: a request without a body in one coroutine, the
upstream try started in place on an idle pooled connection, the reply written in one write) against its
oracle, the general handler (``Sidecar(fast_path=False)``), over real loopback sockets.

Differential: the same configuration twice, each in front of its own recording app, the same raw bytes from
one client connection (one request at a time, or pipelined in one write); the client's bytes (request ids and
``date`` masked), what the app received, ``istio_requests_total`` and the authorizer counters must be equal.
Then the pooled-connection edge cases (a stale connection is resent once; a reset after the request was read
is not), and a spy showing the fast path is really taken (no ``Cluster.forward``) when it should be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps, Reason
from authz.proxy.cluster import Cluster
from authz.proxy.sidecar import Sidecar
from authz.request import Request, Workload
from tests.integration.proxy_upstream import Action, Recorded, Upstream, sidecar_config

pytestmark = pytest.mark.integration

BIG = 100_000  # an app body larger than the listener's 64 KiB coalescing limit (COALESCE_LIMIT)
EXCHANGE_TIMEOUT = 5.0  # one client conversation, all requests included


# -- the app ---------------------------------------------------------------------------------------------


def app_behaviour(rec: Recorded) -> Action:
    """What the app answers, by path (after the proxy's normalization)."""
    path = rec.target.partition("?")[0]
    if path == "/status/204":
        return Action(204)
    if path == "/status/304":
        return Action(304, [("etag", '"v1"')])
    if path == "/chunked":
        return Action(200, [("content-type", "text/plain")], b"0123456789" * 5, chunked=True)
    if path == "/big":
        return Action(200, [("content-type", "application/octet-stream")], bytes(range(256)) * (BIG // 256))
    if path == "/close":
        return Action(200, [("connection", "close")], b"bye")
    if path == "/continue":
        return Action(200, body=b"after-100", informational=True)
    if path == "/reset":
        return Action(reset=True)
    if path == "/hop":
        return Action(
            200, [("connection", "x-secret"), ("x-secret", "1"), ("keep-alive", "timeout=5")], b"hop"
        )
    # An echo without the app's port (it differs between the two sidecars' apps)
    data = json.dumps({"method": rec.method, "target": rec.target, "headers": rec.raw_headers}).encode()
    return Action(200, [("content-type", "application/json"), ("x-app", "echo")], data + rec.body)


@dataclass
class Reply:
    """One answer of a :class:`ScriptedApp`: 1xx heads first, then the final response."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    informational: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)
    close_after: bool = False
    """Close the connection right after answering, without ``connection: close`` (an idle-timeout close)."""


class ScriptedApp:
    """An h11 app for what :class:`Upstream` cannot do: any 1xx (103 Early Hints), closing a keep-alive
    connection right after answering, and (``drop_reused``) closing a reused connection when a request
    arrives on it, unread: the pooled connection the server had already given up on (RFC 9112 §9.3.1)."""

    def __init__(
        self,
        answer: Callable[[Recorded], Reply],
        *,
        drop_reused: str = "",  # "": serve; "close": FIN; "reset": RST
    ) -> None:
        self.answer = answer
        self.drop_reused = drop_reused
        self.requests: list[Recorded] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> ScriptedApp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            for _ in range(100):  # requests per connection, bounded
                head: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        if served and self.drop_reused and conn.their_state is h11.IDLE:
                            # wait for the next request's first bytes, then drop the connection unread
                            if not await reader.read(1):
                                return
                            if self.drop_reused == "reset":
                                writer.transport.abort()
                            else:
                                writer.close()
                            return
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        head = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert head is not None
                raw = [(k.decode().lower(), v.decode()) for k, v in head.headers]
                rec = Recorded(head.method.decode(), head.target.decode(), dict(raw), raw, body, self.port)
                self.requests.append(rec)
                reply = self.answer(rec)
                for status, headers in reply.informational:
                    writer.write(conn.send(h11.InformationalResponse(status_code=status, headers=headers)))
                headers = [*reply.headers, ("content-length", str(len(reply.body)))]
                writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)))
                if reply.body:
                    writer.write(conn.send(h11.Data(data=reply.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                served += 1
                if reply.close_after or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            writer.close()
            self._writers.discard(writer)


class App(Protocol):
    requests: list[Recorded]
    connections: int

    @property
    def port(self) -> int: ...

    async def close(self) -> None: ...


def early_hints(rec: Recorded) -> Reply:
    """103 Early Hints (RFC 8297) and a 100 before the final response; the proxy drops both."""
    return Reply(
        200,
        [("content-type", "text/plain")],
        f"final {rec.target}".encode(),
        informational=[(103, [("link", "</style.css>; rel=preload; as=style")]), (100, [])],
    )


def served_once(rec: Recorded) -> Reply:
    return Reply(200, [("content-type", "text/plain")], f"served {rec.target}".encode())


def closes_after_answering(rec: Recorded) -> Reply:
    return Reply(200, [("content-type", "text/plain")], f"served {rec.target}".encode(), close_after=True)


# -- the authorizer --------------------------------------------------------------------------------------

DENY_CHALLENGE = 'Bearer realm="web.shop", error="insufficient_scope"'
HEADER_OPS = HeaderOps(
    set=(("x-user", "alice"),),
    append=(("x-tag", "appended"),),
    remove=("x-drop",),
    response=(("x-authz-note", "ops-applied"),),
)


class ScriptedAuthorizer:
    """Deterministic, by path: ``/deny*`` 403 with a challenge, ``/unauth*`` 401, ``/raise*`` raises at
    once, ``/wait*`` must be awaited (``check_now`` None; ``/wait/raise*`` then raises in ``check``),
    ``/ops*`` allows with header changes, anything else allows. ``first_waits``: ``check_now`` answers None
    on its first call whatever the path (a token not seen before), a decision afterwards."""

    def __init__(self, *, first_waits: bool = False) -> None:
        self.first_waits = first_waits
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def decide(path: str) -> Decision:
        if path.startswith(("/raise", "/wait/raise")):
            raise RuntimeError("authorizer unavailable")
        if path.startswith("/deny"):
            return Decision(
                allowed=False,
                status=403,
                reason=Reason.DENIED_BY_POLICY,
                message="denied by ns[shop]-policy[deny-all]",
                www_authenticate=DENY_CHALLENGE,
                decision_id="decision-deny-1",
            )
        if path.startswith("/unauth"):
            return Decision(
                allowed=False,
                status=401,
                reason=Reason.INVALID_TOKEN,
                message="no token",
                www_authenticate='Bearer error="invalid_token"',
            )
        if path.startswith("/ops"):
            return Decision(allowed=True, status=200, reason=Reason.ALLOWED_BY_POLICY, headers=HEADER_OPS)
        return Decision(allowed=True, status=200, reason=Reason.ALLOWED_BY_POLICY)

    async def check(self, request: Request, workload: Workload) -> Decision:
        assert request.http is not None
        self.calls.append(("check", request.http.path))
        await asyncio.sleep(0)  # a real wait: the general path's await is not a no-op
        return self.decide(request.http.path)

    def check_now(self, request: Request, workload: Workload) -> Decision | None:
        assert request.http is not None
        path = request.http.path
        first = not self.calls
        self.calls.append(("now", path))
        if path.startswith("/wait") or (self.first_waits and first):
            return None
        return self.decide(path)


# -- the client ------------------------------------------------------------------------------------------


def request(method: str, target: str, *headers: str, body: bytes = b"", close: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: web.shop", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def method_of(raw: bytes) -> str:
    return raw.split(b" ", 1)[0].decode()


async def _read_response(
    reader: asyncio.StreamReader, method: str, pending: bytes, out: bytearray, statuses: list[int]
) -> tuple[bytes, bool]:
    """Read one response (1xx heads included, their statuses appended to ``statuses``) with h11 as the
    framing judge; returns (bytes received past it, whether the connection is over)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "web.shop")]))
    client.send(h11.EndOfMessage())
    if pending:
        client.receive_data(pending)  # (b"" would mean end of stream to h11)
    for _ in range(10_000):
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            return b"", True  # not HTTP we can frame: the raw bytes tell the difference
        if event is h11.NEED_DATA:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                data = b""  # a reset: the end, as far as framing goes
            out += data
            client.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse | h11.Response):
            statuses.append(event.status_code)
        elif isinstance(event, h11.EndOfMessage):
            rest, closed = client.trailing_data
            return rest, closed or client.their_state is h11.MUST_CLOSE
        if isinstance(event, h11.ConnectionClosed):
            return b"", True
    raise AssertionError("response never ended")


async def converse(port: int, requests: list[bytes], *, pipelined: bool) -> tuple[bytes, list[int]]:
    """Send ``requests`` over one connection (one at a time, or all in one write); returns every byte the
    proxy sent back until the last response or its close, and the status of each response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()
    statuses: list[int] = []
    pending = b""
    try:
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            if pipelined:
                writer.write(b"".join(requests))
            for raw in requests:
                if not pipelined:
                    writer.write(raw)
                pending, closed = await _read_response(reader, method_of(raw), pending, out, statuses)
                if closed:
                    break
            else:
                return bytes(out), statuses
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):  # whatever follows, until the proxy's close
                    out += data
    finally:
        writer.close()
    return bytes(out), statuses


UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DATE = re.compile(rb"(?im)^date: [^\r\n]*")


def normalize(raw: bytes) -> bytes:
    """Mask what is random per run: generated request ids (UUID-shaped, same length) and ``date``."""
    return DATE.sub(b"date: <date>", UUID.sub(b"<request-id>", raw))


# -- the rig ---------------------------------------------------------------------------------------------


def inbound_config(app_port: int, spec: str = "") -> str:
    return f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: web, namespace: shop}}
spec:
  workload: {{namespace: shop, serviceAccount: web, labels: {{app: web}}}}
  inbound: {{port: 0, appPort: {app_port}}}
  accessLog: false
{spec}"""


Seen = tuple[str, str, list[tuple[str, str]], bytes]


@dataclass
class Observed:
    client: bytes
    statuses: list[int]
    app: list[Seen]
    requests_total: dict[tuple[tuple[str, str], ...], float]
    checks: dict[str, float]
    forwards: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0


def samples(sidecar: Sidecar, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for metric in sidecar.metrics.registry.collect()
        for s in metric.samples
        if s.name == name
    }


def seen_by_app(app: App) -> list[Seen]:
    return [
        (r.method, r.target, [(k, normalize(v.encode()).decode()) for k, v in r.raw_headers], r.body)
        for r in app.requests
    ]


def spy_forward(cluster: Cluster, calls: list[dict[str, Any]]) -> None:
    """Record every ``Cluster.forward`` call (its keyword arguments) on this one cluster."""
    original = cluster.forward

    def forward(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        calls.append({"target": args[0].target, **kwargs})
        return original(*args, **kwargs)

    cluster.forward = forward  # type: ignore[method-assign,assignment]


async def observe(
    *,
    fast: bool,
    requests: list[bytes],
    pipelined: bool = False,
    spec: str = "",
    authorizer: Callable[[], object] = ScriptedAuthorizer,
    app: Callable[[], Awaitable[App]] | None = None,
    warm: bool = False,
) -> Observed:
    """One sidecar (fast path on or off) in front of its own app; one client conversation. ``warm``: an
    earlier connection's request leaves an idle pooled connection to the app (not part of the result)."""
    upstream: App = await (app() if app is not None else Upstream(app_behaviour).start())
    sidecar = Sidecar(
        sidecar_config(inbound_config(upstream.port, spec)),  # type: ignore[arg-type]
        authorizer=authorizer(),  # type: ignore[arg-type]
        fast_path=fast,
    )
    await sidecar.start()
    assert sidecar.inbound is not None and sidecar._gen.inbound is not None
    forwards: list[dict[str, Any]] = []
    try:
        if warm:
            await converse(sidecar.inbound.port, [request("GET", "/warm", close=True)], pipelined=False)
            upstream.requests.clear()
        spy_forward(sidecar._gen.inbound, forwards)
        client, statuses = await converse(sidecar.inbound.port, requests, pipelined=pipelined)
    finally:
        await sidecar.stop()  # lets every request in flight finish: its metrics are counted after this
        await upstream.close()
    totals = samples(sidecar, "istio_requests_total")
    if warm:  # the warm-up request's series
        key = next(k for k in totals if ("response_code", "200") in k and ("response_flags", "-") in k)
        totals[key] -= 1
        totals = {k: v for k, v in totals.items() if v}
    checks = {dict(k)["result"]: v for k, v in samples(sidecar, "meshauthz_proxy_authz_checks_total").items()}
    if warm:
        checks["allow"] -= 1
    return Observed(
        normalize(client),
        statuses,
        seen_by_app(upstream),
        totals,
        checks,
        forwards,
        upstream.connections,
    )


async def differential(**kwargs: Any) -> tuple[Observed, Observed]:
    fast = await observe(fast=True, **kwargs)
    general = await observe(fast=False, **kwargs)
    assert fast.client == general.client
    assert fast.statuses == general.statuses
    assert fast.app == general.app
    assert fast.requests_total == general.requests_total
    assert fast.checks == general.checks
    return fast, general


# -- 1. differential -------------------------------------------------------------------------------------


GET = request("GET", "/items?id=7&sort=asc", "Accept: application/json")
CASES: dict[str, tuple[list[bytes], str, list[int]]] = {
    # name: (requests, extra ProxyConfig spec, the statuses the client must see)
    "get-with-query": ([GET, request("GET", "/x", close=True)], "", [200, 200]),
    "several-gets": ([request("GET", f"/item/{i}?q={i}") for i in range(5)], "", [200] * 5),
    "head": ([request("HEAD", "/items"), request("HEAD", "/big"), GET], "", [200, 200, 200]),
    "post-with-body": (
        [request("POST", "/orders", "Content-Type: text/plain", body=b"one order"), GET],
        "",
        [200, 200],
    ),
    "post-empty": ([request("POST", "/orders"), GET], "", [200, 200]),
    "post-expect-continue": (
        [request("POST", "/orders", "Expect: 100-continue", body=b"payload"), GET],
        "",
        [100, 200, 200],
    ),
    "app-204": ([request("GET", "/status/204"), GET], "", [204, 200]),
    "app-304": ([request("GET", "/status/304", 'If-None-Match: "v1"'), GET], "", [304, 200]),
    "app-chunked": ([request("GET", "/chunked"), GET], "", [200, 200]),
    "app-big-body": ([request("GET", "/big"), GET], "", [200, 200]),
    "app-connection-close": ([request("GET", "/close"), GET, GET], "", [200, 200, 200]),
    "app-100-continue": ([request("GET", "/continue"), GET], "", [200, 200]),
    "app-hop-by-hop": ([request("GET", "/hop"), GET], "", [200, 200]),
    "app-resets": ([request("GET", "/reset"), GET, request("GET", "/reset")], "", [503, 200, 503]),
    "deny": ([request("GET", "/deny/x"), request("GET", "/unauth"), GET], "", [403, 401, 200]),
    "authorizer-raises-fail-closed": (
        [request("GET", "/raise"), request("GET", "/wait/raise"), GET],
        "",
        [403, 403, 200],
    ),
    "authorizer-raises-status-on-error": (
        [request("GET", "/raise"), request("GET", "/wait/raise"), GET],
        "  authorizer: {statusOnError: 503}\n",
        [503, 503, 200],
    ),
    "authorizer-raises-fail-open": (
        [request("GET", "/raise"), request("GET", "/wait/raise"), GET],
        "  authorizer: {failOpen: true}\n",
        [200, 200, 200],
    ),
    "authorizer-waits": ([request("GET", "/wait/a"), GET, request("GET", "/wait/b")], "", [200] * 3),
    "header-ops": (
        [request("GET", "/ops/a", "X-Drop: secret", "X-User: mallory", "X-Tag: client"), GET],
        "",
        [200, 200],
    ),
    "bad-path": ([request("GET", "/a/%00"), GET, request("GET", "/a/%00/b")], "", [400, 200, 400]),
    "normalized-path": ([request("GET", "/a/../b/%2e/./c"), request("GET", "/%61dmin")], "", [200, 200]),
    "client-request-id-kept": ([request("GET", "/rid", "X-Request-Id: client-id-1")], "", [200]),
    "two-request-ids-replaced": (
        [request("GET", "/rid", "X-Request-Id: one", "X-Request-Id: two"), GET],
        "",
        [200, 200],
    ),
    "absolute-form": ([request("GET", "http://web.shop/abs?x=1"), GET], "", [200, 200]),
    "http10": ([b"GET /old HTTP/1.0\r\nHost: web.shop\r\n\r\n"], "", [200]),
    "http10-chunked-app": ([b"GET /chunked HTTP/1.0\r\nHost: web.shop\r\n\r\n"], "", [200]),
    "client-close": ([GET, request("GET", "/bye", close=True)], "", [200, 200]),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("case", list(CASES))
async def test_fast_path_matches_the_general_path(case: str, pipelined: bool) -> None:
    requests, spec, expected = CASES[case]
    fast, general = await differential(requests=requests, spec=spec, pipelined=pipelined)
    # The differential alone would pass if both paths were broken the same way: pin the outcome too.
    assert fast.statuses == expected
    assert sum(fast.requests_total.values()) == sum(1 for s in expected if s >= 200)
    assert general.forwards, "the oracle serves every forwarded request through Cluster.forward"


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
async def test_app_1xx_heads_before_the_final_response_are_dropped_alike(pipelined: bool) -> None:
    async def app() -> App:
        return await ScriptedApp(early_hints).start()

    fast, _ = await differential(
        requests=[request("GET", "/hints"), request("GET", "/hints/2")], pipelined=pipelined, app=app
    )
    assert fast.statuses == [200, 200]
    assert b"link:" not in fast.client.lower()
    assert b"final /hints/2" in fast.client


async def test_first_check_awaited_then_decided_at_once() -> None:
    """``check_now`` None on its first call: the fast path declines before any effect and the general path
    awaits ``check``; afterwards the fast path decides at once. Counted once each way."""
    made: list[ScriptedAuthorizer] = []

    def authorizer() -> ScriptedAuthorizer:
        made.append(ScriptedAuthorizer(first_waits=True))
        return made[-1]

    requests = [request("GET", "/one"), request("GET", "/deny/two"), request("GET", "/three")]
    fast, _ = await differential(requests=requests, authorizer=authorizer)
    assert fast.statuses == [200, 403, 200]
    assert fast.checks == {"allow": 2, "deny": 1, "error": 0}
    fast_calls, general_calls = made[0].calls, made[1].calls
    # The oracle: asked now, told to wait, awaited; then decided at once.
    assert general_calls == [("now", "/one"), ("check", "/one"), ("now", "/deny/two"), ("now", "/three")]
    # The fast path asked, declined; the general path asked again (a decision now); check never awaited.
    assert fast_calls == [("now", "/one"), ("now", "/one"), ("now", "/deny/two"), ("now", "/three")]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
async def test_what_the_app_and_the_client_see_is_what_was_decided(fast: bool) -> None:
    """The differential's cases pinned: header changes of an allow, a deny's reply, request ids."""
    requests = [
        request("GET", "/ops/a", "X-Drop: secret", "X-User: mallory", "X-Tag: client"),
        request("GET", "/deny/x"),
        request("GET", "/rid", "X-Request-Id: client-id-1"),
        request("GET", "/rid", "X-Request-Id: one", "X-Request-Id: two"),
        request("GET", "/rid"),
    ]
    observed = await observe(fast=fast, requests=requests)
    assert observed.statuses == [200, 403, 200, 200, 200]
    ops, kept, two, fresh = (dict_of(headers) for _, _, headers, _ in observed.app)
    assert [(k, v) for k, v in observed.app[0][2] if k.startswith("x-") and k != "x-request-id"] == [
        ("x-tag", "client"),
        ("x-user", "alice"),
        ("x-tag", "appended"),
    ]  # set replaces, append adds after, remove drops (Envoy CheckResponse OkHttpResponse)
    assert "x-drop" not in ops
    assert kept["x-request-id"] == ["client-id-1"]  # one sane id: kept
    assert two["x-request-id"] == ["one,two"]  # two: one value in their place
    assert fresh["x-request-id"] == ["<request-id>"]  # none: a fresh UUID
    replies = observed.client.split(b"HTTP/1.1 ")[1:]
    assert b"\r\nx-authz-note: ops-applied\r\n" in replies[0]
    deny_head, _, deny_body = replies[1].partition(b"\r\n\r\n")
    assert deny_head.startswith(b"403 Forbidden\r\n")
    assert f"\r\nwww-authenticate: {DENY_CHALLENGE}\r\n".encode() in deny_head
    assert b"\r\nx-authz-decision-id: decision-deny-1\r\n" in deny_head
    assert json.loads(deny_body) == {
        "reason": "denied_by_policy",
        "message": "denied by ns[shop]-policy[deny-all]",
        "decision_id": "decision-deny-1",
    }


def dict_of(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(k, []).append(v)
    return out


class GarbageAuthorizer(ScriptedAuthorizer):
    """Allows ``/boom`` with header changes that are not a HeaderOps: the proxy's step applying them raises.
    (A value that is not a Decision at all is refused where the compiled proxy receives it, as an
    authorizer failure: a deny.)"""

    def check_now(self, request: Request, workload: Workload) -> Any:
        assert request.http is not None
        if request.http.path == "/boom":
            return Decision(allowed=True, status=200, reason="allowed", headers=cast(Any, object()))
        return super().check_now(request, workload)


@pytest.mark.parametrize("where", ["admission", "upstream"])
async def test_a_bug_in_a_step_is_a_500_on_both_paths(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A step that raises (a bug) on ``/boom`` answers 500 and keeps the connection, as the listener does
    for a handler that raises, whichever path serves the request (``/boom`` comes second: the fast path
    serves it on the pooled connection ``/one`` left)."""
    authorizer: Callable[[], object] = ScriptedAuthorizer
    if where == "admission":
        authorizer = GarbageAuthorizer
    else:
        response = Cluster.response

        def broken_response(self: Cluster, head: Any, req: Any, *args: Any) -> Any:
            if req.target == "/boom":
                raise RuntimeError("a bug")
            return response(self, head, req, *args)

        monkeypatch.setattr(Cluster, "response", broken_response)
    requests = [request("GET", "/one"), request("GET", "/boom"), request("GET", "/three")]
    fast, _ = await differential(requests=requests, authorizer=authorizer)
    assert fast.statuses == [200, 500, 200]
    assert fast.client.count(b"internal error") == 1


# -- 2. pooled connections -------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_a_stale_pooled_connection_is_resent_once_on_a_fresh_one(drop: str) -> None:
    """The app drops its idle keep-alive connection just as the next request arrives (unread): the request
    is resent on a fresh connection, answered, and the app sees it exactly once."""

    async def app() -> App:
        return await ScriptedApp(served_once, drop_reused=drop).start()

    requests = [request("GET", "/one"), request("GET", "/two"), request("GET", "/three")]
    fast, general = await differential(requests=requests, app=app)
    assert fast.statuses == [200, 200, 200]
    assert [seen[1] for seen in fast.app] == ["/one", "/two", "/three"]
    assert fast.connections == general.connections == 3  # each reused connection dropped, one fresh each
    ((labels, count),) = fast.requests_total.items()
    assert ("response_code", "200") in labels and ("response_flags", "-") in labels and count == 3
    # The fast path started /two and /three on the pooled connection, then resent through forward.
    assert [(f["target"], f.get("resent", False)) for f in fast.forwards] == [
        ("/one", False),
        ("/two", True),
        ("/three", True),
    ]
    assert [(f["target"], f.get("resent", False)) for f in general.forwards] == [
        ("/one", False),
        ("/two", False),
        ("/three", False),
    ]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_non_idempotent_request_on_a_stale_connection_is_not_resent(method: str) -> None:
    """The same stale connection under a non-idempotent request (no body: the fast path's case for POST is
    an empty one): a proxy must not retry it by itself (RFC 9110 §9.2.2, RFC 9112 §9.3.1), so the client
    gets 503 UC, on both paths."""

    async def app() -> App:
        return await ScriptedApp(served_once, drop_reused="close").start()

    requests = [request("GET", "/one"), request(method, "/two")]
    fast, general = await differential(requests=requests, app=app)
    assert fast.statuses == [200, 503]
    assert [seen[1] for seen in fast.app] == ["/one"]
    assert b"reset reason: connection termination" in fast.client
    assert [(f["target"], f.get("resent", False)) for f in general.forwards] == [
        ("/one", False),
        ("/two", False),
    ]


async def test_an_app_closing_after_each_answer_serves_every_request_once() -> None:
    async def app() -> App:
        return await ScriptedApp(closes_after_answering).start()

    requests = [request("GET", f"/n/{i}") for i in range(4)]
    fast, general = await differential(requests=requests, app=app)
    assert fast.statuses == [200] * 4
    assert [seen[1] for seen in fast.app] == [f"/n/{i}" for i in range(4)]
    assert fast.connections == general.connections == 4


async def test_a_reset_after_the_request_was_read_is_503_uc_and_not_resent() -> None:
    """First request on a fresh connection: the app read it, then reset: nothing to resend safely."""
    fast, general = await differential(requests=[request("GET", "/reset")])
    for observed in (fast, general):
        assert observed.statuses == [503]
        assert b"reset reason: connection termination" in observed.client
        assert [seen[1] for seen in observed.app] == ["/reset"]
        ((labels, count),) = observed.requests_total.items()
        assert ("response_code", "503") in labels and ("response_flags", "UC") in labels
        assert count == 1


async def test_a_reset_on_a_reused_connection_is_resent_once_alike() -> None:
    """The app resets a *reused* connection after reading the request: the proxy cannot tell this from a
    stale connection (no response byte came back), so both paths resend it once on a fresh connection,
    where the app resets again: 503 UC, and the app has seen the request twice."""
    fast, general = await differential(requests=[request("GET", "/reset")], warm=True)
    for observed in (fast, general):
        assert observed.statuses == [503]
        assert [seen[1] for seen in observed.app] == ["/reset", "/reset"]
        ((labels, count),) = observed.requests_total.items()
        assert ("response_flags", "UC") in labels and count == 1
    assert [(f["target"], f.get("resent", False)) for f in fast.forwards] == [("/reset", True)]
    assert [(f["target"], f.get("resent", False)) for f in general.forwards] == [("/reset", False)]


# -- 3. the fast path is taken ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast", "forwarded"),
    [
        # first GET: no pooled connection yet; second GET: idle connection, served in place; POST: a body;
        # GET after it: in place again; HEAD: always general
        (True, ["/first", "/post", "/head"]),
        (False, ["/first", "/second", "/post", "/again", "/head"]),  # the control: everything forwarded
    ],
)
async def test_the_fast_path_skips_cluster_forward_on_an_idle_pooled_connection(
    fast: bool, forwarded: list[str]
) -> None:
    requests = [
        request("GET", "/first"),
        request("GET", "/second"),
        request("POST", "/post", body=b"body"),
        request("GET", "/again"),
        request("HEAD", "/head"),
    ]
    observed = await observe(fast=fast, requests=requests)
    assert observed.statuses == [200] * 5
    assert [f["target"] for f in observed.forwards] == forwarded
    assert [seen[1] for seen in observed.app] == ["/first", "/second", "/post", "/again", "/head"]
    assert observed.connections == 1  # one pooled connection served them all


async def test_the_fast_path_declines_when_the_authorizer_must_be_awaited() -> None:
    observed = await observe(fast=True, requests=[request("GET", "/first"), request("GET", "/wait/x")])
    assert [f["target"] for f in observed.forwards] == ["/first", "/wait/x"]


# -- 4. property: random conversations -------------------------------------------------------------------

SEGMENTS = ["a", "b", "..", ".", "%2e", "%2E%2e", "deny", "wait", "ops", "status", "204", "chunked"]
APP_BEHAVIOURS = ["echo", "chunked", "no-content", "close", "reset-first"]


def property_app(kind: str) -> Callable[[Recorded], Action]:
    served: list[int] = []

    def behaviour(rec: Recorded) -> Action:
        served.append(1)
        if kind == "chunked":
            return Action(200, body=rec.target.encode() + rec.body, chunked=True)
        if kind == "no-content":
            return Action(204)
        if kind == "close":
            return Action(200, [("connection", "close")], rec.target.encode())
        if kind == "reset-first" and len(served) == 1:
            return Action(reset=True)
        return app_behaviour(rec)

    return behaviour


conversation = st.lists(
    st.tuples(
        st.sampled_from(["GET", "GET", "HEAD", "POST"]),
        st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4),
        st.binary(max_size=24),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=conversation, kind=st.sampled_from(APP_BEHAVIOURS), pipelined=st.booleans())
async def test_random_conversations_match_the_general_path(
    steps: list[tuple[str, list[str], bytes]], kind: str, pipelined: bool
) -> None:
    requests = [
        request(method, "/" + "/".join(path), body=body if method == "POST" else b"")
        for method, path, body in steps
    ]

    async def app() -> App:
        return await Upstream(property_app(kind)).start()

    fast, _ = await differential(requests=requests, pipelined=pipelined, app=app)
    finals = len([s for s in fast.statuses if s >= 200])
    if all(method != "POST" or not body for method, _, body in steps):
        assert finals == len(requests)
    else:  # a body refused unread (a deny, a bad path) ends the connection (RFC 9112 §9.3)
        assert 1 <= finals <= len(requests)

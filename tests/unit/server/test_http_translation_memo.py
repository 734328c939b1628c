"""The HTTP front's translation memo: a read that repeats an earlier check but for the values of headers no
check reads is answered with the Request the earlier one translated to (authz.server.http_ext_authz).

The reference is a connection without the memo that decodes every field one by one. Byte streams of
Envoy-like checks (request ids and trace context that change, odd bytes in them, tokens, paths, bodies,
pipelining, arbitrary read boundaries, two peers) must get byte-identical answers from both, with a checker
that reads everything but the ignorable headers, as the engine guarantees (Engine.ignorable_headers).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps
from authz.request import Request
from authz.server.http_ext_authz import HttpCheckSettings, HttpExtAuthzProtocol, TranslationMemo
from tests.unit.server.test_http_front_headers import FakeTransport as Transport
from tests.unit.server.test_http_front_headers import malformed

IGNORABLE = frozenset({"x-request-id", "traceparent"})


def decide(request: Request) -> Decision:
    """A deterministic decision from everything in the request but the ignorable headers' values."""
    http = request.http
    assert http is not None
    seen = sorted((k, v) for k, v in http.headers.items() if k not in IGNORABLE)
    facts = (http.method, http.path, seen, request.source, request.destination, request.sni)
    digest = hashlib.sha256(repr((facts, sorted(request.context_extensions.items()))).encode()).hexdigest()
    allowed = http.path.startswith("/ok")
    ops = HeaderOps(set=(("x-digest", digest[:16]),)) if allowed else HeaderOps()
    return Decision(
        allowed=allowed, status=200 if allowed else 403, reason="r", headers=ops, decision_id=digest[:8]
    )


class Checker:
    """check, check_now and check_again over :func:`decide`, recording what each was asked."""

    def __init__(self, *, now: bool = True) -> None:
        self.now = now
        self.asked: list[Request] = []
        self.again: list[Request] = []

    async def check(self, request: Request) -> Decision:
        self.asked.append(request)
        await asyncio.sleep(0)
        return decide(request)

    def check_now(self, request: Request) -> Decision | None:
        self.asked.append(request)
        return decide(request) if self.now else None

    def check_again(self, request: Request) -> Decision | None:
        self.again.append(request)
        return decide(request) if self.now else None


def connect(
    checker: Checker,
    memo: TranslationMemo | None,
    peer: tuple[str, int] = ("10.9.8.7", 41000),
    trust: bool = True,
) -> tuple[HttpExtAuthzProtocol, Transport]:
    proto = HttpExtAuthzProtocol(
        checker.check,
        HttpCheckSettings(trust_envoy_headers=trust),
        malformed,
        check_now=checker.check_now,
        planned=memo is not None,  # the reference decodes field by field
        memo=memo,
    )
    transport = Transport(peer)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


def feed(chunks: list[bytes], proto: HttpExtAuthzProtocol, transport: Transport) -> bytes:
    async def run() -> None:
        for chunk in chunks:
            proto.data_received(chunk)
            for _ in range(4):  # let a waiting check finish before the next read
                await asyncio.sleep(0)

    asyncio.run(run())
    return b"".join(transport.out)


def message(
    path: bytes = b"/ok",
    *,
    rid: bytes = b"r-1",
    token: bytes = b"t1",
    trace: bytes | None = None,
    source: bytes | None = b"+10.1.2.3:5555",
    rid_name: bytes = b"x-request-id",
    body: bytes = b"",
    close: bool = False,
) -> bytes:
    lines = [
        b"GET " + path + b" HTTP/1.1",
        b"host: svc",
        b"content-length: %d" % len(body),
        rid_name + b": " + rid,
        b"authorization: Bearer " + token,
    ]
    if trace is not None:
        lines.append(b"traceparent: " + trace)
    if source is not None:
        lines.append(b"x-authz-source-address: " + source)
    lines.append(b"x-authz-namespace: +ns")
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def memo_for(names: Callable[[], frozenset[str]], checker: Checker) -> TranslationMemo:
    return TranslationMemo(names, checker.check_again)


def test_a_repeat_but_for_its_request_id_is_answered_from_the_memo() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    proto, transport = connect(checker, memo)
    reads = [message(rid=b"id-%d" % i) for i in range(6)]
    out = feed(reads, proto, transport)
    ref_checker = Checker()
    assert out == feed(reads, *connect(ref_checker, None))
    # The first read is translated and teaches the peer's ignorable headers, the second's key is noted,
    # the third (its second sight) is remembered, the rest are answered with the third's Request, through
    # check_again.
    assert len(checker.asked) == 3 and len(checker.again) == 3
    assert all(r is checker.asked[2] for r in checker.again)
    assert len(memo.entries) == 1


def test_checks_that_never_repeat_keep_nothing() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    reads = [message(path=b"/ok/%d" % i, rid=b"id-%d" % i) for i in range(50)]
    assert feed(reads, *connect(checker, memo)) == feed(reads, *connect(Checker(), None))
    assert not memo.entries and not checker.again


def test_a_changed_set_of_ignorable_headers_drops_the_entries() -> None:
    names = [IGNORABLE]
    checker = Checker()
    memo = memo_for(lambda: names[0], checker)
    proto, transport = connect(checker, memo)
    feed([message(rid=b"a"), message(rid=b"b"), message(rid=b"c"), message(rid=b"d")], proto, transport)
    assert len(checker.again) == 1
    names[0] = frozenset({"traceparent"})  # a policy now reads x-request-id
    transport.out.clear()
    reads = [message(rid=b"e"), message(rid=b"f"), message(rid=b"g"), message(rid=b"h")]
    out = feed(reads, proto, transport)
    assert out == feed(reads, *connect(Checker(), None))
    assert len(checker.again) == 1 and not memo.entries  # every read translated again, none kept
    assert len(checker.asked) == 3 + 4


def test_values_that_are_not_plain_take_the_full_path() -> None:
    for odd in (b"a\x01b", b"caf\xc3\xa9", b"\xff", b"a\x7fb"):
        checker = Checker()
        proto, transport = connect(checker, memo_for(lambda: IGNORABLE, checker))
        reads = [message(rid=b"x"), message(rid=b"y"), message(rid=odd)]
        assert feed(reads, proto, transport) == feed(reads, *connect(Checker(), None)), odd
        assert not checker.again, odd


def test_a_source_taken_from_the_connection_binds_the_entry_to_that_peer() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    reads = [message(rid=b"a", source=None), message(rid=b"b", source=None), message(rid=b"c", source=None)]
    first = connect(checker, memo, peer=("192.0.2.1", 1111))
    second = connect(checker, memo, peer=("192.0.2.2", 2222))
    feed(reads, *first)
    assert len(memo.entries) == 1
    later = [message(rid=b"c", source=None), message(rid=b"d", source=None)]
    out = feed(later, *second)
    assert out == feed(later, *connect(Checker(), None, peer=("192.0.2.2", 2222)))
    assert all(r.source.address == "192.0.2.2" for r in checker.again)


def test_a_check_that_must_wait_takes_the_full_path_in_order() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    proto, transport = connect(checker, memo)
    feed([message(rid=b"a"), message(rid=b"b"), message(rid=b"c")], proto, transport)
    checker.now = False  # a token to verify: check_again and check_now decline, check decides
    reads = [message(rid=b"c"), message(rid=b"d", path=b"/no")]
    transport.out.clear()
    out = feed(reads, proto, transport)
    assert out == feed(reads, *connect(Checker(), None))
    assert len(checker.again) == 1  # asked once, declined


def test_stopping_answers_with_connection_close_without_the_memo() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    proto, transport = connect(checker, memo)
    feed([message(rid=b"a"), message(rid=b"b")], proto, transport)
    proto.stop_gracefully()  # idle: closes at once
    assert transport.closed
    proto2, transport2 = connect(checker, memo)
    proto2.data_received(message(rid=b"c")[:10])
    proto2.stop_gracefully()
    proto2.data_received(message(rid=b"c")[10:])
    assert b"connection: close" in b"".join(transport2.out)


# -- generated streams -------------------------------------------------------------------------------------
RIDS = st.sampled_from(
    [b"r1", b"r2", b"r3", b"", b"\t", b"a b", b"a\x01b", b"caf\xc3\xa9", b"\xff", b"x\x7f"]
)
# The parts of a check other than its request id and trace context: a stream draws its checks from one
# or two of these, so that reads repeat but for the ignorable values, as behind Envoy.
SHAPES = st.fixed_dictionaries(
    {
        "path": st.sampled_from([b"/ok", b"/ok?x=1", b"/no", b"/ok/%C3%A9"]),
        "token": st.sampled_from([b"t1", b"t2"]),
        "source": st.sampled_from([b"+10.1.2.3:5555", None]),
        "rid_name": st.sampled_from([b"x-request-id", b"x-request-id", b"X-Request-Id", b"x-trace"]),
        "body": st.sampled_from([b"", b"", b"", b"abc"]),
        "close": st.sampled_from([False, False, False, False, False, True]),
        "traced": st.booleans(),
    }
)
TRACES = st.sampled_from([b"00-aa-bb-01", b"00-cc-dd-01", b"\x01"])


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Reads of checks drawn from one or two shapes: most whole, some glued to the next (pipelined), some
    split at a drawn point."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=2))
    reads: list[bytes] = []
    pending = b""
    for _ in range(draw(st.integers(1, 12))):
        shape = dict(draw(st.sampled_from(shapes)))
        trace = draw(TRACES) if shape.pop("traced") else None
        pending += message(rid=draw(RIDS), trace=trace, **shape)
        how = draw(st.sampled_from(["whole", "whole", "whole", "glue", "split"]))
        if how == "glue":
            continue
        if how == "split":
            cut = draw(st.integers(1, len(pending) - 1))
            reads.extend((pending[:cut], pending[cut:]))
        else:
            reads.append(pending)
        pending = b""
    if pending:
        reads.append(pending)
    return reads


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans(), st.booleans())
def test_streams_are_answered_as_without_the_memo(reads: list[bytes], trust: bool, waits: bool) -> None:
    checker = Checker(now=not waits)
    memo = memo_for(lambda: IGNORABLE, checker)
    peers = (("10.9.8.7", 41000), ("10.9.8.8", 42000))
    for peer in peers:  # a second connection (another peer) shares the memo the first filled
        out = feed(reads, *connect(checker, memo, peer=peer, trust=trust))
        assert out == feed(reads, *connect(Checker(now=not waits), None, peer=peer, trust=trust))


def test_pipelined_and_partial_reads_are_not_remembered() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    proto, transport = connect(checker, memo)
    pair = [
        message(rid=b"a") + message(rid=b"b", path=b"/no"),
        message(rid=b"c") + message(rid=b"d", path=b"/no"),
    ]
    tail = message(rid=b"f", path=b"/ok?2")
    partial = [message(rid=b"e") + tail[:20], tail[20:], message(rid=b"g") + tail[:20], tail[20:]]
    reads = [message(rid=b"0"), *pair, *partial]
    assert feed(reads, proto, transport) == feed(reads, *connect(Checker(), None))
    assert not memo.entries and not checker.again


# -- with the engine ---------------------------------------------------------------------------------------
DENY_ON = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-on, namespace: ns}}
spec:
  action: DENY
  rules:
  - when: [{{key: "request.headers[{name}]", values: ["bad"]}}]
"""


def _engine_connection(text: str) -> tuple[HttpExtAuthzProtocol, Transport, TranslationMemo]:
    from authz.authn import Authenticator
    from authz.clock import FrozenClock
    from authz.config import MeshConfig
    from authz.engine import Engine
    from tests.unit.test_engine import snapshot

    snap = snapshot(text)
    clock = FrozenClock()
    engine = Engine(
        snap,
        mesh=MeshConfig(),
        authenticator=Authenticator(settings=snap.authn_settings, clock=clock),
        clock=clock,
    )
    memo = TranslationMemo(engine.ignorable_headers, engine.check_again)
    proto = HttpExtAuthzProtocol(
        engine.check, HttpCheckSettings(), engine.malformed, check_now=engine.check_now, memo=memo
    )
    transport = Transport(("10.9.8.7", 41000))
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, memo


def _statuses(out: bytes) -> list[bytes]:
    return [answer[:3] for answer in out.split(b"HTTP/1.1 ")[1:]]


def test_with_the_engine_a_header_a_policy_reads_is_never_left_out() -> None:
    # The policy reads x-request-id: the engine does not call it ignorable, so no read is answered from
    # another's translation and the "bad" id is denied.
    proto, transport, memo = _engine_connection(DENY_ON.format(name="X-Request-Id"))
    reads = [message(rid=b"g1"), message(rid=b"g2"), message(rid=b"bad"), message(rid=b"g3")]
    assert _statuses(feed(reads, proto, transport)) == [b"200", b"200", b"403", b"200"]
    assert not memo.entries
    # Reading traceparent instead: the request id is ignorable, the memo answers, a bad trace is denied.
    proto, transport, memo = _engine_connection(DENY_ON.format(name="traceparent"))
    reads = [message(rid=b"%d" % i, trace=b"bad" if i == 3 else b"ok") for i in range(5)]
    assert _statuses(feed(reads, proto, transport)) == [b"200", b"200", b"200", b"403", b"200"]
    assert memo.entries


def test_an_entry_is_used_only_for_its_own_key_not_for_its_hash() -> None:
    checker = Checker()
    memo = memo_for(lambda: IGNORABLE, checker)
    proto, transport = connect(checker, memo)
    feed([message(rid=b"a"), message(rid=b"b"), message(rid=b"c")], proto, transport)
    ((hashed, (key, request, keep_alive, bound)),) = memo.entries.items()
    # Another key in the same slot (as a hash collision would put it): the read must not get its Request.
    memo.entries[hashed] = ((*key[:-1], key[-1] + b"x"), request, keep_alive, bound)
    feed([message(rid=b"d")], proto, transport)
    assert not checker.again and checker.asked[-1] is not request


def test_a_peer_without_ignorable_headers_is_learnt_once() -> None:
    checker = Checker()
    proto, transport = connect(checker, memo_for(lambda: IGNORABLE, checker))
    reads = [message(rid=b"%d" % i, rid_name=b"x-other") for i in range(4)]
    assert feed(reads, proto, transport) == feed(reads, *connect(Checker(), None))
    assert proto._needles == () and not proto._learn  # nothing to cut: no key is tried, nothing relearnt
    assert not checker.again

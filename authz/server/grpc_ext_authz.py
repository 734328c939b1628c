"""gRPC ``envoy.service.auth.v3.Authorization/Check`` front (messages from ``xds-protos``, upb-backed).

Only translation lives here: :func:`request_from_check` turns a CheckRequest into the one internal
:class:`~authz.request.Request`; :func:`response_from_decision` turns a :class:`~authz.decision.Decision`
into a CheckResponse, and :func:`response_bytes` into the same reply already serialized (its encoding
cached per shape of decision, the decision id appended: what the servicer sends). All are pure; the
servicer glues them to ``grpc.aio`` (registered by :func:`add_to_server` so its bytes go out unchanged)
and never lets an exception escape to gRPC (an internal error becomes a deny, fail closed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from authz.decision import Decision, Reason, value_builder
from authz.errors import MalformedRequest
from authz.metrics import INTERNAL_ERRORS
from authz.request import EMPTY_MAP, HttpAttributes, Peer, Request
from authz.server.limits import MAX_HEADER_COUNT, MAX_HEADERS_BYTES, MAX_PATH_BYTES

__all__ = [
    "AuthorizationServicer",
    "Checker",
    "add_to_server",
    "denied_body",
    "request_from_check",
    "response_bytes",
    "response_from_decision",
]

log = logging.getLogger("authz.server.grpc")

Checker = Callable[[Request], Awaitable[Decision]]
"""The engine, as the fronts see it: a Request in, a Decision out. Never raises for a deny."""

# google.rpc.Code values (grpc/status codes) for the CheckResponse status.
_GRPC_OK = 0
_GRPC_INVALID_ARGUMENT = 3
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAUTHENTICATED = 16

_SET = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


# Request(...), HttpAttributes(...) and Peer(...) at half the cost (authz.decision.value_builder).
_build_request = value_builder(Request)
_build_http = value_builder(HttpAttributes)
_build_peer = value_builder(Peer)

# Peers by their encoded AttributeContext.Peer: behind one Envoy the destination is the same on every check
# and the source on every check of a downstream connection. Equal bytes are an equal message, hence an
# equal Peer. Bounded in entries (dropped whole when full) and in key size (a leaf certificate is a few
# KiB; anything larger is translated every time rather than held).
MAX_CACHED_PEERS = 1024
MAX_CACHED_PEER_BYTES = 16 * 1024
_peers: dict[bytes, Peer] = {}


def _peer_from(pb: Any) -> Peer:
    sa = pb.address.socket_address
    cert = pb.certificate
    return _build_peer(
        address=sa.address,
        port=sa.port_value,
        principal=pb.principal,
        # Envoy URL-encodes the PEM of include_peer_certificate (%0A, %20, %2B, ...).
        certificate=unquote(cert) if cert else "",
    )


def _peer(pb: Any) -> Peer:
    """The :class:`Peer` of an ``AttributeContext.Peer``, memoized by its encoding (one C call)."""
    key: bytes = pb.SerializeToString()
    found = _peers.get(key)
    if found is None:
        found = _peer_from(pb)
        if len(key) <= MAX_CACHED_PEER_BYTES:
            if len(_peers) >= MAX_CACHED_PEERS:
                _peers.clear()
            _peers[key] = found
    return found


def _context_extensions(ctx: Any) -> Mapping[str, str]:
    """The route's ``context_extensions``; indexing by key costs less than upb's ``items()``."""
    return {k: ctx[k] for k in ctx} if ctx else EMPTY_MAP


def _headers(http: Any, path: str, body: str, raw_body: bytes) -> Mapping[str, str]:
    """Lower-case header map; duplicates joined with ``,`` (Envoy already does so in ``headers``)."""
    headers_pb = http.headers
    if headers_pb:
        count = len(headers_pb)
        if count > MAX_HEADER_COUNT:
            raise MalformedRequest(f"{count} headers, more than {MAX_HEADER_COUNT}")
        # The encoded size (computed in C) bounds the text: cheaper than summing every key and value.
        size = http.ByteSize() - len(body) - len(raw_body) - len(path)
        if size > MAX_HEADERS_BYTES + 4 * count:  # + map-entry framing, a few bytes per header
            raise MalformedRequest(f"headers of about {size} bytes, more than {MAX_HEADERS_BYTES}")
        return {k: headers_pb[k] for k in headers_pb}  # cheaper than dict(): upb's items() is slow
    entries = http.header_map.headers
    if not entries:
        return EMPTY_MAP
    if len(entries) > MAX_HEADER_COUNT:
        raise MalformedRequest(f"{len(entries)} headers, more than {MAX_HEADER_COUNT}")
    out: dict[str, str] = {}
    size = 0
    for e in entries:  # bounded: at most MAX_HEADER_COUNT entries (checked above)
        # encode_raw_headers: values arrive as bytes in raw_value; they must be valid UTF-8 text for us.
        raw_value = e.raw_value
        if raw_value:
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedRequest(f"header {e.key!r} is not valid UTF-8") from None
        else:
            value = e.value
        key = e.key.lower()
        size += len(key) + len(value)
        out[key] = f"{out[key]},{value}" if key in out else value
    if size > MAX_HEADERS_BYTES:
        raise MalformedRequest(f"headers of {size} bytes, more than {MAX_HEADERS_BYTES}")
    return out


def _http_attributes(http_pb: Any, method: str) -> HttpAttributes:
    path = http_pb.path
    if len(path) > MAX_PATH_BYTES:
        raise MalformedRequest(f":path of {len(path)} bytes, more than {MAX_PATH_BYTES}")
    body = http_pb.body
    raw_body = http_pb.raw_body
    headers = _headers(http_pb, path, body, raw_body)
    if not method:
        method = headers.get(":method", "")
        if not method:
            raise MalformedRequest("HTTP request without a method")
    return _build_http(
        method=method,
        host=http_pb.host or headers.get(":authority", ""),
        path=path or headers.get(":path", ""),
        scheme=http_pb.scheme,
        protocol=http_pb.protocol,
        headers=headers,
        id=http_pb.id,
        body=raw_body or body.encode("utf-8", "surrogateescape"),
    )


def request_from_check(check: external_auth_pb2.CheckRequest) -> Request:
    """Translate an ext_authz CheckRequest into a :class:`Request`. Raises :class:`MalformedRequest`."""
    attrs = check.attributes
    request_pb = attrs.request
    http_pb = request_pb.http  # reading an absent submessage yields its defaults and sets nothing
    method = http_pb.method
    # Envoy's HTTP filter always sends the method, so presence is asked only when there is none: an
    # empty-but-present ``http`` is an HTTP check (malformed), an absent one a TCP check.
    http = _http_attributes(http_pb, method) if method or request_pb.HasField("http") else None
    metadata: Mapping[str, Any] = EMPTY_MAP
    if attrs.HasField("metadata_context"):
        filter_metadata = attrs.metadata_context.filter_metadata
        if filter_metadata:
            metadata = {k: json_format.MessageToDict(v) for k, v in filter_metadata.items()}
    return _build_request(
        source=_peer(attrs.source),
        destination=_peer(attrs.destination),
        http=http,
        sni=attrs.tls_session.sni,  # "" when absent
        context_extensions=_context_extensions(attrs.context_extensions),
        metadata=metadata,
    )


def denied_body(decision: Decision) -> str:
    """The small JSON body of a deny: reason code, matched policy/rule id, decision id, message."""
    return json.dumps(
        {
            "decision": "deny",
            "status": decision.status,
            "reason": decision.reason,
            "policy": decision.policy_id,
            "decision_id": decision.decision_id,
            "message": decision.message,
        },
        separators=(",", ":"),
    )


def _hvo(key: str, value: str, action: int) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=action)


def _identity_metadata(decision: Decision, *, with_decision_id: bool = True) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    if with_decision_id:
        md.update({"decision_id": decision.decision_id})
    md.update(
        {
            "reason": decision.reason,
            "principal": decision.principal,
            "request_principal": decision.request_principal,
            "policy": decision.policy_id,
        }
    )
    if decision.claims:
        md.get_or_create_struct("claims").update(
            {k: v for k, v in decision.claims.items() if isinstance(v, str | int | float | bool | list)}
        )
    if decision.shadow is not None:
        md.update(
            {
                "shadow_engine_result": "allowed" if decision.shadow.allowed else "denied",
                "shadow_effective_policy_id": decision.shadow.policy_id,
            }
        )
    if decision.audit:
        md.update({"audit": True})
    return md


def _check_response(decision: Decision, *, with_decision_id: bool) -> external_auth_pb2.CheckResponse:
    """The CheckResponse of ``decision``; without the decision id it is the cacheable part of the reply
    (:func:`response_bytes` appends the id, and the deny's id header and body, as wire-format tails)."""
    resp = external_auth_pb2.CheckResponse()
    if decision.allowed:
        resp.status.code = _GRPC_OK
        ok = resp.ok_response
        ops = decision.headers
        for k, v in ops.set:
            ok.headers.append(_hvo(k, v, _SET))
        for k, v in ops.append:
            ok.headers.append(_hvo(k, v, _APPEND))
        if ops.remove:
            ok.headers_to_remove.extend(ops.remove)
        for k, v in ops.response:
            ok.response_headers_to_add.append(_hvo(k, v, _SET))
    else:
        resp.status.CopyFrom(status_pb2.Status(code=_grpc_code(decision.status), message=decision.reason))
        denied = resp.denied_response
        denied.status.code = decision.status  # type.v3.StatusCode numbers are HTTP codes
        denied.headers.append(_hvo("content-type", "application/json", _SET))
        if with_decision_id:
            denied.headers.append(_hvo(_H_DECISION_ID, decision.decision_id, _SET))
            if decision.www_authenticate:
                denied.headers.append(_hvo("www-authenticate", decision.www_authenticate, _SET))
            denied.body = denied_body(decision)
    resp.dynamic_metadata.CopyFrom(_identity_metadata(decision, with_decision_id=with_decision_id))
    return resp


def response_from_decision(decision: Decision) -> external_auth_pb2.CheckResponse:
    """Translate a :class:`Decision` into a CheckResponse (OkHttpResponse or DeniedHttpResponse)."""
    return _check_response(decision, with_decision_id=True)


# -- The same reply as wire bytes, built mostly once ----------------------------------------------------
#
# Protobuf wire format merges on concatenation: a later occurrence of an embedded message field is merged
# into the earlier one, repeated fields (and map entries) are appended, a later scalar replaces an earlier
# one (protobuf encoding guide, "Last One Wins"; language guide, "Merging"). So a reply is the cached
# encoding of everything the decision id does not shape, followed by a small hand-encoded tail carrying
# the id: for an allow ``dynamic_metadata { fields { key: "decision_id" value { string_value: ID } } }``;
# for a deny also ``denied_response { headers [x-authz-decision-id: ID, www-authenticate], body }`` (the
# content-type header, first in the list, is in the cached part; the body names the id, so it is whole
# in the tail).

_H_DECISION_ID = "x-authz-decision-id"
# Cached reply prefixes, by the decision fields that shape them. Dropped whole when full.
MAX_CACHED_RESPONSES = 1024
_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    """Base-128 varint of a non-negative length (protobuf encoding guide, "Base 128 Varints")."""
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:  # bounded: a length below 2**64 takes at most 10 bytes
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, varint length, payload."""
    return tag + _varint(len(payload)) + payload


# Tags (field number << 3 | wire type 2): CheckResponse.denied_response = 2, dynamic_metadata = 4;
# Struct.fields = 1 (map entry: key = 1, value = 2); Value.string_value = 3; DeniedHttpResponse.headers
# = 2, body = 3; HeaderValueOption.header = 1 (append_action = 3, varint); HeaderValue.key = 1, value = 2.
_T1, _T2, _T3, _T4 = b"\x0a", b"\x12", b"\x1a", b"\x22"
_ID_ENTRY_KEY = _field(_T1, b"decision_id")
_ID_HEADER_KEY = _field(_T1, _H_DECISION_ID.encode())
_SET_ACTION = b"\x18" + _varint(_SET)  # append_action = OVERWRITE_IF_EXISTS_OR_ADD (non-default: encoded)


def _decision_id_tail(decision_id: bytes) -> bytes:
    """``dynamic_metadata { fields { key: "decision_id" value { string_value: ID } } }``."""
    n = len(decision_id)
    if n <= 100:  # every length below fits one varint byte: the common case, in one formatting step
        return b"\x22%c\x0a%c\x0a\x0bdecision_id\x12%c\x1a%c%s" % (n + 19, n + 17, n + 2, n, decision_id)
    entry = _ID_ENTRY_KEY + _field(_T2, _field(_T3, decision_id))
    return _field(_T4, _field(_T1, entry))


@dataclass(frozen=True, slots=True)
class _CachedReply:
    claims: Mapping[str, Any]  # held so its id() in the key cannot be reused while cached
    prefix: bytes
    www_authenticate: bytes  # the deny's encoded www-authenticate header entry, or b""
    body_head: str  # the deny's JSON body up to the decision id, and after it
    body_tail: str


_replies: dict[tuple[Any, ...], _CachedReply] = {}


def _cached_reply(decision: Decision) -> _CachedReply:
    prefix = _check_response(decision, with_decision_id=False).SerializeToString()
    if decision.allowed:
        return _CachedReply(decision.claims, prefix, b"", "", "")
    www = b""
    if decision.www_authenticate:
        header = _field(
            _T1, _field(_T1, b"www-authenticate") + _field(_T2, decision.www_authenticate.encode())
        )
        www = _field(_T2, header + _SET_ACTION)
    # denied_body's JSON around the id: the same encoder json.dumps uses for a str (ensure_ascii).
    body = denied_body(replace(decision, decision_id=""))
    marker = '"decision_id":""'
    at = body.index(marker) + len(marker) - 2
    return _CachedReply(decision.claims, prefix, www, body[:at], body[at + 2 :])


def response_bytes(decision: Decision) -> bytes:
    """The serialized CheckResponse of ``decision``: parses equal to :func:`response_from_decision`.

    The part that does not depend on the decision id is encoded once per distinct shape (status, header
    operations, identity metadata, deny body around the id) and cached; the id goes in an appended tail.
    """
    claims = decision.claims
    # Every Decision field the reply reads except decision_id. Claims by identity: the engine shares one
    # read-only mapping per identity, and the entry holds it, so a live id is never another mapping's.
    key = (
        decision.allowed,
        decision.status,
        decision.reason,
        decision.message,
        decision.policy_id,
        decision.headers,
        decision.www_authenticate,
        decision.principal,
        decision.request_principal,
        id(claims),
        decision.audit,
        decision.shadow,
    )
    try:
        cached = _replies.get(key)
    except TypeError:  # an unhashable value where the Decision's types say hashable: encode it uncached
        uncached: bytes = _check_response(decision, with_decision_id=True).SerializeToString()
        return uncached
    if cached is None or cached.claims is not claims:
        cached = _cached_reply(decision)
        if len(_replies) >= MAX_CACHED_RESPONSES:
            _replies.clear()
        _replies[key] = cached
    decision_id = decision.decision_id.encode()
    if decision.allowed:
        return cached.prefix + _decision_id_tail(decision_id)
    id_header = _field(_T1, _ID_HEADER_KEY + _field(_T2, decision_id)) + _SET_ACTION
    body = cached.body_head + encode_basestring_ascii(decision.decision_id) + cached.body_tail
    denied = _field(_T2, id_header) + cached.www_authenticate + _field(_T3, body.encode())
    return cached.prefix + _field(_T2, denied) + _decision_id_tail(decision_id)


def _grpc_code(status: int) -> int:
    if status == 401:
        return _GRPC_UNAUTHENTICATED
    if status == 400:
        return _GRPC_INVALID_ARGUMENT
    return _GRPC_PERMISSION_DENIED


def internal_error_decision(message: str) -> Decision:
    return Decision(allowed=False, status=403, reason=Reason.INTERNAL_ERROR, message=message)


# Built at import: the reply of last resort cannot itself fail.
_INTERNAL_ERROR_REPLY: bytes = response_from_decision(
    internal_error_decision("internal error")
).SerializeToString()
CHECK_SERVICE = "envoy.service.auth.v3.Authorization"


class AuthorizationServicer:
    """``Authorization/Check`` on grpc.aio, answering with the CheckResponse already serialized
    (:func:`add_to_server` registers it so the bytes go out as they are). Every path returns a
    CheckResponse; nothing escapes."""

    def __init__(
        self,
        check: Checker,
        *,
        malformed: Callable[[MalformedRequest], Decision],
        check_now: Callable[[Request], Decision | None] | None = None,
    ) -> None:
        self._check = check
        self._malformed = malformed
        # Decides without waiting, or None when it would have to (Engine.check_now); then ``check`` does.
        self._check_now = check_now

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any] | None
    ) -> bytes:
        try:
            try:
                req = request_from_check(request)
            except MalformedRequest as exc:
                return response_bytes(self._malformed(exc))
            decision = self._check_now(req) if self._check_now is not None else None
            if decision is None:
                decision = await self._check(req)
            return response_bytes(decision)
        except Exception:  # fail closed: an internal error is a deny, never a gRPC error or an allow
            log.exception("internal error in gRPC Check")
            INTERNAL_ERRORS.labels(front="grpc").inc()
            return _INTERNAL_ERROR_REPLY


def add_to_server(server: grpc.aio.Server, servicer: AuthorizationServicer) -> None:
    """Register ``servicer`` for ``envoy.service.auth.v3.Authorization/Check``: requests are parsed into
    CheckRequests, the handler's bytes are sent as they are (no response serializer)."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,  # grpc sends bytes from a handler unchanged when there is none
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(CHECK_SERVICE, handlers),))
    # As the generated add_AuthorizationServicer_to_server does: the registered-method fast path.
    server.add_registered_method_handlers(CHECK_SERVICE, handlers)

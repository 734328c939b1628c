"""gRPC ``envoy.service.auth.v3.Authorization/Check`` front (messages from ``xds-protos``, upb-backed).

Only translation lives here: :func:`request_from_check` turns a CheckRequest into the one internal
:class:`~authz.request.Request`; :func:`response_from_decision` turns a :class:`~authz.decision.Decision`
into a CheckResponse. Both are pure; the servicer glues them to ``grpc.aio`` and never lets an exception
escape to gRPC (an internal error becomes a deny, fail closed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from authz.decision import Decision, Reason
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


def _peer(pb: Any) -> Peer:
    sa = pb.address.socket_address
    cert = pb.certificate
    return Peer(
        address=sa.address,
        port=sa.port_value,
        principal=pb.principal,
        # Envoy URL-encodes the PEM of include_peer_certificate (%0A, %20, %2B, ...).
        certificate=unquote(cert) if cert else "",
    )


def _headers(http: Any) -> Mapping[str, str]:
    """Lower-case header map; duplicates joined with ``,`` (Envoy already does so in ``headers``)."""
    if http.headers:
        headers: Mapping[str, str] = http.headers
        if len(headers) > MAX_HEADER_COUNT:
            raise MalformedRequest(f"{len(headers)} headers, more than {MAX_HEADER_COUNT}")
        # The encoded size (computed in C) bounds the text: cheaper than summing every key and value.
        size = http.ByteSize() - len(http.body) - len(http.raw_body) - len(http.path)
        if size > MAX_HEADERS_BYTES + 4 * len(headers):  # + map-entry framing, a few bytes per header
            raise MalformedRequest(f"headers of about {size} bytes, more than {MAX_HEADERS_BYTES}")
        return dict(headers)
    entries = http.header_map.headers
    if not entries:
        return EMPTY_MAP
    if len(entries) > MAX_HEADER_COUNT:
        raise MalformedRequest(f"{len(entries)} headers, more than {MAX_HEADER_COUNT}")
    out: dict[str, str] = {}
    size = 0
    for e in entries:
        # encode_raw_headers: values arrive as bytes in raw_value; they must be valid UTF-8 text for us.
        if e.raw_value:
            try:
                value = e.raw_value.decode("utf-8")
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


def request_from_check(check: external_auth_pb2.CheckRequest) -> Request:
    """Translate an ext_authz CheckRequest into a :class:`Request`. Raises :class:`MalformedRequest`."""
    attrs = check.attributes
    http_pb = attrs.request.http if attrs.request.HasField("http") else None
    http: HttpAttributes | None = None
    if http_pb is not None:
        path = http_pb.path
        if len(path) > MAX_PATH_BYTES:
            raise MalformedRequest(f":path of {len(path)} bytes, more than {MAX_PATH_BYTES}")
        headers = _headers(http_pb)
        method = http_pb.method or headers.get(":method", "")
        if not method:
            raise MalformedRequest("HTTP request without a method")
        http = HttpAttributes(
            method=method,
            host=http_pb.host or headers.get(":authority", ""),
            path=path or headers.get(":path", ""),
            scheme=http_pb.scheme,
            protocol=http_pb.protocol,
            headers=headers,
            id=http_pb.id,
            body=http_pb.raw_body or http_pb.body.encode("utf-8", "surrogateescape"),
        )
    metadata: Mapping[str, Any] = EMPTY_MAP
    if attrs.HasField("metadata_context") and attrs.metadata_context.filter_metadata:
        metadata = {
            k: json_format.MessageToDict(v) for k, v in attrs.metadata_context.filter_metadata.items()
        }
    return Request(
        source=_peer(attrs.source),
        destination=_peer(attrs.destination),
        http=http,
        sni=attrs.tls_session.sni if attrs.HasField("tls_session") else "",
        context_extensions=dict(attrs.context_extensions) if attrs.context_extensions else EMPTY_MAP,
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


def _identity_metadata(decision: Decision) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.update(
        {
            "decision_id": decision.decision_id,
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


def response_from_decision(decision: Decision) -> external_auth_pb2.CheckResponse:
    """Translate a :class:`Decision` into a CheckResponse (OkHttpResponse or DeniedHttpResponse)."""
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
        resp.dynamic_metadata.CopyFrom(_identity_metadata(decision))
        return resp
    resp.status.CopyFrom(status_pb2.Status(code=_grpc_code(decision.status), message=decision.reason))
    denied = resp.denied_response
    denied.status.code = decision.status  # type.v3.StatusCode numbers are HTTP codes
    denied.headers.append(_hvo("content-type", "application/json", _SET))
    denied.headers.append(_hvo("x-authz-decision-id", decision.decision_id, _SET))
    if decision.www_authenticate:
        denied.headers.append(_hvo("www-authenticate", decision.www_authenticate, _SET))
    denied.body = denied_body(decision)
    resp.dynamic_metadata.CopyFrom(_identity_metadata(decision))
    return resp


def _grpc_code(status: int) -> int:
    if status == 401:
        return _GRPC_UNAUTHENTICATED
    if status == 400:
        return _GRPC_INVALID_ARGUMENT
    return _GRPC_PERMISSION_DENIED


def internal_error_decision(message: str) -> Decision:
    return Decision(allowed=False, status=403, reason=Reason.INTERNAL_ERROR, message=message)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``Authorization/Check`` on grpc.aio. Every path returns a CheckResponse; nothing escapes."""

    def __init__(self, check: Checker, *, malformed: Callable[[MalformedRequest], Decision]) -> None:
        self._check = check
        self._malformed = malformed

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        try:
            try:
                req = request_from_check(request)
            except MalformedRequest as exc:
                return response_from_decision(self._malformed(exc))
            decision = await self._check(req)
            return response_from_decision(decision)
        except Exception:  # fail closed: an internal error is a deny, never a gRPC error or an allow
            log.exception("internal error in gRPC Check")
            INTERNAL_ERRORS.labels(front="grpc").inc()
            return response_from_decision(internal_error_decision("internal error"))


def add_to_server(server: grpc.aio.Server, servicer: AuthorizationServicer) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)

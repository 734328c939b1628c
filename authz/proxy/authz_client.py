"""Authorization of inbound requests: the :class:`Authorizer` protocol, the in-process call, a remote gRPC
ext_authz client implementing the same protocol, and how a :class:`Decision` changes the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from authz.decision import Decision, HeaderOps, Reason, value_builder
from authz.errors import DependencyError
from authz.proxy.http1 import valid_header_name, valid_header_value
from authz.proxy.message import ProxyResponse, local_response
from authz.request import EMPTY_MAP, HttpAttributes, Peer, Request, Workload

__all__ = [
    "AllowAll",
    "Authorizer",
    "GrpcAuthorizer",
    "apply_allow",
    "build_request",
    "deny_response",
    "error_decision",
]


@runtime_checkable
class Authorizer(Protocol):
    """What the proxy calls for every inbound request (``authz.engine`` implements it in process).

    An in-process authorizer may also offer ``check_now(request, workload) -> Decision | None``: the
    decision when it needs no I/O (a token verified before), else None; the proxy then awaits ``check``
    (``authz.runtime.AuthzRuntime`` has it; a remote authorizer does not)."""

    async def check(self, request: Request, workload: Workload) -> Decision: ...


class AllowAll:
    """Authorizer for ``mode: none``: allows everything (mTLS still authenticates the peer)."""

    async def check(self, request: Request, workload: Workload) -> Decision:
        return Decision(allowed=True, status=200, reason=Reason.ALLOWED_NO_POLICY)


def joined_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names, duplicate values joined with ``,`` (RFC 9110 §5.3)."""
    out = dict(headers)  # no repeated name (the usual request): one C-level pass
    if len(out) == len(headers):
        return out
    out = {}
    for k, v in headers:
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


# Built on every inbound check: keyword constructors that skip the frozen dataclass __setattr__ detour.
_build_request = value_builder(Request)
_build_http = value_builder(HttpAttributes)


def build_request(
    *,
    method: str,
    authority: str,
    target: str,
    headers: list[tuple[str, str]],
    scheme: str,
    protocol: str,
    source: Peer,
    destination: Peer,
    request_id: str,
) -> Request:
    """The :class:`authz.request.Request` for an inbound HTTP request (path as the listener normalized it,
    query kept; headers joined)."""
    return _build_request(
        source=source,
        destination=destination,
        http=_build_http(
            method=method,
            host=authority,
            path=target,
            scheme=scheme,
            protocol=protocol,
            headers=joined_headers(headers),
            id=request_id,
            validated=True,  # authz.proxy.http1 (llhttp + our checks) already refused malformed requests
        ),
        context_extensions=EMPTY_MAP,
        metadata=EMPTY_MAP,
        remote_ip=source.address,
    )


def error_decision(message: str, status: int) -> Decision:
    """Fail closed: the authorizer could not answer (Envoy ``failure_mode_allow: false``,
    ``status_on_error``)."""
    return Decision(allowed=False, status=status, reason=Reason.DEPENDENCY_UNAVAILABLE, message=message)


def deny_response(decision: Decision) -> ProxyResponse:
    """A deny as the client sees it: its status, a JSON body, ``WWW-Authenticate`` and the decision id."""
    body = json.dumps(
        {"reason": decision.reason, "message": decision.message, "decision_id": decision.decision_id}
    )
    headers: list[tuple[str, str]] = []
    if decision.www_authenticate and valid_header_value(decision.www_authenticate):
        headers.append(("www-authenticate", decision.www_authenticate))
    if decision.decision_id and valid_header_value(decision.decision_id):
        headers.append(("x-authz-decision-id", decision.decision_id))
    status = decision.status if 400 <= decision.status <= 599 else 403
    return local_response(status, body, headers, content_type="application/json")


def _safe(pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in pairs if valid_header_name(k.lower()) and valid_header_value(v)]


_CompiledOps = tuple[frozenset[str], tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]
_compiled_ops: dict[HeaderOps, _CompiledOps] = {}
_MAX_COMPILED_OPS = 1024
"""Distinct header changes kept compiled; an engine returns a handful (one per policy outcome)."""


def _compile_ops(ops: HeaderOps) -> _CompiledOps:
    """(names to drop, headers to add upstream, response headers), validated, once per distinct ops."""
    compiled = _compiled_ops.get(ops)
    if compiled is None:
        sets = _safe(ops.set)
        drop = frozenset({"host", *(k.lower() for k in ops.remove), *(k for k, _ in sets)})
        compiled = (drop, (*sets, *_safe(ops.append)), tuple(_safe(ops.response)))
        if len(_compiled_ops) >= _MAX_COMPILED_OPS:
            _compiled_ops.clear()
        _compiled_ops[ops] = compiled
    return compiled


def apply_allow(
    ops: HeaderOps, headers: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Apply an allow's header changes: returns (upstream request headers, headers to add to the response).

    Invalid names/values from a decision are dropped, never written (response splitting).
    """
    if not (ops.set or ops.append or ops.remove or ops.response):
        return headers, []
    drop, added, response = _compile_ops(ops)
    out = [(k, v) for k, v in headers if k not in drop]
    out += added
    return out, list(response)


class GrpcAuthorizer:
    """Remote mode: the same protocol over Envoy's gRPC ``envoy.service.auth.v3.Authorization/Check``.

    The workload travels in ``context_extensions`` (``namespace`` and ``labels`` as ``k=v,k2=v2``, the format
    :func:`authz.workload.parse_labels` reads). Transport errors raise :class:`DependencyError`; the listener
    turns that into ``status_on_error`` (fail closed) unless configured to fail open.
    """

    def __init__(self, target: str, *, timeout: float = 0.2) -> None:
        import grpc.aio
        from envoy.service.auth.v3 import external_auth_pb2_grpc

        # Reconnect fast after the authorizer restarts: gRPC's default backoff (1 s growing to 120 s) kept
        # denying for seconds after it was back (tests/reliability/test_restart.py).
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500),
            ],
        )
        self._stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def check(self, request: Request, workload: Workload) -> Decision:
        import grpc

        message = to_check_request(request, workload)
        try:
            response = await self._stub.Check(message, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise DependencyError(f"ext_authz call failed: {exc.code()}") from exc
        return from_check_response(response)


def to_check_request(request: Request, workload: Workload) -> Any:
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

    msg = external_auth_pb2.CheckRequest()
    attrs = msg.attributes
    for peer, pb in ((request.source, attrs.source), (request.destination, attrs.destination)):
        pb.address.socket_address.address = peer.address
        pb.address.socket_address.port_value = peer.port
        pb.principal = peer.principal
        if peer.certificate:
            pb.certificate = quote(peer.certificate, safe="")  # Envoy sends it URL-encoded
    http = request.http
    if http is not None:
        h: attribute_context_pb2.AttributeContext.HttpRequest = attrs.request.http
        h.id = http.id
        h.method = http.method
        h.path = http.path
        h.host = http.host
        h.scheme = http.scheme
        h.protocol = http.protocol
        for k, v in http.headers.items():
            h.headers[k] = v
        h.headers[":authority"] = http.host
        h.headers[":method"] = http.method
        h.headers[":path"] = http.path
        h.headers[":scheme"] = http.scheme
    attrs.context_extensions["namespace"] = workload.namespace
    attrs.context_extensions["labels"] = ",".join(f"{k}={v}" for k, v in sorted(workload.labels.items()))
    return msg


def _pairs(options: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    sets: list[tuple[str, str]] = []
    appends: list[tuple[str, str]] = []
    for opt in options:
        pair = (opt.header.key.lower(), opt.header.value)
        append = opt.append.value if opt.HasField("append") else opt.append_action == 0
        (appends if append else sets).append(pair)
    return sets, appends


def from_check_response(response: Any) -> Decision:
    """CheckResponse -> Decision: status.code 0 is allow (with header changes), anything else a deny."""
    if response.status.code == 0:
        ok = response.ok_response
        sets, appends = _pairs(ok.headers)
        return Decision(
            allowed=True,
            status=200,
            reason=Reason.ALLOWED_BY_POLICY,
            headers=HeaderOps(
                set=tuple(sets),
                append=tuple(appends),
                remove=tuple(ok.headers_to_remove),
                response=tuple((o.header.key.lower(), o.header.value) for o in ok.response_headers_to_add),
            ),
        )
    denied = response.denied_response
    hdrs: Mapping[str, str] = {o.header.key.lower(): o.header.value for o in denied.headers}
    status = denied.status.code or 403
    body = _deny_body(denied.body)
    reason = body.get("reason") or response.status.message
    return Decision(
        allowed=False,
        status=int(status),
        reason=str(reason)
        if reason
        else (Reason.DENIED_BY_POLICY if status == 403 else Reason.INVALID_TOKEN),
        message=str(body.get("message") or denied.body),
        policy_id=str(body.get("policy") or ""),
        www_authenticate=hdrs.get("www-authenticate", ""),
        decision_id=hdrs.get("x-authz-decision-id", ""),
    )


def _deny_body(body: str) -> Mapping[str, Any]:
    """meshauthz's JSON deny body (reason, policy, message); another authorizer's body is just text."""
    if not body.startswith("{"):
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}

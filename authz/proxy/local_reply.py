"""Rules answered by the proxy itself: VirtualService ``redirect`` and ``directResponse`` (pure, no I/O).

istiod turns ``redirect`` into Envoy's ``RedirectAction`` (IST ``pilot/pkg/networking/core/route/route.go``
``ApplyRedirect``) and ``directResponse`` into ``DirectResponseAction`` (``ApplyDirectResponse``); Envoy's
router answers both without choosing a cluster, so the access log has no upstream host or cluster and no
response flag, and the route's response header operations still apply (``finalizeResponseHeaders``).
The Location is built as Envoy's ``Http::Utility::newUri`` builds it (``source/common/http/utility.cc``),
checked against Envoy 1.40 in ``tests/integration/test_proxy_redirect_oracle.py``.
"""

from __future__ import annotations

from authz.proxy.message import ProxyResponse, local_response
from authz.proxy.model import DirectResponse, HTTPRedirect

__all__ = ["direct_reply", "redirect_location", "redirect_port", "redirect_reply"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def redirect_port(redirect: HTTPRedirect, *, scheme: str, authority: str) -> int:
    """The port Envoy's ``port_redirect`` gets (0 = none), as istiod's ``ApplyRedirect`` computes it.

    ``port`` is taken as written; ``derivePort: FROM_REQUEST_PORT`` is the port the request came to: istiod
    writes the listener's port, which for a sidecar is the service port the client addressed, i.e. the port
    of its Host (the scheme's default when the Host names none). ``FROM_PROTOCOL_DEFAULT`` sets no port
    ("Envoy's default behavior"). With a port set, an explicit :80 for http or :443 for https is dropped,
    the scheme being the redirect's or, when unset, the listener's (``http`` for a sidecar's plain listener).
    """
    if redirect.port is not None:
        port = redirect.port
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        port = _authority_port(authority) or _DEFAULT_PORTS.get(scheme.lower(), 80)
    else:
        return 0
    final_scheme = (redirect.scheme or scheme).lower()
    if _DEFAULT_PORTS.get(final_scheme) == port:
        return 0
    return port


def _authority_port(authority: str) -> int | None:
    host_end = _port_separator(authority)
    if host_end < 0:
        return None
    digits = authority[host_end + 1 :]
    return int(digits) if digits.isdigit() and 0 < int(digits) < 65536 else None


def _port_separator(authority: str) -> int:
    """Index of the ``:`` before the port, -1 if none (IPv6 literals keep their brackets)."""
    if authority.startswith("["):
        at = authority.rfind("]:")
        return at + 1 if at >= 0 else -1
    return authority.rfind(":")


def _request_host(authority: str, new_scheme: str, new_port: str, forwarded_proto: str) -> str:
    """Envoy ``processRequestHost``: the request's Host, its port dropped when the redirect names a port, or
    when the scheme changes away from the request's protocol (``x-forwarded-proto``) whose default port the
    Host spelled out (``http://a:80`` -> ``https://a``)."""
    host_end = _port_separator(authority)
    if host_end < 0:
        return authority
    request_port = authority[host_end:]
    remove = bool(new_port)
    proto = forwarded_proto.lower()
    if new_scheme != forwarded_proto:
        remove |= proto == "https" and request_port == ":443"
        remove |= proto == "http" and request_port == ":80"
    return authority[:host_end] if remove else authority


def redirect_location(
    redirect: HTTPRedirect, *, scheme: str, authority: str, target: str, forwarded_proto: str
) -> str:
    """The ``location`` of a redirect answer (Envoy ``Http::Utility::newUri``).

    ``scheme`` is the request's ``:scheme``, ``authority`` its Host as received, ``target`` its (normalized)
    path with the query, ``forwarded_proto`` its ``x-forwarded-proto`` (the connection's scheme when the
    client sent none, as Envoy's connection manager sets it). ``uri`` replaces the path and keeps the
    request's query string unless ``uri`` has one of its own (``path_redirect_has_query``; istiod never sets
    ``strip_query``); ``authority`` replaces the Host as written.
    """
    final_scheme = redirect.scheme or scheme
    port = redirect_port(redirect, scheme=scheme, authority=authority)
    final_port = f":{port}" if port else ""
    final_host = redirect.authority or _request_host(authority, final_scheme, final_port, forwarded_proto)
    if redirect.uri:
        if "?" in redirect.uri:
            final_path = redirect.uri
        else:
            query_at = target.find("?")
            final_path = redirect.uri + (target[query_at:] if query_at >= 0 else "")
    else:
        final_path = target
    if not final_path.startswith("/"):
        final_path = "/" + final_path
    return f"{final_scheme}://{final_host}{final_port}{final_path}"


def redirect_reply(
    redirect: HTTPRedirect, *, scheme: str, authority: str, target: str, forwarded_proto: str
) -> ProxyResponse:
    """``redirectCode`` (301 by default) with the Location and an empty body (``content-length: 0``)."""
    location = redirect_location(
        redirect, scheme=scheme, authority=authority, target=target, forwarded_proto=forwarded_proto
    )
    return local_response(redirect.code, b"", [("location", location)])


def direct_reply(direct: DirectResponse) -> ProxyResponse:
    """``status`` with the fixed body; ``content-type: text/plain`` when there is a body, as Envoy's local
    reply sets it; the listener writes ``content-length`` (none for 204, no body for HEAD)."""
    return local_response(direct.status, direct.body)

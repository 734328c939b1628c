"""Claims: nested look-up, rendering into header values, and space-delimited splitting."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["MAX_HEADER_VALUE", "claim_strings", "header_value", "lookup_claim", "safe_header_value"]

MAX_HEADER_VALUE = 8 * 1024  # a claim copied into a header longer than this is dropped, not truncated


def lookup_claim(claims: Mapping[str, Any], name: str) -> Any:
    """The claim ``name``; ``a.b.c`` walks nested objects (Envoy ``claim_to_headers``, istio
    ``outputClaimToHeaders`` "nested.nested-2.key2"). A top-level key containing dots (a URL-named
    claim such as ``https://example.com/roles``) is found first, which Envoy cannot do."""
    if name in claims:
        return claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def safe_header_value(text: str) -> str | None:
    """``text`` if it can be a header value as is: no CR, LF, NUL or other control characters
    (RFC 9110 section 5.5), at most :data:`MAX_HEADER_VALUE` characters; else ``None``."""
    if len(text) > MAX_HEADER_VALUE:
        return None
    for ch in text:
        o = ord(ch)
        if (o < 0x20 and ch != "\t") or o == 0x7F:
            return None
    return text


def header_value(value: Any) -> str | None:
    """Render a claim for a header: strings as is, integers as digits (``X-Jwt-Iat: 1562182722``),
    booleans as ``true``/``false``; anything else (objects, lists, fractions) gives no header
    (istio RequestAuthentication ``outputClaimToHeaders``: "string, int, bool")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return str(int(value))
    if isinstance(value, str):
        return safe_header_value(value)
    return None


def claim_strings(claims: Mapping[str, Any], name: str, space_delimited: Collection[str]) -> tuple[str, ...]:
    """The string values of a claim for authorization matching (istio §2 ``request.auth.claims``):
    a string is one value, or split on whitespace when ``name`` is space-delimited (``scope``,
    ``permission``, ``spaceDelimitedClaims``); a list contributes its string items; others nothing."""
    value = lookup_claim(claims, name)
    if isinstance(value, str):
        return tuple(value.split()) if name in space_delimited else (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()

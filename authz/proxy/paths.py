"""Request-target normalization before routing, as Istio configures Envoy's HTTP connection manager.

istiod maps meshConfig ``pathNormalization.normalization`` to HCM ``normalize_path``, ``merge_slashes`` and
``path_with_escaped_slashes_action`` (istio ``pilot/pkg/networking/core/listener_builder.go``; table in
``spec/istio-authz.md`` §1.8.7). Envoy applies them before routing and forwards the normalized path upstream,
so routes, the authorizer and the application all see one path. The normalization itself is
:func:`authz.policy.normalize.normalize_path` (Envoy's ``PathUtil``/Chromium canonicalizer), shared with the
engine so that what the proxy forwards is exactly what the policy was matched against.

Rejected with 400, as Envoy rejects them (checked against Envoy 1.40 in ``test_proxy_oracle.py``): ``%00``
and, in every mode, a target carrying a fragment (``#``; Envoy ``http_reject_path_with_fragment``).
A ``%`` that does not start an escape but would form one with the characters decoded after it
(``/%%32%66`` -> ``%2f``) becomes ``%25``, as Chromium's ``CheckForNestedEscapes`` (in Envoy's
``source/common/chromium_url/url_canon_path.cc``) does, so ``/%%32%66`` is forwarded as ``/%252f``, as
Envoy forwards it (:func:`escape_nested_percents`).

Cost: a target made only of characters the canonicalizer copies as they are, without ``/.`` or ``//``,
is returned as it is after one regex match; the rest are cached per raw path (bounded, FIFO eviction).
"""

from __future__ import annotations

import re

from authz.config import PathNormalization
from authz.errors import MalformedRequest
from authz.policy.normalize import normalize_path

__all__ = ["DEFAULT_PATH_CACHE_SIZE", "PathNormalizer", "escape_nested_percents"]

DEFAULT_PATH_CACHE_SIZE = 4096
"""Distinct raw paths whose normalized form is kept. Paths that need work are rare (dot segments, escapes,
double slashes); 4096 short strings is well under a megabyte and covers a service's distinct odd paths."""

# RFC 3986 pchar without '%' (unreserved, sub-delims, ':' and '@') plus '/': the canonicalizer copies these.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# RFC 3986 section 2.3 unreserved characters: the escapes Chromium's canonicalizer decodes.
_UNRESERVED = frozenset("-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _is_escape(path: str, i: int) -> bool:
    return i + 2 < len(path) and path[i + 1] in _HEX_DIGITS and path[i + 2] in _HEX_DIGITS


def _decoded_hex_digit(path: str, i: int) -> bool:
    """``path[i:i+3]`` is an escape the canonicalizer decodes into a hex digit (``%41`` -> ``A``)."""
    return path[i] == "%" and _is_escape(path, i) and chr(int(path[i + 1 : i + 3], 16)) in _HEX_DIGITS


def escape_nested_percents(path: str) -> str:
    """Chromium ``CheckForNestedEscapes``, applied to the input: a ``%`` not followed by two hex digits
    is kept as ``%``, unless decoding what follows it would make it the start of an escape (``%%41b`` ->
    ``%Ab``); then it is written ``%25``, so the output cannot be decoded once more into something else.

    Chromium checks right after decoding a character within two output characters of such a ``%``: if the
    ``%`` and the decoded character are followed by one more *raw* input character, or by a second decoded
    character, and the three form an escape, the ``%`` becomes ``%25``.
    """
    if "%" not in path:
        return path
    out: list[str] = []
    last = 0
    n = len(path)
    for i, ch in enumerate(path):
        if ch != "%" or _is_escape(path, i):
            continue
        j = i + 1  # the first output character after the '%'
        if j < n and _decoded_hex_digit(path, j):
            k = j + 3
            nested = (k < n and path[k] in _HEX_DIGITS) or (k < n and _decoded_hex_digit(path, k))
        elif j < n and path[j] in _HEX_DIGITS:
            nested = j + 1 < n and _decoded_hex_digit(path, j + 1)
        else:
            nested = False
        if nested:
            out.append(path[last:i])
            out.append("%25")
            last = i + 1
    if not out:
        return path
    out.append(path[last:])
    return "".join(out)


class PathNormalizer:
    """``normalize(target)`` returns the request-target with its path normalized per ``mode`` and the query
    kept as it is; raises :class:`~authz.errors.MalformedRequest` (400) for what Envoy refuses."""

    def __init__(self, mode: PathNormalization, cache_size: int = DEFAULT_PATH_CACHE_SIZE) -> None:
        self.mode = mode
        self.cache_size = cache_size
        self._cache: dict[str, str] = {}

    def normalize(self, target: str) -> str:
        # Envoy >= 1.17.4 rejects a fragment in :path (RFC 3986 §3.5, RFC 9112 §3.2: not part of a
        # request-target; runtime guard envoy.reloadable_features.http_reject_path_with_fragment).
        if "#" in target:
            raise MalformedRequest("request-target contains a fragment", reason="malformed_path")
        if self.mode is PathNormalization.NONE or not target.startswith("/"):
            return target  # asterisk-form (OPTIONS *) is left alone; it matches no uri route
        path, sep, query = target.partition("?")
        if _PLAIN_PATH.fullmatch(path) and "/." not in path and "//" not in path:
            return target
        normalized = self._cache.get(path)
        if normalized is None:
            # raises MalformedRequest: %00, control characters
            normalized = normalize_path(escape_nested_percents(path), self.mode)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[path] = normalized
        return normalized + sep + query

"""Path normalization as Envoy's HTTP connection manager does it before authorization.

Istio maps meshConfig ``pathNormalization.normalization`` to HCM settings (istio
``pilot/pkg/networking/core/listener_builder.go``); Envoy applies them in
``ConnectionManagerUtility::maybeNormalizePath``: first ``%2F``/``%5C`` unescaping
(``UNESCAPE_AND_FORWARD``), then ``normalize_path`` (Chromium's URL path canonicalizer: RFC 3986
section 5.2.4 dot-segment removal, decoding only unreserved ``%XX``, ``\\`` -> ``/``), then
``merge_slashes``. The expected results are istio ``tests/integration/security/normalization_test.go``.

Deliberate, fail-closed divergences (each raises :class:`MalformedRequest`, a 400):
* ``%00``, raw NUL/CR/LF or other control characters are rejected in every mode (Envoy rejects ``%00``
  while normalizing and its codecs reject raw control characters);
* a path that would normalize differently a second time (e.g. ``%%32%66`` canonicalizes to ``%2f``,
  which a backend that decodes again would read as ``/``) is rejected as ambiguous, so what we
  authorize is what any later hop sees. This also makes :func:`normalize_path` idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from authz.config import PathNormalization
from authz.errors import MalformedRequest
from authz.request import HttpAttributes

__all__ = ["check_http_request", "normalize_path", "split_path"]

_HEX = frozenset("0123456789abcdefABCDEF")
# Chromium url_canon_path.cc kPathCharLookup: bytes that are decoded when percent-encoded (RFC 3986
# section 2.3 unreserved characters).
_UNESCAPE = frozenset([0x2D, 0x2E, 0x5F, 0x7E, *range(0x30, 0x3A), *range(0x41, 0x5B), *range(0x61, 0x7B)])
# Printable ASCII that Chromium escapes when it appears raw in a path.
_ESCAPE_RAW = frozenset(' "<>`')
MAX_PATH_LENGTH = 64 * 1024  # Envoy's default max_request_headers_kb is 60 KiB; longer is malformed


def split_path(raw: str) -> tuple[str, str]:
    """``(path, query)``: the path ends at the first ``?`` or ``#`` (the fragment is dropped, Envoy
    ``PathMatcher`` "The query and fragment string (if present) are removed")."""
    cut = len(raw)
    for sep in "?#":
        i = raw.find(sep)
        if 0 <= i < cut:
            cut = i
    query = ""
    if cut < len(raw) and raw[cut] == "?":
        query = raw[cut + 1 :].split("#", 1)[0]
    return raw[:cut], query


def _reject(message: str) -> MalformedRequest:
    return MalformedRequest(message, reason="malformed_path")


def _unescape_slashes(path: str) -> str:
    """Envoy ``PathUtil::unescapeSlashes``: ``%2F``/``%2f`` -> ``/`` and ``%5C``/``%5c`` -> ``\\``."""
    if "%" not in path:
        return path
    return path.replace("%2F", "/").replace("%2f", "/").replace("%5C", "\\").replace("%5c", "\\")


def _canonicalize(path: str) -> str:
    """Chromium ``CanonicalizePath`` as used by Envoy ``PathUtil::canonicalPath``."""
    segments: list[list[str]] = [[]]
    i, n = 0, len(path)
    while i < n:
        ch = path[i]
        if ch in "/\\":
            segments.append([])
            i += 1
            continue
        if ch == "%":
            if i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
                byte = int(path[i + 1 : i + 3], 16)
                if byte == 0:
                    raise _reject("path contains %00")
                if byte in _UNESCAPE:
                    segments[-1].append(chr(byte))
                else:
                    segments[-1].append(path[i : i + 3])  # keep as is, hex case untouched
                i += 3
                continue
            segments[-1].append("%")  # an invalid escape is passed through
            i += 1
            continue
        code = ord(ch)
        if code < 0x80 and ch not in _ESCAPE_RAW:
            segments[-1].append(ch)
        else:
            segments[-1].append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        i += 1
    # RFC 3986 section 5.2.4 remove_dot_segments, segment-wise (segments[0] is before the first '/').
    parts = ["".join(s) for s in segments[1:]]
    out: list[str] = []
    last = len(parts) - 1
    for idx, seg in enumerate(parts):
        if seg == ".":
            if idx == last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if idx == last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    """Envoy ``PathUtil::mergeSlashes``."""
    while "//" in path:
        path = path.replace("//", "/")
    return path


def _normalize_once(path: str, mode: PathNormalization) -> str:
    if mode is PathNormalization.NONE:
        return path
    if mode is PathNormalization.DECODE_AND_MERGE_SLASHES:
        path = _unescape_slashes(path)
    path = _canonicalize(path)
    if mode in (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES):
        path = _merge_slashes(path)
    return path


def normalize_path(raw: str, mode: PathNormalization) -> str:
    """The path a policy's ``paths`` are matched against: ``raw`` (a ``:path``) without query and
    fragment, normalized per ``mode`` (spec §1.8.7). Path parameters (``;a=b``) are left alone.

    Raises :class:`MalformedRequest` (reason ``malformed_path``, a 400) for an empty path, one not
    starting with ``/``, ``%00``, control characters, or an ambiguous (not idempotent) result.
    """
    if len(raw) > MAX_PATH_LENGTH:
        raise _reject("path is too long")
    path, _ = split_path(raw)
    if not path.startswith("/"):
        # Envoy's HCM only serves relative paths (absolute-form is rewritten by the codec).
        raise _reject("path must start with '/'")
    if _CONTROL_CHAR.search(path):
        raise _reject("path contains a control character")
    if "%00" in path:
        raise _reject("path contains %00")
    out = _normalize_once(path, mode)
    if mode is not PathNormalization.NONE and "%" in out and _normalize_once(out, mode) != out:
        raise _reject("path is ambiguous: it normalizes differently when decoded again")
    return out


# Regexes, not per-character Python loops: these run on every header of every request.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2 token
# Header names joined by " ", each a token optionally after the ":" of an HTTP/2 pseudo-header.
_NAME_LIST = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?: :?[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")


def _bad_field_value(value: str) -> bool:
    """CR, LF or NUL in a field value (RFC 9110 section 5.5); three C-level scans beat a regex class."""
    return "\n" in value or "\r" in value or "\x00" in value


_BAD_HOST_CHAR = re.compile(r"[\x00-\x20\x7f]")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def check_http_request(http: HttpAttributes) -> None:
    """Reject what Envoy's HTTP codecs would refuse before authorization ever runs: a method that
    is not an RFC 9110 token, header names that are not tokens, CR/LF/NUL in values, a Host with
    whitespace or control characters. Raises :class:`MalformedRequest` (400)."""
    if _BAD_HOST_CHAR.search(http.host):
        raise MalformedRequest("invalid host", reason="malformed_request")
    if http.validated:  # the front's parser enforced the rest (authz.request.HttpAttributes.validated)
        return
    if not _TOKEN.fullmatch(http.method):
        raise MalformedRequest("invalid method", reason="malformed_request")
    headers: Mapping[str, str] = http.headers
    # Two regex scans per request over the joined names and values; per-header work only to name the
    # culprit once something is wrong. A name containing the separator shows up as an extra space.
    names = " ".join(headers)
    names_ok = not headers or (names.count(" ") == len(headers) - 1 and _NAME_LIST.fullmatch(names))
    if not names_ok or _bad_field_value("".join(headers.values())):
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name[1:] if name.startswith(":") else name):
                raise MalformedRequest(f"invalid header name {name[:64]!r}", reason="malformed_header")
            if _bad_field_value(value):
                raise MalformedRequest(
                    f"header {name[:64]!r} contains CR, LF or NUL", reason="malformed_header"
                )

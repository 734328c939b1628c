"""Where tokens are: extraction exactly as Envoy's jwt_authn extractor does it.

Envoy ``source/extensions/filters/http/jwt_authn/extractor.cc``: header locations first (ordered by
name + prefix), then query parameters, then cookies, each location remembering which rules (issuers)
configured it. A header with a prefix is searched for the prefix **anywhere** in its value; if absent
the header is skipped (token absent); else the token is the next run of base64url/``.`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

from authz.authn.model import JwtRule
from authz.request import HttpAttributes

__all__ = [
    "ExtractedToken",
    "TokenExtractor",
    "TokenLocation",
    "is_cors_preflight",
    "parse_cookies",
    "parse_query",
]

# RFC 4648 section 5 alphabet plus "." (extractor.cc ConstantBase64UrlEncodingCharsPlusDot)
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


@dataclass(frozen=True, slots=True)
class TokenLocation:
    """``kind`` is ``header``, ``param`` or ``cookie``; ``name`` lower case for headers."""

    kind: str
    name: str
    prefix: str = ""

    def __str__(self) -> str:
        if self.kind == "header":
            return f"header {self.name}" + (f" (prefix {self.prefix!r})" if self.prefix else "")
        return f"{self.kind} {self.name}"


class ExtractedToken(NamedTuple):
    """A token found at ``location``; ``rules`` are the indexes of rules that configured it.
    (A named tuple: one is built per token per request, and a tuple is the cheapest value to build.)"""

    token: str
    location: TokenLocation
    rules: tuple[int, ...]


def is_cors_preflight(http: HttpAttributes) -> bool:
    """Envoy ``jwt_authn/filter.cc`` ``isCorsPreflightRequest`` (Istio sets ``bypass_cors_preflight``):
    ``OPTIONS`` with non-empty ``Origin`` and ``Access-Control-Request-Method``."""
    return (
        http.method == "OPTIONS"
        and bool(http.headers.get("origin"))
        and bool(http.headers.get("access-control-request-method"))
    )


def extract_after_prefix(value: str, start: int) -> str:
    """extractor.cc ``extractJWT``: skip to the first token character at or after ``start``, take the
    run of token characters. If there is none, the whole value is returned (Envoy's compatibility
    behaviour: it then fails verification as malformed)."""
    rest = value[start:]
    # Usually the whole rest is the token ("Bearer <jwt>"): deleting the token bytes leaves nothing. A
    # bytes translate checks that at a third of the cost of the regex scan.
    if rest and rest.isascii() and not rest.encode("ascii").translate(None, _TOKEN_BYTES):
        return rest
    m = _TOKEN_RUN.search(value, start)
    return value if m is None else m.group()


def parse_query(path: str) -> dict[str, str]:
    """Query parameters of ``:path``, percent-decoded; the first occurrence of a name wins
    (Envoy ``Http::Utility::parseAndDecodeQueryString``)."""
    query = path.partition("?")[2].partition("#")[0]
    out: dict[str, str] = {}
    if not query:
        return out
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        key = unquote(key)
        if key not in out:
            out[key] = unquote(value)
    return out


def parse_cookies(headers: Mapping[str, str]) -> dict[str, str]:
    """Cookies from the ``cookie`` header (RFC 6265 section 5.4); surrounding double quotes are removed
    as Envoy's ``parseCookieValue`` does. Duplicate headers were joined with ``,`` by the front, and a
    cookie-octet never contains ``,``, so both ``;`` and ``,`` separate pairs. First occurrence wins."""
    raw = headers.get("cookie", "")
    out: dict[str, str] = {}
    if not raw:
        return out
    for part in raw.replace(",", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out.setdefault(name, value)
    return out


class TokenExtractor:
    """Token locations of a set of rules, compiled once; :meth:`extract` is the per-request part."""

    def __init__(self, rules: Sequence[JwtRule]) -> None:
        self.rules = tuple(rules)
        headers: dict[tuple[str, str], list[int]] = {}
        params: dict[str, list[int]] = {}
        cookies: dict[str, list[int]] = {}
        sanitize: list[str] = []
        for i, rule in enumerate(rules):
            for h in rule.headers:
                headers.setdefault((h.name, h.prefix), []).append(i)
            for p in rule.params:
                params.setdefault(p, []).append(i)
            for c in rule.cookies:
                cookies.setdefault(c, []).append(i)
            # extractor.cc headers_to_sanitize_: client copies of output headers are always removed.
            if rule.output_payload_to_header:
                sanitize.append(rule.output_payload_to_header)
            sanitize.extend(c.header for c in rule.output_claim_to_headers)
        # std::map ordering of Envoy: header name + prefix, then param name, then cookie name.
        self.headers = tuple(
            (TokenLocation("header", name, prefix), tuple(idx))
            for (name, prefix), idx in sorted(headers.items(), key=lambda kv: kv[0][0] + kv[0][1])
        )
        self.params = tuple((TokenLocation("param", p), tuple(idx)) for p, idx in sorted(params.items()))
        self.cookies = tuple((TokenLocation("cookie", c), tuple(idx)) for c, idx in sorted(cookies.items()))
        self.sanitize = tuple(dict.fromkeys(sanitize))
        self._rules_by_indexes = {
            idx: tuple(self.rules[i] for i in idx) for _, idx in (*self.headers, *self.params, *self.cookies)
        }

    def rules_for(self, indexes: tuple[int, ...]) -> tuple[JwtRule, ...]:
        """The rules an :class:`ExtractedToken` of this extractor names by index."""
        rules = self._rules_by_indexes.get(indexes)
        if rules is None:
            rules = tuple(self.rules[i] for i in indexes)
        return rules

    def extract(self, http: HttpAttributes) -> list[ExtractedToken]:
        found: list[ExtractedToken] = []
        hdrs = http.headers
        for loc, idx in self.headers:
            value = hdrs.get(loc.name)
            if value is None:
                continue
            prefix = loc.prefix
            if prefix:
                pos = value.find(prefix)
                if pos < 0:
                    continue  # prefix not found anywhere: this header carries no token
                value = extract_after_prefix(value, pos + len(prefix))
            found.append(ExtractedToken(value, loc, idx))
        if self.params and "?" in http.path:
            query = parse_query(http.path)
            for loc, idx in self.params:
                if loc.name in query:
                    found.append(ExtractedToken(query[loc.name], loc, idx))
        if self.cookies and "cookie" in hdrs:
            jar = parse_cookies(hdrs)
            for loc, idx in self.cookies:
                if loc.name in jar:
                    found.append(ExtractedToken(jar[loc.name], loc, idx))
        return found

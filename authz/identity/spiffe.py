"""SPIFFE IDs: parsing, validation and the Istio reading of their path.

Implements the SPIFFE ID specification (``spiffe/spiffe`` ``standards/SPIFFE-ID.md``), with the same
strictness as the reference parser ``go-spiffe`` ``spiffeid/id.go`` (``FromString``):

* the scheme is exactly ``spiffe`` followed by ``://`` (SPIFFE-ID §2);
* the trust domain is non-empty, at most 255 bytes, of ``[a-z0-9._-]`` only: no upper case, no port, no
  userinfo (SPIFFE-ID §2.1);
* the path is empty or a sequence of ``/segment`` where each segment is non-empty, not ``.`` or ``..``,
  and made of ``[A-Za-z0-9._-]``; no trailing ``/`` (SPIFFE-ID §2.2);
* no query and no fragment (SPIFFE-ID §2.3);
* the whole URI is at most 2048 bytes (SPIFFE-ID §2.3 "Maximum SPIFFE ID Length").

Istio workload identities have the path ``/ns/<namespace>/sa/<service-account>``
(``istio/istio`` ``pkg/spiffe/spiffe.go`` ``URIPrefix``/``Identity``); :attr:`SpiffeId.namespace` and
:attr:`SpiffeId.service_account` read it, and are ``""`` for any other path.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz.errors import CredentialError

__all__ = [
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "SCHEME_PREFIX",
    "InvalidSpiffeId",
    "SpiffeId",
    "validate_path",
    "validate_trust_domain",
]

SCHEME_PREFIX = "spiffe://"
MAX_SPIFFE_ID_BYTES = 2048  # SPIFFE-ID §2.3: "URIs with lengths greater than 2048 bytes ... MUST NOT" be used
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID §2.1: the trust domain is at most 255 bytes (a DNS name's limit)

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TRUST_DOMAIN_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class InvalidSpiffeId(CredentialError):
    """A string is not a valid SPIFFE ID. ``reason`` names the rule it broke (``spiffe_id_*``).

    It is a :class:`CredentialError` because the strings we parse at run time come from peers
    (certificate URI SANs, Envoy's ``source.principal``, XFCC). Configuration loaders catch it and
    re-raise it as a ``ConfigError`` naming ``file:line:field``.
    """

    reason = "invalid_spiffe_id"


def _fail(reason: str, message: str, value: str) -> InvalidSpiffeId:
    shown = value if len(value) <= 80 else value[:77] + "..."
    return InvalidSpiffeId(f"{message}: {shown!r}", reason=reason)


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain name, else raise :class:`InvalidSpiffeId`.

    SPIFFE-ID §2.1: lower-case letters, digits, ``.``, ``-`` and ``_``; non-empty; at most 255 bytes.
    """
    if not trust_domain:
        raise _fail("spiffe_id_missing_trust_domain", "the trust domain is empty", trust_domain)
    if len(trust_domain.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise _fail(
            "spiffe_id_trust_domain_too_long",
            f"the trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes",
            trust_domain,
        )
    for ch in trust_domain:
        if ch in _TRUST_DOMAIN_CHARS:
            continue
        if ch == ":":
            raise _fail("spiffe_id_has_port", "a SPIFFE trust domain cannot carry a port", trust_domain)
        if ch == "@":
            raise _fail("spiffe_id_has_userinfo", "a SPIFFE trust domain cannot carry userinfo", trust_domain)
        raise _fail(
            "spiffe_id_bad_trust_domain_char",
            f"character {ch!r} is not allowed in a trust domain (only [a-z0-9._-])",
            trust_domain,
        )
    return trust_domain


def validate_path(path: str) -> str:
    """Return ``path`` if it is a valid SPIFFE ID path (``""`` or ``/seg/seg``), else raise.

    SPIFFE-ID §2.2: segments are non-empty, not ``.`` or ``..``, of ``[A-Za-z0-9._-]``, and the path
    does not end with ``/``.
    """
    if not path:
        return path
    if not path.startswith("/"):
        raise _fail("spiffe_id_bad_path", "a SPIFFE ID path must start with '/'", path)
    if path.endswith("/"):
        raise _fail("spiffe_id_trailing_slash", "a SPIFFE ID path cannot end with '/'", path)
    for segment in path[1:].split("/"):
        if not segment:
            raise _fail("spiffe_id_empty_segment", "a SPIFFE ID path cannot have an empty segment", path)
        if segment in (".", ".."):
            raise _fail("spiffe_id_dot_segment", "a SPIFFE ID path cannot have '.' or '..' segments", path)
        for ch in segment:
            if ch in _PATH_CHARS:
                continue
            if ch in "?#":
                raise _fail(
                    "spiffe_id_has_query_or_fragment", "a SPIFFE ID cannot have a query or fragment", path
                )
            raise _fail(
                "spiffe_id_bad_path_char",
                f"character {ch!r} is not allowed in a SPIFFE ID path (only [A-Za-z0-9._-])",
                path,
            )
    return path


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID: ``spiffe://<trust_domain><path>``. Build it with :meth:`parse` or :meth:`of`."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_path(self.path)
        if len(str(self).encode()) > MAX_SPIFFE_ID_BYTES:
            raise _fail(
                "spiffe_id_too_long", f"a SPIFFE ID is at most {MAX_SPIFFE_ID_BYTES} bytes", str(self)
            )

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://td/path``; raise :class:`InvalidSpiffeId` naming the broken rule."""
        if not isinstance(text, str):
            raise InvalidSpiffeId("a SPIFFE ID must be a string", reason="spiffe_id_not_a_string")
        if not text:
            raise _fail("spiffe_id_empty", "the SPIFFE ID is empty", text)
        # SPIFFE-ID §2.3 length limit, checked first so no work is spent on oversized input.
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise _fail("spiffe_id_too_long", f"a SPIFFE ID is at most {MAX_SPIFFE_ID_BYTES} bytes", text)
        if not text.startswith(SCHEME_PREFIX):
            # SPIFFE-ID §2: the scheme is "spiffe"; go-spiffe accepts only the lower-case spelling.
            raise _fail("spiffe_id_wrong_scheme", "a SPIFFE ID must start with 'spiffe://'", text)
        rest = text[len(SCHEME_PREFIX) :]
        if "?" in rest or "#" in rest:
            raise _fail(
                "spiffe_id_has_query_or_fragment", "a SPIFFE ID cannot have a query or fragment", text
            )
        slash = rest.find("/")
        trust_domain, path = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
        return cls(trust_domain, path)

    @classmethod
    def of(cls, trust_domain: str, *segments: str) -> SpiffeId:
        """``SpiffeId.of("td", "ns", "foo", "sa", "bar")`` is ``spiffe://td/ns/foo/sa/bar``."""
        return cls(trust_domain, "".join("/" + s for s in segments))

    @classmethod
    def for_service_account(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The Istio identity ``spiffe://<td>/ns/<ns>/sa/<sa>`` (istio ``pkg/spiffe`` ``Identity``)."""
        return cls.of(trust_domain, "ns", namespace, "sa", service_account)

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def uri(self) -> str:
        """The full URI, ``spiffe://td/path`` (what Envoy puts in ``source.principal``)."""
        return str(self)

    @property
    def principal(self) -> str:
        """Istio's ``source.principal`` form: the URI without ``spiffe://`` (``td/ns/foo/sa/bar``)."""
        return f"{self.trust_domain}{self.path}"

    @property
    def trust_domain_id(self) -> SpiffeId:
        """The trust domain's own ID, ``spiffe://td`` (X.509-SVID §3: the URI SAN of a signing CA)."""
        return SpiffeId(self.trust_domain)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def namespace(self) -> str:
        """``<ns>`` of an Istio identity ``/ns/<ns>/sa/<sa>``, else ``""``."""
        seg = self.segments
        return seg[1] if _is_istio_path(seg) else ""

    @property
    def service_account(self) -> str:
        """``<sa>`` of an Istio identity ``/ns/<ns>/sa/<sa>``, else ``""``."""
        seg = self.segments
        return seg[3] if _is_istio_path(seg) else ""

    def member_of(self, trust_domain: str) -> bool:
        """Whether this ID belongs to ``trust_domain`` (SPIFFE-ID §2.1: exact, case-sensitive compare)."""
        return self.trust_domain == trust_domain


def _is_istio_path(segments: tuple[str, ...]) -> bool:
    return len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa"

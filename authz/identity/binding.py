"""Tokens bound to the peer: RFC 8705 certificate-bound access tokens and SPIFFE-ID-bound claims.

Pure functions over verified claims and the resolved peer (:class:`authz.identity.peer.PeerIdentity`).
Failures raise :class:`~authz.errors.CredentialError` with status 401: RFC 8705 §3 has the resource
server reject a token whose binding does not match as ``invalid_token``.

SPIFFE binding patterns
-----------------------
:func:`check_spiffe_binding` compares one claim (a top-level claim name, used literally) with a value
derived from the peer's SPIFFE ID. Without a pattern the claim must equal the full ``spiffe://`` ID.
A pattern is literal text with placeholders:

==========================  ===================================================
``{spiffe_id}``             the full ID, ``spiffe://td/ns/foo/sa/bar``
``{trust_domain}``          ``td``
``{path}``                  ``/ns/foo/sa/bar``
``{principal}``             Istio's form without the scheme, ``td/ns/foo/sa/bar``
``{namespace}``             ``foo`` (Istio IDs ``/ns/<ns>/sa/<sa>`` only)
``{service_account}``       ``bar`` (Istio IDs only)
``{{`` / ``}}``             a literal ``{`` / ``}``
==========================  ===================================================

Example: the Kubernetes service-account token subject
``system:serviceaccount:{namespace}:{service_account}``. A pattern naming ``{namespace}`` or
``{service_account}`` never matches a peer whose ID is not of the Istio shape. Unknown placeholders and
unbalanced braces are a ``ConfigError`` (``invalid_binding_pattern``), so :func:`compile_binding_pattern`
should be called when the configuration is loaded.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from authz.errors import ConfigError, CredentialError
from authz.identity.spiffe import SpiffeId

__all__ = [
    "BINDING_PLACEHOLDERS",
    "BindingMode",
    "BindingPattern",
    "check_certificate_binding",
    "check_spiffe_binding",
    "compile_binding_pattern",
]

BindingMode = Literal["required", "optional", "disabled"]
CNF_CLAIM = "cnf"  # RFC 7800 §3.1 confirmation claim
X5T_S256 = "x5t#S256"  # RFC 8705 §3.1 confirmation method

BINDING_PLACEHOLDERS = frozenset(
    {"spiffe_id", "trust_domain", "path", "principal", "namespace", "service_account"}
)


def _fail(message: str, reason: str) -> CredentialError:
    return CredentialError(message, reason=reason, status=401)


def _unpadded(value: str) -> str:
    return value.rstrip("=")


def check_certificate_binding(claims: Mapping[str, Any], thumbprint: str, *, mode: BindingMode) -> None:
    """RFC 8705 §3: accept a certificate-bound token only from the certificate it is bound to.

    * ``disabled``: nothing is checked.
    * a token with ``cnf.x5t#S256`` (RFC 8705 §3.1) is accepted only when the peer certificate's
      thumbprint is known (else ``certificate_required``) and equal, compared in constant time (else
      ``certificate_binding_mismatch``). Padding ``=`` is ignored on both sides (RFC 7515 §2 base64url).
    * a ``cnf`` that is not a JSON object, or an ``x5t#S256`` that is not a string:
      ``certificate_binding_malformed``.
    * a token without ``cnf.x5t#S256``: refused under ``required`` (``certificate_binding_missing``),
      accepted under ``optional``.
    """
    if mode == "disabled":
        return
    cnf = claims.get(CNF_CLAIM)
    bound_to: str | None = None
    if cnf is not None:
        if not isinstance(cnf, Mapping):
            raise _fail("the cnf claim is not a JSON object", "certificate_binding_malformed")
        x5t = cnf.get(X5T_S256)
        if x5t is not None:
            if not isinstance(x5t, str) or not x5t:
                raise _fail("cnf.x5t#S256 is not a non-empty string", "certificate_binding_malformed")
            bound_to = x5t
    if bound_to is None:
        if mode == "required":
            raise _fail(
                "the token is not bound to a certificate (no cnf.x5t#S256)", "certificate_binding_missing"
            )
        return
    if not thumbprint:
        raise _fail(
            "the token is certificate-bound but the peer presented no certificate", "certificate_required"
        )
    expected = _unpadded(bound_to).encode("utf-8", "surrogatepass")
    presented = _unpadded(thumbprint).encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(expected, presented):
        raise _fail("the token is bound to another certificate", "certificate_binding_mismatch")


@dataclass(frozen=True, slots=True)
class BindingPattern:
    """A compiled pattern: alternating literal text and placeholder names (see the module docstring)."""

    source: str
    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, text)

    def render(self, spiffe_id: SpiffeId) -> str | None:
        """The expected claim value for ``spiffe_id``, or ``None`` when a placeholder has no value."""
        values = {
            "spiffe_id": str(spiffe_id),
            "trust_domain": spiffe_id.trust_domain,
            "path": spiffe_id.path,
            "principal": spiffe_id.principal,
            "namespace": spiffe_id.namespace,
            "service_account": spiffe_id.service_account,
        }
        out: list[str] = []
        for is_placeholder, text in self.parts:
            if not is_placeholder:
                out.append(text)
                continue
            value = values[text]
            if not value:
                return None
            out.append(value)
        return "".join(out)


@lru_cache(maxsize=256)
def compile_binding_pattern(pattern: str) -> BindingPattern:
    """Compile a binding pattern; ``ConfigError`` (``invalid_binding_pattern``) when it is not valid."""
    parts: list[tuple[bool, str]] = []
    literal: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch in "{}" and i + 1 < n and pattern[i + 1] == ch:
            literal.append(ch)
            i += 2
            continue
        if ch == "}":
            raise ConfigError(
                f"unmatched '}}' at offset {i} in {pattern!r}",
                field="pattern",
                reason="invalid_binding_pattern",
            )
        if ch == "{":
            end = pattern.find("}", i + 1)
            name = pattern[i + 1 : end] if end != -1 else ""
            if end == -1 or name not in BINDING_PLACEHOLDERS:
                raise ConfigError(
                    f"unknown or unterminated placeholder at offset {i} in {pattern!r};"
                    f" known: {', '.join(sorted(BINDING_PLACEHOLDERS))}",
                    field="pattern",
                    reason="invalid_binding_pattern",
                )
            if literal:
                parts.append((False, "".join(literal)))
                literal = []
            parts.append((True, name))
            i = end + 1
            continue
        literal.append(ch)
        i += 1
    if literal:
        parts.append((False, "".join(literal)))
    return BindingPattern(source=pattern, parts=tuple(parts))


def check_spiffe_binding(
    claims: Mapping[str, Any], *, claim: str, peer_spiffe_id: str, pattern: str | None = None
) -> None:
    """The claim ``claim`` must equal the peer's SPIFFE ID, or ``pattern`` rendered from it.

    Reasons: ``peer_identity_required`` (no peer SPIFFE ID), ``spiffe_binding_claim_missing`` (claim
    absent or not a string), ``spiffe_binding_mismatch``; an ``InvalidSpiffeId`` when ``peer_spiffe_id`` is
    not a SPIFFE ID. Raises ``ConfigError`` for a bad ``pattern``.
    """
    compiled = compile_binding_pattern(pattern) if pattern is not None else None
    if not peer_spiffe_id:
        raise _fail(
            "the token is bound to a workload identity but the peer has none", "peer_identity_required"
        )
    sid = SpiffeId.parse(peer_spiffe_id)
    value = claims.get(claim)
    if not isinstance(value, str):
        raise _fail(
            f"the token has no string claim {claim!r} to bind to the peer", "spiffe_binding_claim_missing"
        )
    expected = str(sid) if compiled is None else compiled.render(sid)
    if expected is None or not hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), value.encode("utf-8", "surrogatepass")
    ):
        raise _fail(f"claim {claim!r} does not name the peer {sid}", "spiffe_binding_mismatch")

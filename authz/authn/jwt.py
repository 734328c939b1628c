"""JWS/JWT verification (RFC 7515, RFC 7519, RFC 8725) as a pure function of its arguments.

:func:`verify` does no I/O and reads no clock: the caller passes the key set and ``now``. Every failure is
a :class:`CredentialError` with a stable ``reason``; the messages follow Envoy's jwt_verify_lib
(``src/status.cc``) where it has one, because Istio users see those strings in 401 bodies.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from authz.authn.jwk import HMAC_ALGORITHMS, JWS_ALGORITHMS, Jwk, KeySet, b64url_decode
from authz.authn.model import JwtRule
from authz.authn.settings import CertificateBinding, IssuerSettings, SpiffeBinding
from authz.errors import CredentialError

__all__ = [
    "MAX_JSON_DEPTH",
    "Decoded",
    "VerifiedToken",
    "check_claims",
    "decode_unverified",
    "looks_like_jws",
    "verify",
]

MAX_JSON_DEPTH = 16  # real headers are flat, real payloads 2-4 deep; deeper is an attack on parsers
MAX_KID_LENGTH = 1024  # kids are short identifiers; a long one is only ever a probe

_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# Group orders (SEC 2 / FIPS 186-4 D.1.2); ECDSA r and s must lie in [1, n-1] (psychic signatures).
_EC_ORDERS: Mapping[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "A51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}
_EC_SIZES: Mapping[str, int] = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}
# RFC 7515 section 4.1.11: we understand no extension header parameter, so any "crit" rejects the token.
_UNDERSTOOD_CRIT: frozenset[str] = frozenset()


def _fail(message: str, reason: str, status: int = 401) -> CredentialError:
    return CredentialError(message, reason=reason, status=status)


@dataclass(frozen=True, slots=True, eq=False)
class VerifiedToken:
    """A token whose signature and claims were verified against ``rule`` and ``settings``.

    ``payload_segment`` is the token's second segment (what ``outputPayloadToHeader`` forwards);
    ``key_fingerprint`` names the key that verified it, so a cached result is only reused while that
    key is still in the issuer's current key set.
    """

    token: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    payload_segment: str
    algorithm: str
    kid: str | None
    key_fingerprint: str
    expires_at: float | None
    rule: JwtRule
    settings: IssuerSettings

    @property
    def issuer(self) -> str:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else ""

    @property
    def subject(self) -> str:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else ""

    @property
    def certificate_binding(self) -> CertificateBinding:
        return self.settings.certificate_binding

    @property
    def spiffe_binding(self) -> SpiffeBinding | None:
        return self.settings.spiffe_binding

    @property
    def cnf_x5t_s256(self) -> str:
        """RFC 8705 section 3.1 confirmation: base64url SHA-256 of the client certificate, or ``""``."""
        cnf = self.claims.get("cnf")
        value = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
        return value if isinstance(value, str) else ""


Decoded = tuple[dict[str, Any], dict[str, Any], bytes, str]
"""What :func:`decode_unverified` returns: header, payload, signature, signing input."""


def looks_like_jws(token: str) -> bool:
    """True if ``token`` has the JWS compact shape (two dots); opaque tokens go to introspection."""
    return token.count(".") == 2


def decode_unverified(token: str, *, max_bytes: int) -> Decoded:
    """Split and strictly decode ``token``: ``(header, payload, signature, signing_input)``.

    Nothing here is trusted; it only finds the issuer (to pick rules) and the ``kid`` (to pick keys).
    RFC 7515 section 7.1 compact serialization; RFC 8725 section 3.1 (algorithm comes from the key).
    """
    if len(token) > max_bytes:
        raise _fail(f"Jwt is too large ({len(token)} bytes, limit {max_bytes})", "token_too_large")
    parts = token.split(".")
    if len(parts) != 3:
        raise _fail(
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            "malformed_token",
        )
    h64, p64, s64 = parts
    header = _decode_json(h64, "header")
    payload = _decode_json(p64, "payload")
    try:
        signature = b64url_decode(s64)
    except ValueError as exc:
        raise _fail(f"Jwt signature is an invalid Base64url encoded: {exc}", "malformed_token") from None
    _check_header(header)
    _check_payload_types(payload)
    return header, payload, signature, f"{h64}.{p64}"


def verify(
    token: str,
    keys: KeySet,
    *,
    now: float,
    rule: JwtRule,
    settings: IssuerSettings,
    decoded: Decoded | None = None,
) -> VerifiedToken:
    """Verify a compact JWS/JWT against ``keys`` (asymmetric) or ``settings.hmac_keys`` (HS*) at ``now``.

    Raises :class:`CredentialError`: 401 with ``reason`` ``token_too_large``, ``malformed_token``,
    ``unsupported_algorithm``, ``unsupported_critical_header``, ``invalid_claim``,
    ``issuer_not_configured``, ``unknown_kid``, ``bad_signature``, ``expired``, ``not_yet_valid``,
    ``missing_claim``; 403 ``audience_not_allowed``. ``decoded``: :func:`decode_unverified` of ``token``
    when the caller already has it (it is a pure function of the token; the size limit still applies).
    """
    if decoded is None:
        decoded = decode_unverified(token, max_bytes=settings.max_token_bytes)
    elif len(token) > settings.max_token_bytes:
        raise _fail(
            f"Jwt is too large ({len(token)} bytes, limit {settings.max_token_bytes})", "token_too_large"
        )
    header, payload, signature, signing_input = decoded
    alg: str = header["alg"]
    kid: str | None = header.get("kid")
    iss = payload.get("iss")
    # Envoy JwtProvider.issuer: when set, it must equal the token's iss (jwt_verify_lib JwtUnknownIssuer).
    if rule.issuer and iss != rule.issuer:
        raise _fail("Jwt issuer is not configured", "issuer_not_configured")
    # RFC 8725 section 3.1/3.2: the key decides the algorithm; HMAC keys come only from operator secrets,
    # so "HS256 signed with the RSA public key" (CVE-2015-9235, CVE-2022-29217) has no key to verify with.
    pool = KeySet(settings.hmac_keys) if alg in HMAC_ALGORITHMS else keys
    candidates = pool.candidates(kid, alg)
    if not candidates:
        raise _fail("Jwks doesn't have key to match kid or alg from Jwt", "unknown_kid")
    data = signing_input.encode("ascii")
    used = next((k for k in candidates if _signature_ok(k, alg, data, signature)), None)
    if used is None:
        raise _fail("Jwt verification fails", "bad_signature")
    check_claims(payload, now=now, rule=rule, settings=settings)
    return VerifiedToken(
        token=token,
        header=MappingProxyType(header),
        claims=MappingProxyType(payload),
        payload_segment=signing_input.partition(".")[2],
        algorithm=alg,
        kid=kid,
        key_fingerprint=used.fingerprint,
        expires_at=float(payload["exp"]) if "exp" in payload else None,
        rule=rule,
        settings=settings,
    )


def check_claims(payload: Mapping[str, Any], *, now: float, rule: JwtRule, settings: IssuerSettings) -> None:
    """Time, required-claim and audience checks on a payload whose origin is already verified
    (a signed JWT, or an RFC 7662 introspection response). Raises :class:`CredentialError`."""
    _check_payload_types(payload)
    skew = settings.clock_skew
    # RFC 7519 section 4.1.4 exp, 4.1.5 nbf; Envoy allows clock_skew_seconds on both sides.
    exp = payload.get("exp")
    if exp is not None and now > exp + skew:
        raise _fail("Jwt is expired", "expired")
    nbf = payload.get("nbf")
    if nbf is not None and now < nbf - skew:
        raise _fail("Jwt not yet valid", "not_yet_valid")
    iat = payload.get("iat")
    if iat is not None and now < iat - skew:
        raise _fail("Jwt is issued in the future (iat)", "not_yet_valid")
    for claim in settings.required_claims:
        if claim not in payload:
            raise _fail(f"Jwt is missing required claim [{claim}]", "missing_claim")
    if rule.audiences:
        aud = payload.get("aud")
        token_auds = [aud] if isinstance(aud, str) else (aud or [])
        if not any(a in rule.audiences for a in token_auds):
            # Envoy filter.cc: JwtAudienceNotAllowed is the one verification failure that is 403.
            raise _fail("Audiences in Jwt are not allowed", "audience_not_allowed", status=403)


def _decode_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = b64url_decode(segment)
    except ValueError as exc:
        raise _fail(f"Jwt {what} is an invalid Base64url encoded: {exc}", "malformed_token") from None
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(f"Jwt {what} is an invalid JSON: {exc}", "malformed_token") from None
    except RecursionError:
        raise _fail(f"Jwt {what} is nested too deeply", "malformed_token") from None
    if not isinstance(value, dict):
        raise _fail(f"Jwt {what} is not a JSON object", "malformed_token")
    # Every level opens a "{" or "[": with no more of them than the limit, nothing can nest deeper.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise _fail(f"Jwt {what} is nested deeper than {MAX_JSON_DEPTH} levels", "malformed_token")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """RFC 7515 section 5.2 step 4 / RFC 7519 section 4: duplicate member names must be rejected,
    or two parsers could disagree on which ``alg``/``sub`` the token has."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate member {key!r}")
            seen.add(key)
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (bounded work: the token size is already capped)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            return d
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node if isinstance(v, dict | list))
    return deepest


def _check_header(header: dict[str, Any]) -> None:
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _fail("Jwt header [alg] field is required and must be a string", "malformed_token")
    if alg not in JWS_ALGORITHMS:
        # "none" (RFC 7518 section 3.6) is deliberately absent from JWS_ALGORITHMS.
        raise _fail(f"Jwt header [alg] field value {alg[:20]!r} is not supported", "unsupported_algorithm")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        raise _fail("Jwt header [kid] field is not a short string", "malformed_token")
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or not crit or not all(isinstance(c, str) for c in crit):
            raise _fail("Jwt header [crit] field must be a non-empty list of strings", "malformed_token")
        unknown = [c for c in crit if c not in _UNDERSTOOD_CRIT]
        if unknown:
            raise _fail(
                f"Jwt header [crit] names extensions not understood: {unknown[:5]}",
                "unsupported_critical_header",
            )
    if header.get("b64", True) is not True:
        # RFC 7797 unencoded payloads are not JWTs.
        raise _fail("Jwt header [b64] false is not supported", "unsupported_critical_header")
    # jku, x5u, jwk, x5c (RFC 7515 section 4.1.2-4.1.6) are never read: keys come only from configuration.


def _check_payload_types(payload: Mapping[str, Any]) -> None:
    """jwt_verify_lib ``Jwt::parseFromString`` field type checks, plus numeric NumericDates."""
    for name in ("iss", "sub", "azp", "jti"):
        if name in payload and not isinstance(payload[name], str):
            raise _fail(f"Jwt payload [{name}] field is not a string", "invalid_claim")
    aud = payload.get("aud")
    if aud is not None and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise _fail("Jwt payload [aud] field is not a string or string list", "invalid_claim")
    for name in ("exp", "nbf", "iat"):
        value = payload.get(name)
        # RFC 7519 section 2 NumericDate; bool is an int in Python and is not a number in JSON.
        if name in payload and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _fail(f"Jwt payload [{name}] field is not a number", "invalid_claim")


def _signature_ok(jwk: Jwk, alg: str, data: bytes, signature: bytes) -> bool:
    """RFC 7518 section 3: verify ``signature`` over ``data`` with ``jwk`` using ``alg``.

    The key type is checked against the algorithm family again here, so no path can feed a public
    key to HMAC or a secret to RSA.
    """
    if alg not in jwk.algorithms:
        return False
    key = jwk.key
    try:
        if alg in HMAC_ALGORITHMS:
            if not isinstance(key, bytes):
                return False
            expected = hmac.new(key, data, _HASHES[alg[2:]]().name).digest()
            return hmac.compare_digest(expected, signature)
        if alg.startswith(("RS", "PS")):
            if not isinstance(key, rsa.RSAPublicKey) or len(signature) != (key.key_size + 7) // 8:
                return False
            algorithm = _HASHES[alg[2:]]()
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg.startswith("RS")
                # RFC 7518 section 3.5: MGF1 with the same hash, salt as long as the hash output.
                else padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            )
            key.verify(signature, data, pad, algorithm)
            return True
        if alg.startswith("ES"):
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            size = _EC_SIZES[key.curve.name]
            order = _EC_ORDERS[key.curve.name]
            # RFC 7518 section 3.4: the signature is R || S, each exactly the coordinate size.
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            # CVE-2022-21449 ("psychic signatures"): r = s = 0 must never verify.
            if not (0 < r < order and 0 < s < order):
                return False
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_HASHES[alg[2:]]()))
            return True
        if alg in ("EdDSA", "Ed25519", "Ed448"):
            if not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
                return False
            key.verify(signature, data)
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    return False

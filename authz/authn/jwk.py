"""JSON Web Keys (RFC 7517) and key sets: parsing, validation, and the algorithms each key may verify.

The algorithms a key verifies come from the key itself (RFC 7517 section 4.4 ``alg``, or its ``kty`` and
``crv``), never from a token. A key set is a value: a fetch builds a new one, nothing mutates it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from authz.errors import DependencyError

__all__ = [
    "HMAC_ALGORITHMS",
    "JWS_ALGORITHMS",
    "Jwk",
    "JwksError",
    "KeySet",
    "ParsedJwks",
    "b64url_decode",
    "hmac_key",
    "parse_jwks",
]

MIN_RSA_BITS = 2048  # NIST SP 800-131A: RSA below 2048 bits is disallowed for signatures
MAX_JWKS_BYTES = 1024 * 1024  # a key set larger than 1 MiB is an error or an attack, not a JWKS
MAX_JWKS_KEYS = 256  # real IdPs publish a handful; bounding the count bounds per-token verify work

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# RFC 7518 section 3.4 (ES*), RFC 8037 section 3.1 (EdDSA); curve -> (algorithm, coordinate bytes)
EC_CURVES: Mapping[str, tuple[str, int, ec.EllipticCurve]] = {
    "P-256": ("ES256", 32, ec.SECP256R1()),
    "P-384": ("ES384", 48, ec.SECP384R1()),
    "P-521": ("ES512", 66, ec.SECP521R1()),
}
OKP_CURVES: Mapping[str, int] = {"Ed25519": 32, "Ed448": 57}
JWS_ALGORITHMS = RSA_ALGORITHMS | HMAC_ALGORITHMS | {"ES256", "ES384", "ES512", "EdDSA"}
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


class JwksError(DependencyError):
    """A key set document is not a usable JWKS. The message names the source and what was wrong."""

    reason = "invalid_jwks"


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding (RFC 7515 section 2, RFC 4648 section 5).

    Rejects padding, whitespace, characters outside the URL-safe alphabet, impossible lengths and
    non-canonical encodings (non-zero unused trailing bits), so each byte string has exactly one
    accepted spelling. Raises ``ValueError``.
    """
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("characters outside the base64url alphabet (padding and whitespace are not allowed)")
    rem = len(text) % 4
    if rem == 1:
        raise ValueError("impossible base64url length")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * ((4 - rem) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64url: {exc}") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise ValueError("non-canonical base64url (unused trailing bits are not zero)")
    return raw


@dataclass(frozen=True, slots=True, eq=False)
class Jwk:
    """One verification key. ``key`` is a cryptography public key, or ``bytes`` for an HMAC secret.

    ``fingerprint`` identifies the key material (RFC 7638 thumbprint for public keys), so a cached
    verification can be checked against the current key set after a rotation.
    """

    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any
    fingerprint: str

    def describe(self) -> dict[str, object]:
        return {
            "kid": self.kid,
            "kty": self.kty,
            "algorithms": sorted(self.algorithms),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True, eq=False)
class KeySet:
    """An immutable set of verification keys, indexed by ``kid``."""

    keys: tuple[Jwk, ...] = ()
    source: str = ""
    _by_kid: Mapping[str, tuple[Jwk, ...]] = field(init=False, repr=False)
    _fingerprints: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_kid: dict[str, list[Jwk]] = {}
        for k in self.keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        object.__setattr__(self, "_by_kid", {kid: tuple(v) for kid, v in by_kid.items()})
        object.__setattr__(self, "_fingerprints", frozenset(k.fingerprint for k in self.keys))

    def candidates(self, kid: str | None, alg: str) -> list[Jwk]:
        """Keys that may verify a token with this ``kid`` and ``alg`` (jwt_verify_lib ``verifyJwt``:
        with a ``kid`` only keys with that ``kid``; without one, every key that supports ``alg``)."""
        pool: Iterable[Jwk] = self.keys if kid is None else self._by_kid.get(kid, ())
        return [k for k in pool if alg in k.algorithms]

    def has_kid(self, kid: str) -> bool:
        return kid in self._by_kid

    def contains(self, fingerprint: str) -> bool:
        return fingerprint in self._fingerprints

    def merged(self, other: KeySet) -> KeySet:
        return KeySet(self.keys + other.keys, source=self.source or other.source)

    def describe(self) -> list[dict[str, object]]:
        return [k.describe() for k in self.keys]


@dataclass(frozen=True, slots=True)
class ParsedJwks:
    """The outcome of parsing a JWKS: usable keys plus the reason each skipped key was skipped."""

    keys: KeySet
    skipped: tuple[str, ...] = ()
    has_private_material: bool = False


def hmac_key(secret: bytes, *, kid: str | None, algorithm: str) -> Jwk:
    """An HMAC key from an operator-provided secret (never from a JWKS).

    RFC 7518 section 3.2: the key must be at least as long as the hash output.
    """
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"not an HMAC algorithm: {algorithm}")
    need = int(algorithm[2:]) // 8
    if len(secret) < need:
        raise ValueError(f"{algorithm} needs a secret of at least {need} bytes, got {len(secret)}")
    digest = hashlib.sha256(b"meshauthz-hmac\x00" + secret).hexdigest()
    return Jwk(
        kid=kid, kty="oct", algorithms=frozenset({algorithm}), key=secret, fingerprint=f"hmac:{digest}"
    )


def parse_jwks(document: str | bytes | Mapping[str, Any], *, source: str) -> ParsedJwks:
    """Parse a JWKS (RFC 7517 section 5). Raises :class:`JwksError` naming ``source`` if the document is
    not a JWKS with a ``keys`` array or no key in it is usable; individual unusable keys are skipped
    and reported in :attr:`ParsedJwks.skipped`.
    """
    if isinstance(document, Mapping):
        data: Any = document
    else:
        raw = document.encode("utf-8") if isinstance(document, str) else document
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksError(f"JWKS from {source} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise JwksError(f"JWKS from {source} is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise JwksError(f"JWKS from {source} is not a JSON object")
    keys = data.get("keys")
    if not isinstance(keys, list):
        # istio jwks_resolver.go validateJWKSFormat: the document must have a "keys" array.
        raise JwksError(f'JWKS from {source} has no "keys" array')
    if len(keys) > MAX_JWKS_KEYS:
        raise JwksError(f"JWKS from {source} has {len(keys)} keys, more than {MAX_JWKS_KEYS}")
    usable: list[Jwk] = []
    skipped: list[str] = []
    private = False
    for i, entry in enumerate(keys):
        if isinstance(entry, Mapping) and not PRIVATE_MEMBERS.isdisjoint(entry.keys()):
            private = True
        try:
            usable.append(_parse_jwk(entry))
        except ValueError as exc:
            kid = entry.get("kid") if isinstance(entry, Mapping) else None
            skipped.append(f"keys[{i}]" + (f" (kid {kid!r})" if isinstance(kid, str) else "") + f": {exc}")
    if not usable:
        detail = "; ".join(skipped) if skipped else "the keys array is empty"
        raise JwksError(f"JWKS from {source} has no usable key: {detail}")
    return ParsedJwks(KeySet(tuple(usable), source=source), tuple(skipped), private)


def _member(entry: Mapping[str, Any], name: str) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f'missing or non-string "{name}"')
    try:
        return b64url_decode(value)
    except ValueError as exc:
        raise ValueError(f'"{name}": {exc}') from None


def _thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638 section 3: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _parse_jwk(entry: Any) -> Jwk:
    if not isinstance(entry, Mapping):
        raise ValueError("not a JSON object")
    kty = entry.get("kty")
    if not isinstance(kty, str):
        raise ValueError('missing "kty"')
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError('"kid" is not a string')
    # RFC 7517 section 4.2/4.3: a key meant only for encryption (or without "verify") is not ours.
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f'"use" is {use!r}, not "sig"')
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError('"key_ops" does not include "verify"')
    alg = entry.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in JWS_ALGORITHMS | {"Ed25519", "Ed448"}):
        raise ValueError(f"unsupported alg {alg!r}")
    if kty == "RSA":
        algs = RSA_ALGORITHMS if alg is None else frozenset({alg})
        if not algs <= RSA_ALGORITHMS:
            raise ValueError(f"alg {alg} does not fit an RSA key")
        n = int.from_bytes(_member(entry, "n"), "big")
        e = int.from_bytes(_member(entry, "e"), "big")
        if n.bit_length() < MIN_RSA_BITS:
            raise ValueError(f"RSA key has {n.bit_length()} bits, fewer than {MIN_RSA_BITS}")
        try:
            key: Any = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise ValueError(f"invalid RSA key: {exc}") from None
        fp = _thumbprint({"e": entry["e"], "kty": "RSA", "n": entry["n"]})
        return Jwk(kid, kty, algs, key, fp)
    if kty == "EC":
        crv = entry.get("crv")
        if not isinstance(crv, str) or crv not in EC_CURVES:
            raise ValueError(f"unsupported EC curve {crv!r}")
        curve_alg, size, curve = EC_CURVES[crv]
        if alg is not None and alg != curve_alg:
            raise ValueError(f"alg {alg} does not fit curve {crv}")
        x, y = _member(entry, "x"), _member(entry, "y")
        if len(x) != size or len(y) != size:
            raise ValueError(f"{crv} coordinates must be {size} bytes")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise ValueError(f"invalid EC key (point not on {crv}): {exc}") from None
        fp = _thumbprint({"crv": crv, "kty": "EC", "x": entry["x"], "y": entry["y"]})
        return Jwk(kid, kty, frozenset({curve_alg}), key, fp)
    if kty == "OKP":
        crv = entry.get("crv")
        if not isinstance(crv, str) or crv not in OKP_CURVES:
            raise ValueError(f"unsupported OKP curve {crv!r}")
        if alg is not None and alg not in ("EdDSA", crv):
            raise ValueError(f"alg {alg} does not fit curve {crv}")
        x = _member(entry, "x")
        if len(x) != OKP_CURVES[crv]:
            raise ValueError(f"{crv} public key must be {OKP_CURVES[crv]} bytes")
        key = (
            ed25519.Ed25519PublicKey.from_public_bytes(x)
            if crv == "Ed25519"
            else ed448.Ed448PublicKey.from_public_bytes(x)
        )
        fp = _thumbprint({"crv": crv, "kty": "OKP", "x": entry["x"]})
        return Jwk(kid, kty, frozenset({"EdDSA", crv}), key, fp)
    if kty == "oct":
        raise ValueError("symmetric (oct) keys are never taken from a JWKS; configure HMAC secrets instead")
    raise ValueError(f"unsupported kty {kty!r}")

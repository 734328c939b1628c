"""Signing keys generated at start, and a key ring whose rotation phases are a pure function of time.

A rotation has three phases (the "publish, then sign, then retire" order every JWKS consumer relies on,
OpenID Connect Core section 10.1.1 "Rotation of Asymmetric Signing Keys"):

1. **published**: the new key is in the JWKS but nothing is signed with it yet (``pending``);
2. **active**: it signs new tokens; the previous key stays published so tokens it signed still verify
   (``retiring``);
3. **retired**: the previous key leaves the JWKS.

Each key records *when* it was published, activated and retired, so the phases follow the (injected,
offset-able) clock: ``rotate(now, overlap=30, retire_after=60)`` schedules all three in one call.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from authz.errors import AuthzError

__all__ = ["KeyRing", "KeyState", "PrivateKey", "SigningKey", "generate_key", "jwk_thumbprint", "sign"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KeyState = Literal["pending", "active", "retiring", "retired"]

RSA_KEY_BITS = 2048  # RFC 7518 section 3.3: "A key of size 2048 bits or larger MUST be used"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 section 3: SHA-256 over the required members, lexicographically ordered, no whitespace."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
    members = {k: public_jwk[k] for k in required[public_jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass
class SigningKey:
    """One key pair. Mutable only in its schedule (``active_from``, ``retire_at``), changed by the ring."""

    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: dict[str, Any]
    published_at: float
    active_from: float | None = None  # None: published but not (yet) scheduled to sign
    retire_at: float | None = None  # None: not scheduled to leave the JWKS
    seq: int = 0

    def state(self, now: float, signer: SigningKey | None) -> KeyState:
        if self.retire_at is not None and now >= self.retire_at:
            return "retired"
        if signer is self:
            return "active"
        if self.active_from is None or now < self.active_from:
            return "pending"
        return "retiring"

    def jwk(self) -> dict[str, Any]:
        """The public JWK (RFC 7517 section 4) with ``kid``, ``alg`` and ``use: sig``."""
        return {**self.public_jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def generate_key(alg: str, *, kid: str = "", now: float = 0.0) -> SigningKey:
    """A fresh key for ``alg``: RS256, ES256 (P-256, RFC 7518 section 3.4), EdDSA (Ed25519, RFC 8037)."""
    private: PrivateKey
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        public = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        public = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        public = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise AuthzError(f"unsupported signing algorithm {alg!r}", reason="unsupported_alg")
    public = {k: v for k, v in public.items() if k in ("kty", "n", "e", "crv", "x", "y")}
    return SigningKey(
        kid=kid or jwk_thumbprint(public), alg=alg, private_key=private, public_jwk=public, published_at=now
    )


@dataclass
class KeyRing:
    """Every key an issuer ever had, with a schedule. All queries take ``now``; nothing reads a clock."""

    keys: list[SigningKey] = field(default_factory=list)

    def add(self, key: SigningKey) -> SigningKey:
        if any(k.kid == key.kid for k in self.keys):
            raise AuthzError(f"duplicate kid {key.kid!r}", reason="duplicate_kid")
        key.seq = len(self.keys)
        self.keys.append(key)
        return key

    def get(self, kid: str) -> SigningKey:
        for key in self.keys:
            if key.kid == kid:
                return key
        raise AuthzError(f"no key with kid {kid!r}", reason="unknown_kid")

    def signer(self, alg: str, now: float) -> SigningKey | None:
        """The newest activated, unretired key of ``alg``: the one that signs new tokens."""
        best: SigningKey | None = None
        for key in self.keys:
            if key.alg != alg or key.active_from is None or key.active_from > now:
                continue
            if key.retire_at is not None and now >= key.retire_at:
                continue
            if best is None or (key.active_from, key.seq) > (best.active_from or 0.0, best.seq):
                best = key
        return best

    def state(self, key: SigningKey, now: float) -> KeyState:
        return key.state(now, self.signer(key.alg, now))

    def published(self, now: float) -> list[SigningKey]:
        """Keys in the JWKS at ``now``: published and not yet retired."""
        return [k for k in self.keys if k.published_at <= now and (k.retire_at is None or now < k.retire_at)]

    def jwks(self, now: float) -> dict[str, Any]:
        """RFC 7517 section 5 JWK Set of the published keys."""
        return {"keys": [k.jwk() for k in self.published(now)]}

    def publish(self, alg: str, now: float, *, activate_at: float | None = None, kid: str = "") -> SigningKey:
        """Phase 1: a new key enters the JWKS; it signs from ``activate_at`` (None: when activated)."""
        key = self.add(generate_key(alg, kid=kid, now=now))
        key.active_from = activate_at
        return key

    def activate(self, now: float, kid: str = "", alg: str = "") -> SigningKey:
        """Phase 2: ``kid`` (default: the newest pending key, of ``alg`` if given) signs from ``now``."""
        if kid:
            key = self.get(kid)
        else:
            pending = [k for k in self.keys if self.state(k, now) == "pending" and (not alg or k.alg == alg)]
            if not pending:
                raise AuthzError("no pending key to activate; publish one first", reason="no_pending_key")
            key = pending[-1]
        if key.retire_at is not None and now >= key.retire_at:
            raise AuthzError(f"key {key.kid!r} is retired", reason="key_retired")
        key.active_from = now
        return key

    def retire(self, now: float, kid: str = "") -> list[SigningKey]:
        """Phase 3: ``kid`` (default: every superseded key) leaves the JWKS at ``now``."""
        targets = [self.get(kid)] if kid else [k for k in self.keys if self.state(k, now) == "retiring"]
        for key in targets:
            key.retire_at = now
        return targets

    def rotate(self, alg: str, now: float, *, overlap: float = 0.0, retire_after: float = 0.0) -> SigningKey:
        """All three phases in one call: publish now, sign from ``now + overlap``, retire the keys it
        replaces at ``now + overlap + retire_after``."""
        replaced = [k for k in self.keys if k.alg == alg and self.state(k, now) in ("active", "retiring")]
        key = self.publish(alg, now, activate_at=now + overlap)
        for old in replaced:
            old.retire_at = now + overlap + retire_after
        return key

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "kid": k.kid,
                "alg": k.alg,
                "state": self.state(k, now),
                "published_at": k.published_at,
                "active_from": k.active_from,
                "retire_at": k.retire_at,
            }
            for k in self.keys
        ]


def sign(
    key: SigningKey, claims: dict[str, Any], *, typ: str = "JWT", extra_headers: dict[str, Any] | None = None
) -> str:
    """A compact JWS (RFC 7515 section 7.1) with ``kid``, ``alg`` and ``typ`` in the protected header."""
    headers: dict[str, Any] = {"kid": key.kid, "typ": typ, **(extra_headers or {})}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)

"""Signing keys, the JWKS and JWTs for one bench run: minted at run time, never written to the repo.

The same issuer, subject and claims back every row, so Envoy's native ``jwt_authn`` + ``rbac``, our
authorizer and the bundled proxy decide the same request with an equivalent rule.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = [
    "BENCH_AUDIENCE",
    "BENCH_GROUP",
    "BENCH_ISSUER",
    "BENCH_SUBJECT",
    "TOKEN_LIFETIME_S",
    "SigningKey",
    "bench_claims",
    "mint_key",
    "mint_token",
    "mint_tokens",
    "public_jwks",
]

BENCH_ISSUER = "https://issuer.bench.meshauthz.local"
BENCH_SUBJECT = "bench-user"
BENCH_GROUP = "bench"
BENCH_AUDIENCE = "bench-api"
# Long enough for the whole `make bench` (well under 10 minutes) plus slack; short enough to be a real JWT.
TOKEN_LIFETIME_S = 3600
RSA_KEY_BITS = 2048  # what IdPs issue by default (RFC 7518 section 3.3 requires >= 2048)


@dataclass(frozen=True)
class SigningKey:
    """A private key with its JWS algorithm and ``kid``."""

    algorithm: str
    kid: str
    private_key: Any

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK (RFC 7517 section 4) with ``kid``, ``alg`` and ``use``."""
        public = self.private_key.public_key()
        if self.algorithm.startswith(("RS", "PS")):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.algorithm.startswith("ES"):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def mint_key(algorithm: str = "RS256") -> SigningKey:
    """A fresh key for ``algorithm`` (RS256, ES256 or EdDSA/Ed25519)."""
    key: Any
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    elif algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unsupported bench algorithm {algorithm!r}")
    return SigningKey(algorithm, f"bench-{algorithm.lower()}-{uuid.uuid4().hex[:8]}", key)


def public_jwks(*keys: SigningKey) -> str:
    """The JWKS document (RFC 7517 section 5) as a compact JSON string, public keys only."""
    return json.dumps({"keys": [k.public_jwk() for k in keys]}, separators=(",", ":"))


def bench_claims(now: float, *, serial: int | None = None) -> dict[str, Any]:
    """The bench token's claims. ``serial`` makes each token unique (``jti``) for cold-cache rows."""
    claims: dict[str, Any] = {
        "iss": BENCH_ISSUER,
        "sub": BENCH_SUBJECT,
        "aud": BENCH_AUDIENCE,
        "groups": [BENCH_GROUP],
        "scope": "read write",
        "iat": int(now),
        "exp": int(now) + TOKEN_LIFETIME_S,
    }
    if serial is not None:
        claims["jti"] = f"bench-{serial}"
    return claims


def mint_token(key: SigningKey, claims: Mapping[str, Any]) -> str:
    return jwt.encode(dict(claims), key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


def mint_tokens(key: SigningKey, count: int, *, now: float | None = None) -> list[str]:
    """``count`` distinct tokens (RS256 signing costs ~0.4 ms here: 20k tokens take ~8 s)."""
    issued_at = time.time() if now is None else now
    return [mint_token(key, bench_claims(issued_at, serial=i)) for i in range(count)]

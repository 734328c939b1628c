"""Test kit: generate signing keys at run time, sign and forge tokens, serve a JWKS on loopback.

Used by this package's tests and benchmarks; keys are generated fresh on every run, never stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = ["JwksServer", "SigningKey", "b64url", "compact", "jwks_document"]

_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES: Mapping[str, tuple[ec.EllipticCurve, str, int]] = {
    "ES256": (ec.SECP256R1(), "P-256", 32),
    "ES384": (ec.SECP384R1(), "P-384", 48),
    "ES512": (ec.SECP521R1(), "P-521", 66),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_segment(value: Mapping[str, Any] | str) -> str:
    raw = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return b64url(raw.encode())


def compact(header: Mapping[str, Any] | str, payload: Mapping[str, Any] | str, signature: bytes = b"") -> str:
    """A compact JWS from parts; strings are used verbatim as the JSON text (to forge odd JSON)."""
    return f"{_json_segment(header)}.{_json_segment(payload)}.{b64url(signature)}"


def _int_b64(n: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (n.bit_length() + 7) // 8)
    return b64url(n.to_bytes(length, "big"))


@dataclass
class SigningKey:
    """A private key plus its public JWK. ``alg`` is RS*/PS*/ES*/EdDSA/HS*."""

    alg: str
    kid: str | None
    private: Any
    extra_jwk: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(cls, alg: str = "RS256", kid: str | None = "k1", *, rsa_bits: int = 2048) -> SigningKey:
        if alg[:2] in ("RS", "PS"):
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        elif alg in _CURVES:
            private = ec.generate_private_key(_CURVES[alg][0])
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        elif alg[:2] == "HS":
            private = os.urandom(int(alg[2:]) // 8)
        else:
            raise ValueError(alg)
        return cls(alg, kid, private)

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any]
        if self.alg[:2] in ("RS", "PS"):
            nums = self.private.public_key().public_numbers()
            jwk = {"kty": "RSA", "n": _int_b64(nums.n), "e": _int_b64(nums.e)}
        elif self.alg in _CURVES:
            _, crv, size = _CURVES[self.alg]
            pn = self.private.public_key().public_numbers()
            jwk = {"kty": "EC", "crv": crv, "x": _int_b64(pn.x, size), "y": _int_b64(pn.y, size)}
        elif self.alg == "EdDSA":
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        else:
            jwk = {"kty": "oct", "k": b64url(self.private)}
        jwk["alg"] = self.alg
        if self.kid is not None:
            jwk["kid"] = self.kid
        jwk.update(self.extra_jwk)
        return jwk

    def raw_sign(self, data: bytes) -> bytes:
        alg = self.alg
        if alg[:2] == "RS":
            sig: bytes = self.private.sign(data, padding.PKCS1v15(), _HASHES[alg[2:]]())
            return sig
        if alg[:2] == "PS":
            h = _HASHES[alg[2:]]()
            return bytes(
                self.private.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
            )
        if alg in _CURVES:
            size = _CURVES[alg][2]
            der = self.private.sign(data, ec.ECDSA(_HASHES[alg[2:]]()))
            r, s = decode_dss_signature(der)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if alg == "EdDSA":
            return bytes(self.private.sign(data))
        return hmac.new(self.private, data, _HASHES[alg[2:]]().name).digest()

    def sign(self, claims: Mapping[str, Any], *, header: Mapping[str, Any] | None = None) -> str:
        h: dict[str, Any] = {"alg": self.alg, "typ": "JWT"}
        if self.kid is not None:
            h["kid"] = self.kid
        if header:
            h.update(header)
        signing_input = f"{_json_segment(h)}.{_json_segment(claims)}"
        return f"{signing_input}.{b64url(self.raw_sign(signing_input.encode()))}"


def jwks_document(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


@dataclass
class _Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class JwksServer:
    """A tiny HTTP/1.1 server on 127.0.0.1:0 whose answers the test controls.

    ``set_json(path, obj)`` serves JSON; ``down = True`` makes every request fail with 503;
    ``hits[path]`` counts requests. ``issuer`` is ``http://127.0.0.1:<port>``.
    """

    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}
        self.hits: dict[str, int] = {}
        self.down = False
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.issuer + path

    def set_json(
        self, path: str, obj: Any, *, status: int = 200, cache_control: str | None = None, delay: float = 0.0
    ) -> None:
        headers = {"content-type": "application/json"}
        if cache_control is not None:
            headers["cache-control"] = cache_control
        self.routes[path] = _Route(status, json.dumps(obj).encode(), headers, delay)

    def serve_discovery(self, jwks_path: str = "/jwks") -> None:
        self.set_json(
            "/.well-known/openid-configuration", {"issuer": self.issuer, "jwks_uri": self.url(jwks_path)}
        )

    async def start(self, port: int = 0) -> JwksServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100):  # bounded keep-alive
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line:
                    break
                parts = line.decode("latin-1").split()
                path = parts[1] if len(parts) > 1 else "/"
                length = 0
                for _ in range(100):
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                self.hits[path] = self.hits.get(path, 0) + 1
                route = self.routes.get(path)
                if self.down or route is None:
                    route = _Route(503 if self.down else 404, b"{}", {"content-type": "application/json"})
                if route.delay:
                    await asyncio.sleep(route.delay)
                head = [f"HTTP/1.1 {route.status} X", f"content-length: {len(route.body)}"]
                head += [f"{k}: {v}" for k, v in route.headers.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + route.body)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

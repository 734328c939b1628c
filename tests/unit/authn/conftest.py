"""Shared fixtures: keys are generated once per test session (RSA key generation is slow)."""

from __future__ import annotations

import pytest
from authn_kit import ISSUER

from authz.authn.jwk import KeySet, parse_jwks
from authz.authn.model import JwtRule
from authz.authn.settings import IssuerSettings
from authz.authn.testing import SigningKey, jwks_document


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey.generate("RS256", kid="rsa-1")


@pytest.fixture(scope="session")
def es_key() -> SigningKey:
    return SigningKey.generate("ES256", kid="ec-1")


@pytest.fixture(scope="session")
def ed_key() -> SigningKey:
    return SigningKey.generate("EdDSA", kid="ed-1")


@pytest.fixture(scope="session")
def keyset(rsa_key: SigningKey, es_key: SigningKey, ed_key: SigningKey) -> KeySet:
    return parse_jwks(jwks_document(rsa_key, es_key, ed_key), source="test").keys


@pytest.fixture
def rule() -> JwtRule:
    return JwtRule(issuer=ISSUER)


@pytest.fixture
def settings() -> IssuerSettings:
    return IssuerSettings(issuer=ISSUER)

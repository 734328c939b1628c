from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from authz.clock import FrozenClock
from authz.errors import AuthzError
from authz.idp.config import parse_config
from authz.idp.issuer import AuthorizeRequest, ClientAuth, Fault, Issuer, UserinfoError, cert_thumbprint
from authz.idp.rfc6749 import OAuthError

CONFIG = """\
apiVersion: meshauthz.dev/v1alpha1
kind: MockIdentityProvider
metadata: {name: t}
spec:
  issuers:
    - name: one
      keys: [{alg: ES256}]
      audience: [api]
      codeTtlSeconds: 60
      accessTokenTtlSeconds: 300
      refreshTokenTtlSeconds: 1000
      clients:
        - {clientId: svc, clientSecret: s1, claims: {tenant: t1}, scopes: [read, write]}
        - {clientId: other, clientSecret: s2}
        - {clientId: web, clientSecret: s3, redirectUris: [https://app/cb, http://127.0.0.1/cb]}
        - {clientId: spa, authMethod: none, redirectUris: [https://spa/cb]}
        - {clientId: opaque, clientSecret: s4, accessTokenFormat: opaque}
        - {clientId: mtls, authMethod: tls_client_auth, tlsThumbprints: [tp-good]}
        - {clientId: cc-only, clientSecret: s5, grantTypes: [client_credentials]}
      users:
        - {username: alice, password: pw, sub: u-1, claims: {groups: [admins], email: a@x}}
"""
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = create_s256_code_challenge(VERIFIER)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(1_700_000_000.0)


@pytest.fixture
def issuer(clock: FrozenClock) -> Issuer:
    return Issuer(parse_config(CONFIG).issuers[0], clock=clock, base_url="http://idp.test")


def basic(client_id: str, secret: str) -> ClientAuth:
    return ClientAuth(authorization="Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode())


def decode(issuer: Issuer, token: str, **kw: Any) -> dict[str, Any]:
    key = issuer.keys.get(jwt.get_unverified_header(token)["kid"])
    out: dict[str, Any] = jwt.decode(
        token,
        key.private_key.public_key(),
        algorithms=[key.alg],
        options={"verify_exp": False, "verify_aud": False},
        **kw,
    )
    return out


def oauth_error(fn: Any, *args: Any, **kw: Any) -> OAuthError:
    with pytest.raises(OAuthError) as info:
        fn(*args, **kw)
    return info.value


def code_for(issuer: Issuer, client: str = "web", redirect: str = "https://app/cb", **params: str) -> str:
    query = {"response_type": "code", "client_id": client, "redirect_uri": redirect, "state": "st", **params}
    location = issuer.authorize(AuthorizeRequest(query)).location
    q = parse_qs(urlsplit(location).query)
    assert "error" not in q, q
    assert q["state"] == ["st"] and q["iss"] == [issuer.issuer_url]
    return q["code"][0]


def test_client_credentials_token_has_rfc9068_claims(issuer: Issuer, clock: FrozenClock) -> None:
    body = issuer.token({"grant_type": "client_credentials", "scope": "read"}, basic("svc", "s1"))
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300 and body["scope"] == "read"
    assert "refresh_token" not in body and "id_token" not in body
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = decode(issuer, token)
    assert claims["iss"] == "http://idp.test/issuers/one"
    assert (claims["sub"], claims["aud"], claims["client_id"], claims["scope"]) == (
        "svc",
        "api",
        "svc",
        "read",
    )
    assert (claims["iat"], claims["exp"]) == (int(clock.now), int(clock.now) + 300)
    assert claims["tenant"] == "t1" and len(claims["jti"]) == 32


def test_client_secret_post_and_custom_claims_cannot_override_registered(issuer: Issuer) -> None:
    issuer.set_client_claims("svc", {"iss": "evil", "sub": "root", "role": "x"})
    body = issuer.token(
        {"grant_type": "client_credentials", "client_id": "svc", "client_secret": "s1"}, ClientAuth()
    )
    claims = decode(issuer, body["access_token"])
    assert (claims["iss"], claims["sub"], claims["role"]) == (issuer.issuer_url, "svc", "x")


@pytest.mark.parametrize(
    ("form", "auth", "error", "status"),
    [
        ({"grant_type": "client_credentials"}, basic("svc", "wrong"), "invalid_client", 401),
        ({"grant_type": "client_credentials"}, basic("nobody", "s1"), "invalid_client", 401),
        ({"grant_type": "client_credentials"}, ClientAuth(), "invalid_client", 401),
        ({"grant_type": "client_credentials", "client_id": "svc"}, ClientAuth(), "invalid_client", 401),
        (
            {"grant_type": "client_credentials", "client_secret": "s1"},
            basic("svc", "s1"),
            "invalid_request",
            400,
        ),
        (
            {"grant_type": "client_credentials", "client_id": "other"},
            basic("svc", "s1"),
            "invalid_request",
            400,
        ),
        ({}, basic("svc", "s1"), "invalid_request", 400),
        ({"grant_type": "implicit"}, basic("svc", "s1"), "unsupported_grant_type", 400),
        (
            {"grant_type": "password", "username": "alice", "password": "pw"},
            basic("cc-only", "s5"),
            "unauthorized_client",
            400,
        ),
        ({"grant_type": "client_credentials", "scope": "admin"}, basic("svc", "s1"), "invalid_scope", 400),
        (
            {"grant_type": "client_credentials", "resource": "elsewhere"},
            basic("other", "s2"),
            "invalid_target",
            400,
        ),
        ({"grant_type": "client_credentials", "client_id": "mtls"}, ClientAuth(), "invalid_client", 401),
        (
            {"grant_type": "client_credentials", "client_id": "mtls"},
            ClientAuth(cert_thumbprint="tp-bad"),
            "invalid_client",
            401,
        ),
        (
            {"grant_type": "password", "username": "alice", "password": "no"},
            basic("svc", "s1"),
            "invalid_grant",
            400,
        ),
        ({"grant_type": "password", "username": "alice"}, basic("svc", "s1"), "invalid_request", 400),
    ],
)
def test_token_errors(
    issuer: Issuer, form: dict[str, str], auth: ClientAuth, error: str, status: int
) -> None:
    err = oauth_error(issuer.token, form, auth)
    assert (err.error, err.status) == (error, status)
    if error == "invalid_client" and auth.authorization:
        assert err.www_authenticate.startswith("Basic ")


def test_resource_narrows_audience(issuer: Issuer) -> None:
    issuer.set_client(
        issuer.clients["svc"].__class__(client_id="multi", client_secret="m", audience=("a1", "a2"))
    )
    token = issuer.token({"grant_type": "client_credentials"}, basic("multi", "m"))["access_token"]
    assert decode(issuer, token)["aud"] == ["a1", "a2"]
    token = issuer.token({"grant_type": "client_credentials", "resource": "a2"}, basic("multi", "m"))[
        "access_token"
    ]
    assert decode(issuer, token)["aud"] == "a2"


def test_certificate_bound_tokens_carry_cnf(issuer: Issuer) -> None:
    body = issuer.token(
        {"grant_type": "client_credentials", "client_id": "mtls"}, ClientAuth(cert_thumbprint="tp-good")
    )
    assert decode(issuer, body["access_token"])["cnf"] == {"x5t#S256": "tp-good"}
    body = issuer.token(
        {"grant_type": "client_credentials"}, ClientAuth(basic("svc", "s1").authorization, "tp-x")
    )
    assert decode(issuer, body["access_token"])["cnf"] == {"x5t#S256": "tp-x"}


def test_cert_thumbprint_is_base64url_sha256() -> None:
    assert cert_thumbprint(b"abc") == "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"


def test_code_flow_with_pkce_issues_id_token(issuer: Issuer, clock: FrozenClock) -> None:
    code = code_for(
        issuer,
        "spa",
        "https://spa/cb",
        code_challenge=CHALLENGE,
        code_challenge_method="S256",
        scope="openid read",
        nonce="n-1",
    )
    clock.advance(5)
    body = issuer.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "https://spa/cb",
            "code_verifier": VERIFIER,
            "client_id": "spa",
        },
        ClientAuth(),
    )
    at = decode(issuer, body["access_token"])
    assert (at["sub"], at["client_id"], at["scope"], at["groups"]) == (
        "u-1",
        "spa",
        "openid read",
        ["admins"],
    )
    assert at["auth_time"] == int(clock.now) - 5
    idt = decode(issuer, body["id_token"])
    assert (idt["aud"], idt["azp"], idt["nonce"], idt["sub"], idt["email"]) == (
        "spa",
        "spa",
        "n-1",
        "u-1",
        "a@x",
    )
    assert jwt.get_unverified_header(body["id_token"])["typ"] == "JWT"
    assert "refresh_token" in body


def test_code_errors(issuer: Issuer, clock: FrozenClock) -> None:
    code = code_for(issuer, code_challenge=CHALLENGE, code_challenge_method="S256")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://app/cb"}
    auth = basic("web", "s3")
    assert oauth_error(issuer.token, form, auth).description == "code_verifier is required"
    wrong = "x" * 43
    assert oauth_error(issuer.token, {**form, "code_verifier": wrong}, auth).error == "invalid_grant"
    assert (
        oauth_error(
            issuer.token, {**form, "code_verifier": VERIFIER, "redirect_uri": "https://app/x"}, auth
        ).error
        == "invalid_grant"
    )
    assert (
        oauth_error(issuer.token, {**form, "code_verifier": VERIFIER}, basic("other", "s2")).error
        == "invalid_grant"
    )
    assert oauth_error(issuer.token, {**form, "code": "nope"}, auth).error == "invalid_grant"
    assert oauth_error(issuer.token, {**form, "code": ""}, auth).error == "invalid_request"
    # expired
    clock.advance(60)
    assert "expired" in oauth_error(issuer.token, {**form, "code_verifier": VERIFIER}, auth).description


def test_code_reuse_is_refused_and_revokes_what_it_issued(issuer: Issuer) -> None:
    code = code_for(issuer)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://app/cb"}
    body = issuer.token(form, basic("web", "s3"))
    assert issuer.introspect({"token": body["access_token"]}, basic("svc", "s1"))["active"] is True
    assert "already used" in oauth_error(issuer.token, form, basic("web", "s3")).description
    assert issuer.introspect({"token": body["access_token"]}, basic("svc", "s1")) == {"active": False}
    assert (
        oauth_error(
            issuer.token,
            {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
            basic("web", "s3"),
        ).error
        == "invalid_grant"
    )


def test_verifier_without_challenge_is_a_downgrade(issuer: Issuer) -> None:
    code = code_for(issuer)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": VERIFIER,
        "redirect_uri": "https://app/cb",
    }
    assert oauth_error(issuer.token, form, basic("web", "s3")).error == "invalid_grant"


def test_authorize_errors_redirect_once_the_redirect_uri_is_trusted(issuer: Issuer) -> None:
    def error_of(**params: str) -> str:
        q = {"response_type": "code", "client_id": "web", "redirect_uri": "https://app/cb", **params}
        location = issuer.authorize(AuthorizeRequest(q)).location
        assert location.startswith("https://app/cb?")
        return parse_qs(urlsplit(location).query)["error"][0]

    assert error_of(response_type="token") == "unsupported_response_type"
    assert error_of(code_challenge=CHALLENGE, code_challenge_method="plain") == "invalid_request"
    assert error_of(login_hint="mallory") == "access_denied"
    q = {"response_type": "code", "client_id": "spa", "redirect_uri": "https://spa/cb"}
    assert (
        "code_challenge"
        in parse_qs(urlsplit(issuer.authorize(AuthorizeRequest(q)).location).query)["error_description"][0]
    )
    # not redirected: unknown client, unregistered redirect_uri
    for params in (
        {"client_id": "ghost"},
        {"client_id": "web", "redirect_uri": "https://evil/cb"},
        {"client_id": "web"},
    ):
        assert oauth_error(issuer.authorize, AuthorizeRequest(params)).error == "invalid_request"


def test_loopback_redirect_may_use_any_port(issuer: Issuer) -> None:
    code_for(issuer, redirect="http://127.0.0.1:54321/cb")
    err = oauth_error(
        issuer.authorize, AuthorizeRequest({"client_id": "web", "redirect_uri": "http://127.0.0.1:1/other"})
    )
    assert err.error == "invalid_request"


def test_refresh_rotates_and_narrows_scope(issuer: Issuer) -> None:
    body = issuer.token(
        {"grant_type": "password", "username": "alice", "password": "pw", "scope": "read write"},
        basic("svc", "s1"),
    )
    rt = body["refresh_token"]
    new = issuer.token(
        {"grant_type": "refresh_token", "refresh_token": rt, "scope": "read"}, basic("svc", "s1")
    )
    assert decode(issuer, new["access_token"])["scope"] == "read"
    assert new["refresh_token"] != rt
    assert (
        oauth_error(
            issuer.token, {"grant_type": "refresh_token", "refresh_token": rt}, basic("svc", "s1")
        ).error
        == "invalid_grant"
    )
    err = oauth_error(
        issuer.token,
        {"grant_type": "refresh_token", "refresh_token": new["refresh_token"], "scope": "admin"},
        basic("svc", "s1"),
    )
    assert err.error == "invalid_scope"
    err = oauth_error(
        issuer.token,
        {"grant_type": "refresh_token", "refresh_token": new["refresh_token"]},
        basic("other", "s2"),
    )
    assert err.error == "invalid_grant"


def test_refresh_token_expires(issuer: Issuer, clock: FrozenClock) -> None:
    rt = issuer.token({"grant_type": "password", "username": "alice", "password": "pw"}, basic("svc", "s1"))[
        "refresh_token"
    ]
    clock.advance(1000)
    assert (
        "expired"
        in oauth_error(
            issuer.token, {"grant_type": "refresh_token", "refresh_token": rt}, basic("svc", "s1")
        ).description
    )


def test_introspection(issuer: Issuer, clock: FrozenClock) -> None:
    body = issuer.token({"grant_type": "password", "username": "alice", "password": "pw"}, basic("svc", "s1"))
    info = issuer.introspect({"token": body["access_token"]}, basic("other", "s2"))
    assert (
        info["active"] is True
        and info["sub"] == "u-1"
        and info["client_id"] == "svc"
        and info["token_type"] == "Bearer"
    )
    rinfo = issuer.introspect({"token": body["refresh_token"]}, basic("other", "s2"))
    assert (rinfo["active"], rinfo["token_type"], rinfo["username"]) == (True, "refresh_token", "alice")
    assert issuer.introspect({"token": "garbage"}, basic("svc", "s1")) == {"active": False}
    assert issuer.introspect({"token": issuer.mint(claims={"iss": "elsewhere"})}, basic("svc", "s1")) == {
        "active": False
    }
    assert oauth_error(issuer.introspect, {"token": "x"}, ClientAuth()).error == "invalid_client"
    assert (
        oauth_error(issuer.introspect, {"token": "x", "client_id": "spa"}, ClientAuth()).error
        == "invalid_client"
    )
    assert oauth_error(issuer.introspect, {}, basic("svc", "s1")).error == "invalid_request"
    clock.advance(300)
    assert issuer.introspect({"token": body["access_token"]}, basic("svc", "s1")) == {"active": False}


def test_opaque_tokens_are_only_readable_by_introspection(issuer: Issuer, clock: FrozenClock) -> None:
    token = issuer.token({"grant_type": "client_credentials"}, basic("opaque", "s4"))["access_token"]
    with pytest.raises(jwt.DecodeError):
        jwt.get_unverified_header(token)
    info = issuer.introspect({"token": token}, basic("svc", "s1"))
    assert info["active"] and info["sub"] == "opaque" and info["iss"] == issuer.issuer_url
    clock.advance(301)
    assert issuer.introspect({"token": token}, basic("svc", "s1")) == {"active": False}


def test_revocation(issuer: Issuer) -> None:
    body = issuer.token({"grant_type": "password", "username": "alice", "password": "pw"}, basic("svc", "s1"))
    assert (
        oauth_error(issuer.revoke, {"token": body["access_token"]}, basic("other", "s2")).error
        == "unauthorized_client"
    )
    issuer.revoke({"token": body["access_token"]}, basic("svc", "s1"))
    assert issuer.introspect({"token": body["access_token"]}, basic("svc", "s1")) == {"active": False}
    # revoking the refresh token also revokes the access tokens of its grant
    new = issuer.token(
        {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}, basic("svc", "s1")
    )
    issuer.revoke({"token": new["refresh_token"], "token_type_hint": "refresh_token"}, basic("svc", "s1"))
    assert issuer.introspect({"token": new["access_token"]}, basic("svc", "s1")) == {"active": False}
    issuer.revoke({"token": "unknown"}, basic("svc", "s1"))  # RFC 7009: not an error
    assert oauth_error(issuer.revoke, {}, basic("svc", "s1")).error == "invalid_request"


def test_userinfo(issuer: Issuer) -> None:
    token = issuer.token(
        {"grant_type": "password", "username": "alice", "password": "pw"}, basic("svc", "s1")
    )["access_token"]
    assert issuer.userinfo(f"Bearer {token}") == {"sub": "u-1", "groups": ["admins"], "email": "a@x"}
    issuer.set_user("alice", claims={"groups": ["changed"]})
    assert issuer.userinfo(f"Bearer {token}")["groups"] == ["changed"]
    for header, error in (("", ""), ("Basic abc", ""), ("Bearer nope", "invalid_token")):
        with pytest.raises(UserinfoError) as info:
            issuer.userinfo(header)
        assert info.value.error == error and info.value.status == 401
        assert info.value.www_authenticate.startswith("Bearer")


def test_mint_defaults_and_overrides(issuer: Issuer, clock: FrozenClock) -> None:
    claims = decode(issuer, issuer.mint(sub="alice", claims={"groups": ["g"]}))
    assert claims["iss"] == issuer.issuer_url and claims["sub"] == "alice" and claims["aud"] == "api"
    assert claims["exp"] == int(clock.now) + 300 and claims["groups"] == ["g"]
    claims = decode(issuer, issuer.mint(aud=["a", "b"], exp=5, omit=("jti", "iat"), claims={"iss": "other"}))
    assert claims == {"iss": "other", "sub": "test-subject", "aud": ["a", "b"], "exp": 5}
    other = issuer.keys.publish("RS256", clock.now)
    token = issuer.mint(kid=other.kid, typ="JWT", headers={"x": 1})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": other.kid, "typ": "JWT", "x": 1}
    with pytest.raises(AuthzError) as info:
        issuer.mint(alg="EdDSA")
    assert info.value.reason == "no_signing_key"


def test_clock_offset_moves_everything(issuer: Issuer, clock: FrozenClock) -> None:
    issuer.clock_offset = 3600
    assert decode(issuer, issuer.mint())["iat"] == int(clock.now) + 3600


def test_metadata_points_at_this_issuer(issuer: Issuer) -> None:
    meta = issuer.metadata()
    assert meta["issuer"] == "http://idp.test/issuers/one"
    assert meta["jwks_uri"] == "http://idp.test/issuers/one/jwks"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["id_token_signing_alg_values_supported"] == ["ES256"]


def test_faults_count_and_expire(issuer: Issuer) -> None:
    issuer.set_fault("jwks", Fault(status=503, remaining=2))
    assert [issuer.take_fault("jwks") is not None for _ in range(3)] == [True, True, False]
    assert issuer.request_counts["jwks"] == 3
    with pytest.raises(AuthzError):
        issuer.set_fault("nope", Fault(status=500))
    with pytest.raises(AuthzError):
        issuer.set_fault("jwks", Fault(status=200))
    with pytest.raises(AuthzError):
        issuer.set_fault("jwks", Fault(delay=1e6))


def test_users_can_be_added_and_removed(issuer: Issuer) -> None:
    issuer.set_user("bob", password="b", claims={"groups": ["g"]})
    body = issuer.token({"grant_type": "password", "username": "bob", "password": "b"}, basic("svc", "s1"))
    assert decode(issuer, body["access_token"])["sub"] == "bob"
    assert issuer.delete_user("bob") and not issuer.delete_user("bob")
    with pytest.raises(AuthzError):
        issuer.set_client_claims("ghost", {})

"""The mock IdP over real sockets, driven by authlib's OAuth 2.0 client; tokens checked with pyjwt + JWKS."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from authlib.common.security import generate_token
from authlib.deprecate import AuthlibDeprecationWarning
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.idp import RunningIdp, parse_config, running_idp

with warnings.catch_warnings():
    # authlib 1.9 warns that its httpx integration will move to "httpx2"; the API we use is unchanged.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.base_client.errors import OAuthError as ClientOAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

pytestmark = pytest.mark.integration

CONFIG = """\
apiVersion: meshauthz.dev/v1alpha1
kind: MockIdentityProvider
metadata: {name: it}
spec:
  issuers:
    - name: main
      keys: [{alg: RS256}, {alg: ES256}]
      audience: [api]
      jwksMaxAgeSeconds: 42
      trustedClientCertHeader: x-client-cert
      clients:
        - {clientId: svc, clientSecret: svc-secret, claims: {tenant: t1}}
        - {clientId: poster, clientSecret: poster-secret, authMethod: client_secret_post}
        - {clientId: spa, authMethod: none, redirectUris: [http://127.0.0.1/cb]}
        - {clientId: opaque, clientSecret: o-secret, accessTokenFormat: opaque}
      users:
        - {username: alice, password: alice-pw, claims: {groups: [admins], email: alice@example.com}}
        - {username: bob, password: bob-pw, claims: {groups: [users]}}
    - name: second
      keys: [{alg: EdDSA}]
      login: form
      clients:
        - {clientId: web, clientSecret: web-secret, redirectUris: [http://127.0.0.1/cb]}
      users:
        - {username: carol}
        - {username: dave}
"""


@pytest.fixture
def idp() -> Iterator[RunningIdp]:
    with running_idp(parse_config(CONFIG)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def verify(idp: RunningIdp, token: str, issuer: str = "main", audience: str | None = "api") -> dict[str, Any]:
    """What a resource server does: fetch the JWKS over HTTP, pick the kid, verify."""
    jwks = jwt.PyJWKClient(idp.endpoint("jwks", issuer), cache_keys=False, cache_jwk_set=False)
    key = jwks.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256", "ES256", "EdDSA"],
        audience=audience,
        issuer=idp.issuer_url(issuer),
        options={"verify_aud": audience is not None},
    )
    return claims


async def test_discovery_and_jwks(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    oidc = (await http.get(idp.endpoint(".well-known/openid-configuration"))).json()
    assert oidc["issuer"] == f"{idp.url}/issuers/main"
    for name in (
        "token_endpoint",
        "jwks_uri",
        "authorization_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
    ):
        assert oidc[name].startswith(oidc["issuer"] + "/")
    rfc8414 = (await http.get(idp.endpoint(".well-known/oauth-authorization-server"))).json()
    path_form = (await http.get(f"{idp.url}/.well-known/oauth-authorization-server/issuers/main")).json()
    assert rfc8414 == path_form == oidc
    resp = await http.get(oidc["jwks_uri"])
    assert resp.headers["cache-control"] == "public, max-age=42"
    assert sorted(k["alg"] for k in resp.json()["keys"]) == ["ES256", "RS256"]
    assert (await http.get(f"{idp.url}/issuers/nope/jwks")).status_code == 404
    assert (await http.get(f"{idp.url}/")).json()["issuers"]["second"] == f"{idp.url}/issuers/second"


async def test_client_credentials_basic_and_post(idp: RunningIdp) -> None:
    async with AsyncOAuth2Client(
        "svc", "svc-secret", token_endpoint_auth_method="client_secret_basic"
    ) as client:
        token = await client.fetch_token(idp.endpoint("token"), grant_type="client_credentials")
    header = jwt.get_unverified_header(token["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256"
    claims = await asyncio.to_thread(verify, idp, token["access_token"])
    assert (claims["sub"], claims["client_id"], claims["tenant"]) == ("svc", "svc", "t1")
    async with AsyncOAuth2Client(
        "poster", "poster-secret", token_endpoint_auth_method="client_secret_post"
    ) as client:
        token = await client.fetch_token(
            idp.endpoint("token"), grant_type="client_credentials", resource="api"
        )
    assert (await asyncio.to_thread(verify, idp, token["access_token"]))["sub"] == "poster"


async def test_authorization_code_with_pkce_then_refresh_and_userinfo(
    idp: RunningIdp, http: httpx.AsyncClient
) -> None:
    verifier = generate_token(64)
    redirect = "http://127.0.0.1:8765/cb"  # RFC 8252 section 7.3: any port on a loopback redirect
    async with AsyncOAuth2Client(
        "spa",
        redirect_uri=redirect,
        scope="openid profile",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
    ) as client:
        url, state = client.create_authorization_url(
            idp.endpoint("authorize"), code_verifier=verifier, nonce="n-42"
        )
        resp = await http.get(url + "&login_hint=bob")
        assert resp.status_code == 302
        location = resp.headers["location"]
        assert location.startswith(redirect + "?") and f"state={state}" in location
        token = await client.fetch_token(
            idp.endpoint("token"), authorization_response=location, code_verifier=verifier
        )
        access = await asyncio.to_thread(verify, idp, token["access_token"])
        assert (access["sub"], access["groups"], access["scope"]) == ("bob", ["users"], "openid profile")
        id_token = await asyncio.to_thread(verify, idp, token["id_token"], "main", "spa")
        assert (id_token["nonce"], id_token["sub"], id_token["azp"]) == ("n-42", "bob", "spa")

        info = await http.get(
            idp.endpoint("userinfo"), headers={"Authorization": f"Bearer {token['access_token']}"}
        )
        assert info.json() == {"sub": "bob", "groups": ["users"]}

        refreshed = await client.refresh_token(idp.endpoint("token"), refresh_token=token["refresh_token"])
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert (await asyncio.to_thread(verify, idp, refreshed["access_token"]))["sub"] == "bob"
        with pytest.raises(ClientOAuthError) as info_err:  # the rotated-out refresh token is dead
            await client.refresh_token(idp.endpoint("token"), refresh_token=token["refresh_token"])
        assert info_err.value.error == "invalid_grant"


async def test_password_grant_introspection_and_revocation(idp: RunningIdp) -> None:
    async with AsyncOAuth2Client("svc", "svc-secret") as client:
        token = await client.fetch_token(idp.endpoint("token"), username="alice", password="alice-pw")
        assert (await asyncio.to_thread(verify, idp, token["access_token"]))["email"] == "alice@example.com"
        resp = await client.introspect_token(idp.endpoint("introspect"), token=token["access_token"])
        body = resp.json()
        assert body["active"] is True and body["sub"] == "alice" and body["client_id"] == "svc"
        resp = await client.revoke_token(idp.endpoint("revoke"), token=token["access_token"])
        assert resp.status_code == 200
        resp = await client.introspect_token(idp.endpoint("introspect"), token=token["access_token"])
        assert resp.json() == {"active": False}
        resp = await client.revoke_token(
            idp.endpoint("revoke"), token=token["refresh_token"], token_type_hint="refresh_token"
        )
        assert resp.status_code == 200
        with pytest.raises(ClientOAuthError):
            await client.refresh_token(idp.endpoint("token"), refresh_token=token["refresh_token"])


async def test_opaque_tokens_are_read_by_introspection(idp: RunningIdp) -> None:
    async with AsyncOAuth2Client("opaque", "o-secret") as client:
        token = await client.fetch_token(idp.endpoint("token"), grant_type="client_credentials")
        assert token["access_token"].count(".") == 0
        body = (await client.introspect_token(idp.endpoint("introspect"), token=token["access_token"])).json()
        assert body["active"] is True and body["sub"] == "opaque" and body["aud"] == "api"


async def _token_error(
    http: httpx.AsyncClient, url: str, **kw: Any
) -> tuple[int, dict[str, Any], httpx.Headers]:
    resp = await http.post(url, **kw)
    return resp.status_code, resp.json(), resp.headers


async def test_error_responses(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    url = idp.endpoint("token")
    status, body, headers = await _token_error(
        http, url, data={"grant_type": "client_credentials"}, auth=("svc", "bad")
    )
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["www-authenticate"].startswith("Basic realm=")
    assert headers["cache-control"] == "no-store"
    status, body, _ = await _token_error(http, url, data={"grant_type": "magic"}, auth=("svc", "svc-secret"))
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body, _ = await _token_error(
        http, url, json={"grant_type": "client_credentials"}, auth=("svc", "svc-secret")
    )
    assert (status, body["error"]) == (400, "invalid_request")
    bad_form = {
        "content": b"grant_type=password&grant_type=x",
        "headers": {"content-type": "application/x-www-form-urlencoded"},
    }
    status, body, _ = await _token_error(http, url, auth=("svc", "svc-secret"), **bad_form)
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = await _token_error(
        http,
        url,
        data={"grant_type": "password", "username": "alice", "password": "x"},
        auth=("svc", "svc-secret"),
    )
    assert (status, body["error"]) == (400, "invalid_grant")


async def _code(idp: RunningIdp, http: httpx.AsyncClient, challenge: str) -> str:
    query = {
        "response_type": "code",
        "client_id": "spa",
        "redirect_uri": "http://127.0.0.1/cb",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    resp = await http.get(idp.endpoint("authorize"), params=query)
    return urllib.parse.parse_qs(urllib.parse.urlsplit(resp.headers["location"]).query)["code"][0]


async def test_code_errors_wrong_verifier_reuse_and_expiry(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    verifier = generate_token(48)
    challenge = create_s256_code_challenge(verifier)
    url = idp.endpoint("token")
    form = {"grant_type": "authorization_code", "client_id": "spa", "redirect_uri": "http://127.0.0.1/cb"}
    code = await _code(idp, http, challenge)
    status, body, _ = await _token_error(
        http, url, data={**form, "code": code, "code_verifier": generate_token(48)}
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await http.post(url, data={**form, "code": code, "code_verifier": verifier})).status_code == 200
    status, body, _ = await _token_error(http, url, data={**form, "code": code, "code_verifier": verifier})
    assert (status, body["error"], body["error_description"]) == (
        400,
        "invalid_grant",
        "authorization code was already used",
    )
    code = await _code(idp, http, challenge)
    assert (await http.post(idp.endpoint("admin/clock/advance"), json={"seconds": 61})).json()[
        "offset_seconds"
    ] == 61
    status, body, _ = await _token_error(http, url, data={**form, "code": code, "code_verifier": verifier})
    assert (status, body["error_description"]) == (400, "authorization code has expired")
    # authorize errors that must not redirect
    resp = await http.get(
        idp.endpoint("authorize"), params={"client_id": "spa", "redirect_uri": "https://evil/cb"}
    )
    assert resp.status_code == 400 and "location" not in resp.headers


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=200),
    ctype=st.sampled_from(["application/x-www-form-urlencoded", "text/plain", ""]),
)
def test_arbitrary_bodies_never_cause_a_500(idp: RunningIdp, body: bytes, ctype: str) -> None:
    for endpoint in ("token", "introspect", "revoke", "authorize"):
        resp = httpx.post(
            idp.endpoint(endpoint), content=body, headers={"content-type": ctype}, auth=("svc", "svc-secret")
        )
        assert resp.status_code < 500, (endpoint, resp.text)
        assert resp.status_code in (200, 303, 400, 401)


async def test_rotation_phases_are_visible_in_the_jwks(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    def kids(jwks: dict[str, Any]) -> set[str]:
        return {k["kid"] for k in jwks["keys"] if k["alg"] == "RS256"}

    def mint_kid() -> str:
        return str(jwt.get_unverified_header(idp.issuer().mint())["kid"])

    old = mint_kid()
    new = (await http.post(idp.endpoint("admin/keys/publish"), json={"alg": "RS256"})).json()["kid"]
    assert kids((await http.get(idp.endpoint("jwks"))).json()) == {old, new}
    assert mint_kid() == old
    await http.post(idp.endpoint("admin/keys/activate"), json={"kid": new})
    assert mint_kid() == new
    assert kids((await http.get(idp.endpoint("jwks"))).json()) == {old, new}
    assert (await http.post(idp.endpoint("admin/keys/retire"), json={})).json()["retired"] == [old]
    assert kids((await http.get(idp.endpoint("jwks"))).json()) == {new}

    # all three phases in one call, driven by the admin clock
    newer = (
        await http.post(
            idp.endpoint("admin/keys/rotate"), json={"overlap_seconds": 30, "retire_after_seconds": 60}
        )
    ).json()["kid"]
    assert kids((await http.get(idp.endpoint("jwks"))).json()) == {new, newer} and mint_kid() == new
    await http.post(idp.endpoint("admin/clock/advance"), json={"seconds": 30})
    assert mint_kid() == newer
    await http.post(idp.endpoint("admin/clock/advance"), json={"seconds": 60})
    assert kids((await http.get(idp.endpoint("jwks"))).json()) == {newer}
    states = {k["kid"]: k["state"] for k in (await http.get(idp.endpoint("admin/keys"))).json()["keys"]}
    assert (states[old], states[new], states[newer]) == ("retired", "retired", "active")


async def test_faults_delays_and_request_counters(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    await http.delete(idp.endpoint("admin/requests"))
    resp = await http.put(idp.endpoint("admin/faults/jwks"), json={"status": 503, "count": 2})
    assert resp.status_code == 200
    statuses = [(await http.get(idp.endpoint("jwks"))).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    await http.put(idp.endpoint("admin/faults/openid_configuration"), json={"delay_seconds": 0.3})
    started = time.monotonic()
    assert (await http.get(idp.endpoint(".well-known/openid-configuration"))).status_code == 200
    assert time.monotonic() - started >= 0.3
    await http.delete(idp.endpoint("admin/faults"))
    counts = (await http.get(idp.endpoint("admin/requests"))).json()["requests"]
    assert counts == {"jwks": 3, "openid_configuration": 1}
    assert (await http.put(idp.endpoint("admin/faults/nope"), json={"status": 500})).status_code == 400
    assert (await http.put(idp.endpoint("admin/faults/jwks"), json={"status": "x"})).status_code == 400
    assert (await http.put(idp.endpoint("admin/faults/jwks"), content=b"[1]")).status_code == 400


async def test_issuers_are_separate(idp: RunningIdp) -> None:
    token = idp.issuer("second").mint(aud="x")
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert (await asyncio.to_thread(verify, idp, token, "second", "x"))["iss"] == f"{idp.url}/issuers/second"
    with pytest.raises(jwt.PyJWKClientError):
        await asyncio.to_thread(verify, idp, token, "main", "x")


async def test_login_form_chooses_a_user(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    query = {
        "response_type": "code",
        "client_id": "web",
        "redirect_uri": "http://127.0.0.1/cb",
        "state": "s<1>",
    }
    page = await http.get(idp.endpoint("authorize", "second"), params=query)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<option value="dave">' in page.text and "s&lt;1&gt;" in page.text
    resp = await http.post(idp.endpoint("authorize", "second"), data={**query, "username": "dave"})
    assert resp.status_code == 303
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(resp.headers["location"]).query)["code"][0]
    token = await http.post(
        idp.endpoint("token", "second"),
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": "http://127.0.0.1/cb"},
        auth=("web", "web-secret"),
    )
    assert jwt.decode(token.json()["access_token"], options={"verify_signature": False})["sub"] == "dave"


async def test_trusted_header_certificate_binds_tokens(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    from tests.integration.test_idp_tls import make_pki

    pki = make_pki()
    resp = await http.post(
        idp.endpoint("token"),
        data={"grant_type": "client_credentials"},
        auth=("svc", "svc-secret"),
        headers={"x-client-cert": urllib.parse.quote(pki.client_cert_pem)},
    )
    claims = await asyncio.to_thread(verify, idp, resp.json()["access_token"])
    assert claims["cnf"] == {"x5t#S256": pki.client_thumbprint}


async def test_admin_changes_users_and_client_claims_at_run_time(
    idp: RunningIdp, http: httpx.AsyncClient
) -> None:
    resp = await http.put(
        idp.endpoint("admin/users/erin"), json={"password": "erin-pw", "claims": {"groups": ["ops"]}}
    )
    assert resp.json() == {"username": "erin", "sub": "erin", "claims": {"groups": ["ops"]}}
    await http.put(idp.endpoint("admin/clients/svc/claims"), json={"claims": {"tier": "gold"}})
    async with AsyncOAuth2Client("svc", "svc-secret") as client:
        token = await client.fetch_token(idp.endpoint("token"), username="erin", password="erin-pw")
        claims = await asyncio.to_thread(verify, idp, token["access_token"])
        assert (claims["groups"], claims["tier"]) == (["ops"], "gold")
    assert (await http.delete(idp.endpoint("admin/users/erin"))).status_code == 204
    assert (await http.delete(idp.endpoint("admin/users/erin"))).status_code == 404
    assert (
        await http.put(idp.endpoint("admin/clients/ghost/claims"), json={"claims": {}})
    ).status_code == 404


async def test_admin_mint_and_clock(idp: RunningIdp, http: httpx.AsyncClient) -> None:
    await http.put(idp.endpoint("admin/clock"), json={"offset_seconds": -7200})
    token = (
        await http.post(idp.endpoint("admin/mint"), json={"sub": "x", "ttl_seconds": 60, "alg": "ES256"})
    ).json()["token"]
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    with pytest.raises(jwt.ExpiredSignatureError):  # minted two hours in the past
        await asyncio.to_thread(verify, idp, token)
    assert (await http.get(idp.endpoint("admin/clock"))).json()["offset_seconds"] == -7200

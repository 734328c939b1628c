"""One issuer of the mock OpenID Provider: its keys, clients, users, grants and tokens.

No sockets here: the HTTP app (:mod:`authz.idp.app`) parses requests into plain values and calls these
methods; tests and scripts call :meth:`Issuer.mint` directly. Time comes from the injected clock plus
the issuer's (admin-settable) offset, so expiry, codes and key rotation phases all follow it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt

from authz.clock import Clock, system_clock
from authz.errors import AuthzError
from authz.idp import rfc7636
from authz.idp.config import ClientConfig, IssuerConfig, UserConfig
from authz.idp.keys import KeyRing, SigningKey, generate_key, sign
from authz.idp.rfc6749 import OAuthError, invalid_client, parse_basic_authorization

__all__ = [
    "ENDPOINTS",
    "MAX_FAULT_DELAY",
    "AuthorizeRedirect",
    "AuthorizeRequest",
    "ClientAuth",
    "Fault",
    "Issuer",
    "UserinfoError",
    "cert_thumbprint",
]

# Endpoint names used by fault injection and request counters.
ENDPOINTS = (
    "openid_configuration",
    "oauth_authorization_server",
    "jwks",
    "token",
    "authorize",
    "userinfo",
    "introspect",
    "revoke",
)
MAX_FAULT_DELAY = 60.0  # seconds; a slower "slow IdP" only makes tests time out, never teaches anything
ACCESS_TOKEN_TYP = "at+jwt"  # RFC 9068 section 2.1


def cert_thumbprint(der: bytes) -> str:
    """RFC 8705 section 3.1: ``x5t#S256`` is base64url(SHA-256(DER certificate)), no padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _scopes(value: str) -> list[str]:
    """RFC 6749 section 3.3: space-delimited, case-sensitive, order-insignificant, no duplicates."""
    out: list[str] = []
    for s in value.split(" "):
        if s and s not in out:
            out.append(s)
    return out


def _half_hash(value: str, alg: str) -> str:
    """OIDC Core section 3.1.3.6 ``at_hash`` / ``c_hash``: left half of the alg's hash, base64url."""
    digest = (hashlib.sha512 if alg == "EdDSA" else hashlib.sha256)(value.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ClientAuth:
    """What the token-style endpoints know about the caller, extracted by the HTTP edge."""

    authorization: str = ""
    cert_thumbprint: str = ""


@dataclass(frozen=True)
class AuthorizeRequest:
    """RFC 6749 section 4.1.1 + RFC 7636 section 4.3 + OIDC Core section 3.1.2.1 parameters."""

    params: Mapping[str, str]
    username: str = ""  # the user chosen on the login form (or ``login_hint``)


@dataclass(frozen=True)
class AuthorizeRedirect:
    location: str


class UserinfoError(AuthzError):
    """RFC 6750 section 3.1: a bad bearer token at the userinfo endpoint (401 with a challenge)."""

    def __init__(self, error: str, description: str, status: int = 401) -> None:
        super().__init__(description, reason=error)
        self.error = error
        self.status = status

    @property
    def www_authenticate(self) -> str:
        if not self.error:  # RFC 6750 section 3.1: no error code when no token was presented at all
            return 'Bearer realm="userinfo"'
        return f'Bearer realm="userinfo", error="{self.error}", error_description="{self.message}"'


@dataclass
class Fault:
    """Make an endpoint fail (``status``) and/or slow (``delay``), for ``remaining`` requests (None: all)."""

    status: int = 0
    delay: float = 0.0
    remaining: int | None = None


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    redirect_uri_sent: bool
    user: UserConfig
    scope: list[str]
    nonce: str
    challenge: str
    expires_at: float
    auth_time: float
    used: bool = False
    access_jtis: list[str] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)


@dataclass
class _Refresh:
    client_id: str
    user: UserConfig | None
    scope: list[str]
    audience: list[str]
    expires_at: float
    auth_time: float
    cnf: dict[str, str] | None
    nonce: str = ""
    access_jtis: list[str] = field(default_factory=list)


class Issuer:
    """A running issuer. Thread-safe: HTTP handlers and test threads may call it concurrently."""

    def __init__(self, config: IssuerConfig, *, clock: Clock = system_clock, base_url: str = "") -> None:
        self.config = config
        self.name = config.name
        self.base_clock = clock
        self.clock_offset = config.clock_offset
        self.base_url = base_url.rstrip("/")
        self.keys = KeyRing()
        self.clients: dict[str, ClientConfig] = {c.client_id: c for c in config.clients}
        self.users: dict[str, UserConfig] = {u.username: u for u in config.users}
        self.faults: dict[str, Fault] = {}
        self.request_counts: Counter[str] = Counter()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._opaque: dict[str, dict[str, Any]] = {}
        self._revoked_jtis: set[str] = set()
        self._lock = threading.RLock()
        for kc in config.keys:
            # Configured keys exist "since the epoch", so setting the clock back never unpublishes them.
            key = self.keys.add(generate_key(kc.alg, kid=kc.kid, now=0.0))
            key.active_from = 0.0

    # ---- time and identity -------------------------------------------------------------------------

    def now(self) -> float:
        """The issuer's clock: the injected clock plus the admin clock offset."""
        return self.base_clock() + self.clock_offset

    @property
    def issuer_url(self) -> str:
        """The ``iss`` value: configured, else ``<server url>/issuers/<name>``."""
        return self.config.issuer or f"{self.base_url or 'http://127.0.0.1'}/issuers/{self.name}"

    @property
    def endpoint_base(self) -> str:
        """Where this issuer's endpoints are served (the ``iss`` may differ when configured)."""
        return f"{self.base_url or 'http://127.0.0.1'}/issuers/{self.name}"

    def jwks(self) -> dict[str, Any]:
        return self.keys.jwks(self.now())

    def signing_key(self, alg: str = "", kid: str = "") -> SigningKey:
        """``kid`` if given (any key the ring ever had, retired included), else the signer for ``alg``."""
        with self._lock:
            if kid:
                return self.keys.get(kid)
            alg = alg or self.config.signing_alg
            key = self.keys.signer(alg, self.now())
            if key is None:
                raise AuthzError(f"issuer {self.name!r} has no active {alg} key", reason="no_signing_key")
            return key

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 section 2 / OpenID Connect Discovery 1.0 section 3 provider metadata."""
        base = self.endpoint_base
        return {
            "issuer": self.issuer_url,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "userinfo_endpoint": f"{base}/userinfo",
            "jwks_uri": f"{base}/jwks",
            "introspection_endpoint": f"{base}/introspect",
            "revocation_endpoint": f"{base}/revoke",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": [
                "authorization_code",
                "client_credentials",
                "refresh_token",
                "password",
            ],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys.keys}),
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
                "tls_client_auth",
            ],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": list(rfc7636.SUPPORTED_METHODS),
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "name", "email"],
            "tls_client_certificate_bound_access_tokens": True,  # RFC 8705 section 3.3
            "authorization_response_iss_parameter_supported": True,  # RFC 9207 section 3
        }

    # ---- minting -------------------------------------------------------------------------------------

    def mint(
        self,
        *,
        sub: str = "test-subject",
        aud: str | list[str] | None = None,
        claims: Mapping[str, Any] | None = None,
        exp: float | None = None,
        ttl: float | None = None,
        iat: float | None = None,
        nbf: float | None = None,
        kid: str = "",
        alg: str = "",
        typ: str = ACCESS_TOKEN_TYP,
        client_id: str = "",
        scope: str = "",
        omit: Iterable[str] = (),
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Mint a signed JWT without HTTP. ``claims`` override the defaults; ``omit`` drops claims.

        Defaults follow RFC 9068 section 2.2: iss, sub, aud (the issuer's default audience), exp
        (``iat + ttl``, default the configured access token lifetime), iat, jti, client_id, scope.
        """
        key = self.signing_key(alg, kid)
        now = self.now() if iat is None else iat
        body: dict[str, Any] = {
            "iss": self.issuer_url,
            "sub": sub,
            "aud": aud if aud is not None else self._default_audience(None),
            "exp": int(
                exp if exp is not None else now + (ttl if ttl is not None else self.config.access_token_ttl)
            ),
            "iat": int(now),
            "jti": uuid.uuid4().hex,
        }
        if nbf is not None:
            body["nbf"] = int(nbf)
        if client_id:
            body["client_id"] = client_id
        if scope:
            body["scope"] = scope
        body.update(claims or {})
        for name in omit:
            body.pop(name, None)
        return sign(key, body, typ=typ, extra_headers=dict(headers or {}))

    def _default_audience(self, client: ClientConfig | None) -> str | list[str]:
        aud = list((client.audience if client else ()) or self.config.audience)
        if not aud:
            aud = [client.client_id] if client else [self.name]
        return aud[0] if len(aud) == 1 else aud

    # ---- client authentication (RFC 6749 section 2.3, RFC 8705 section 2) -----------------------------

    def authenticate_client(
        self, form: Mapping[str, str], auth: ClientAuth, *, allow_public: bool = True
    ) -> ClientConfig:
        basic = parse_basic_authorization(auth.authorization) if auth.authorization else None
        used_basic = basic is not None
        if basic is not None and "client_secret" in form:
            # RFC 6749 section 2.3: "MUST NOT use more than one authentication method in each request".
            raise OAuthError("invalid_request", "more than one client authentication method")
        client_id = basic.client_id if basic else form.get("client_id", "")
        if basic and form.get("client_id", basic.client_id) != basic.client_id:
            raise OAuthError("invalid_request", "client_id does not match the authenticated client")
        if not client_id:
            raise invalid_client("client authentication is required", basic=used_basic)
        client = self.clients.get(client_id)
        if client is None:
            raise invalid_client("unknown client", basic=used_basic)
        if client.auth_method == "none":
            if not allow_public:
                raise invalid_client("this endpoint requires a confidential client", basic=used_basic)
            return client
        if client.auth_method == "tls_client_auth":
            if not auth.cert_thumbprint:
                raise invalid_client("a client certificate is required", basic=used_basic)
            if client.tls_thumbprints and auth.cert_thumbprint not in client.tls_thumbprints:
                raise invalid_client("the client certificate is not registered", basic=used_basic)
            return client
        presented = basic.client_secret if basic else form.get("client_secret", "")
        if not presented:
            raise invalid_client("client authentication is required", basic=used_basic)
        if not hmac.compare_digest(presented.encode("utf-8"), client.client_secret.encode("utf-8")):
            raise invalid_client("wrong client credentials", basic=used_basic)
        return client

    # ---- token endpoint (RFC 6749 sections 4.1.3, 4.3.2, 4.4.2, 6) ------------------------------------

    def token(self, form: Mapping[str, str], auth: ClientAuth) -> dict[str, Any]:
        """Handle a token request; returns the RFC 6749 section 5.1 response body or raises OAuthError."""
        grant_type = form.get("grant_type", "")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        client = self.authenticate_client(form, auth)
        handlers = {
            "client_credentials": self._grant_client_credentials,
            "authorization_code": self._grant_authorization_code,
            "refresh_token": self._grant_refresh_token,
            "password": self._grant_password,
        }
        handler = handlers.get(grant_type)
        if handler is None:
            raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
        if grant_type not in client.grant_types:
            raise OAuthError("unauthorized_client", f"client may not use grant_type {grant_type}")
        with self._lock:
            return handler(client, form, auth)

    def _check_scope(self, client: ClientConfig, requested: list[str]) -> list[str]:
        if not requested:
            return list(client.scopes)
        if client.scopes:
            extra = [s for s in requested if s not in client.scopes and s != "openid"]
            if extra:
                raise OAuthError("invalid_scope", f"scope not allowed for this client: {' '.join(extra)}")
        return requested

    def _audience(self, client: ClientConfig, form: Mapping[str, str]) -> list[str]:
        """RFC 8707 ``resource`` (or the common ``audience`` extension) narrows the token's audience."""
        requested = form.get("resource") or form.get("audience") or ""
        default = self._default_audience(client)
        allowed = [default] if isinstance(default, str) else list(default)
        if not requested:
            return allowed
        if (client.audience or self.config.audience) and requested not in allowed:
            raise OAuthError("invalid_target", f"audience {requested!r} is not allowed for this client")
        return [requested]

    def _cnf(self, auth: ClientAuth) -> dict[str, str] | None:
        """RFC 8705 section 3.1: bind the token to the client certificate used on this connection."""
        return {"x5t#S256": auth.cert_thumbprint} if auth.cert_thumbprint else None

    def _issue_access_token(
        self,
        client: ClientConfig,
        *,
        sub: str,
        scope: list[str],
        audience: list[str],
        user: UserConfig | None,
        cnf: dict[str, str] | None,
        auth_time: float | None,
    ) -> tuple[str, str]:
        """Returns (token, jti). RFC 9068 section 2.2 claims; custom claims never override them."""
        now = self.now()
        jti = uuid.uuid4().hex
        body: dict[str, Any] = {**client.claims, **(user.claims if user else {})}
        body.update(
            {
                "iss": self.issuer_url,
                "sub": sub,
                "aud": audience[0] if len(audience) == 1 else audience,
                "exp": int(now + self.config.access_token_ttl),
                "iat": int(now),
                "jti": jti,
                "client_id": client.client_id,
            }
        )
        if scope:
            body["scope"] = " ".join(scope)
        if auth_time is not None:
            body["auth_time"] = int(auth_time)
        if cnf:
            body["cnf"] = cnf
        if client.access_token_format == "opaque":
            token = secrets.token_urlsafe(32)
            self._opaque[token] = body
            return token, jti
        return sign(self.signing_key(), body, typ=ACCESS_TOKEN_TYP), jti

    def _issue_id_token(
        self, client: ClientConfig, user: UserConfig, *, access_token: str, nonce: str, auth_time: float
    ) -> str:
        """OpenID Connect Core section 2 / 3.1.3.6: the ID token for the code (and refresh) flow."""
        now = self.now()
        key = self.signing_key()
        body: dict[str, Any] = {**user.claims}
        body.update(
            {
                "iss": self.issuer_url,
                "sub": user.subject,
                "aud": client.client_id,
                "azp": client.client_id,
                "exp": int(now + self.config.id_token_ttl),
                "iat": int(now),
                "auth_time": int(auth_time),
                "at_hash": _half_hash(access_token, key.alg),
            }
        )
        if nonce:
            body["nonce"] = nonce
        return sign(key, body, typ="JWT")

    def _response(
        self,
        client: ClientConfig,
        *,
        sub: str,
        scope: list[str],
        audience: list[str],
        user: UserConfig | None,
        cnf: dict[str, str] | None,
        auth_time: float | None,
        nonce: str = "",
        with_refresh: bool,
        code: _Code | None = None,
        refresh: _Refresh | None = None,
    ) -> dict[str, Any]:
        token, jti = self._issue_access_token(
            client, sub=sub, scope=scope, audience=audience, user=user, cnf=cnf, auth_time=auth_time
        )
        out: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.config.access_token_ttl),
        }
        if scope:
            out["scope"] = " ".join(scope)
        if code is not None:
            code.access_jtis.append(jti)
        if refresh is not None:
            refresh.access_jtis.append(jti)
        if with_refresh and "refresh_token" in client.grant_types:
            rt = secrets.token_urlsafe(32)
            grant = _Refresh(
                client_id=client.client_id,
                user=user,
                scope=scope,
                audience=audience,
                expires_at=self.now() + self.config.refresh_token_ttl,
                auth_time=auth_time if auth_time is not None else self.now(),
                cnf=cnf,
                nonce=nonce,
                access_jtis=[jti, *(refresh.access_jtis if refresh else [])],
            )
            self._refresh[rt] = grant
            out["refresh_token"] = rt
            if code is not None:
                code.refresh_tokens.append(rt)
        if user is not None and "openid" in scope:
            out["id_token"] = self._issue_id_token(
                client, user, access_token=token, nonce=nonce, auth_time=auth_time or self.now()
            )
        return out

    def _grant_client_credentials(
        self, client: ClientConfig, form: Mapping[str, str], auth: ClientAuth
    ) -> dict[str, Any]:
        """RFC 6749 section 4.4: the client acts on its own behalf; ``sub`` is the client id."""
        scope = self._check_scope(client, _scopes(form.get("scope", "")))
        return self._response(
            client,
            sub=client.client_id,
            scope=scope,
            audience=self._audience(client, form),
            user=None,
            cnf=self._cnf(auth),
            auth_time=None,
            with_refresh=False,  # RFC 6749 section 4.4.3: "A refresh token SHOULD NOT be included"
        )

    def _grant_password(
        self, client: ClientConfig, form: Mapping[str, str], auth: ClientAuth
    ) -> dict[str, Any]:
        """RFC 6749 section 4.3 (legacy; kept for old tests)."""
        username, password = form.get("username", ""), form.get("password", "")
        if not username or not password:
            raise OAuthError("invalid_request", "username and password are required")
        user = self.users.get(username)
        if (
            user is None
            or not user.password
            or not hmac.compare_digest(user.password.encode("utf-8"), password.encode("utf-8"))
        ):
            raise OAuthError("invalid_grant", "wrong username or password")
        scope = self._check_scope(client, _scopes(form.get("scope", "")))
        return self._response(
            client,
            sub=user.subject,
            scope=scope,
            audience=self._audience(client, form),
            user=user,
            cnf=self._cnf(auth),
            auth_time=self.now(),
            with_refresh=True,
        )

    def _grant_authorization_code(
        self, client: ClientConfig, form: Mapping[str, str], auth: ClientAuth
    ) -> dict[str, Any]:
        """RFC 6749 section 4.1.3 with RFC 7636 section 4.6 verification."""
        code_value = form.get("code", "")
        if not code_value:
            raise OAuthError("invalid_request", "code is required")
        code = self._codes.get(code_value)
        if code is None:
            raise OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            # RFC 6749 section 4.1.2: deny, and revoke the tokens already issued from this code.
            self._revoked_jtis.update(code.access_jtis)
            for rt in code.refresh_tokens:
                self._refresh.pop(rt, None)
            raise OAuthError("invalid_grant", "authorization code was already used")
        if code.client_id != client.client_id:
            raise OAuthError("invalid_grant", "authorization code was issued to another client")
        if self.now() >= code.expires_at:
            raise OAuthError("invalid_grant", "authorization code has expired")
        redirect_uri = form.get("redirect_uri", "")
        if code.redirect_uri_sent and redirect_uri != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if code.challenge:
            if not verifier:
                raise OAuthError("invalid_grant", "code_verifier is required")
            rfc7636.verify(verifier, code.challenge)
        elif verifier:
            # RFC 9700 section 2.1.1: a code_verifier without a code_challenge is a downgrade attempt.
            raise OAuthError("invalid_grant", "code_verifier sent for a code issued without code_challenge")
        code.used = True
        return self._response(
            client,
            sub=code.user.subject,
            scope=code.scope,
            audience=self._audience(client, form),
            user=code.user,
            cnf=self._cnf(auth),
            auth_time=code.auth_time,
            nonce=code.nonce,
            with_refresh=True,
            code=code,
        )

    def _grant_refresh_token(
        self, client: ClientConfig, form: Mapping[str, str], auth: ClientAuth
    ) -> dict[str, Any]:
        """RFC 6749 section 6; the old refresh token is invalidated when rotation is on (RFC 9700 4.14.2)."""
        value = form.get("refresh_token", "")
        if not value:
            raise OAuthError("invalid_request", "refresh_token is required")
        grant = self._refresh.get(value)
        if grant is None:
            raise OAuthError("invalid_grant", "unknown or revoked refresh token")
        if grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "refresh token was issued to another client")
        if self.now() >= grant.expires_at:
            self._refresh.pop(value, None)
            raise OAuthError("invalid_grant", "refresh token has expired")
        requested = _scopes(form.get("scope", ""))
        extra = [s for s in requested if s not in grant.scope]
        if extra:
            # RFC 6749 section 6: "MUST NOT include any scope not originally granted".
            raise OAuthError("invalid_scope", f"scope exceeds the original grant: {' '.join(extra)}")
        scope = requested or grant.scope
        if self.config.rotate_refresh_tokens:
            self._refresh.pop(value, None)
        out = self._response(
            client,
            sub=grant.user.subject if grant.user else client.client_id,
            scope=scope,
            audience=grant.audience,
            user=grant.user,
            cnf=self._cnf(auth) or grant.cnf,
            auth_time=grant.auth_time,
            nonce="",
            with_refresh=self.config.rotate_refresh_tokens,
            refresh=grant,
        )
        return out

    # ---- authorization endpoint (RFC 6749 section 4.1.1, 4.1.2) -------------------------------------

    def check_authorize_client(self, params: Mapping[str, str]) -> tuple[ClientConfig, str]:
        """RFC 6749 section 4.1.2.1: a bad client_id or redirect_uri is shown, never redirected to."""
        client = self.clients.get(params.get("client_id", ""))
        if client is None:
            raise OAuthError("invalid_request", "unknown client_id")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            if len(client.redirect_uris) != 1:
                raise OAuthError("invalid_request", "redirect_uri is required")
            return client, client.redirect_uris[0]
        if not any(_redirect_matches(registered, redirect_uri) for registered in client.redirect_uris):
            raise OAuthError("invalid_request", "redirect_uri is not registered for this client")
        return client, redirect_uri

    def authorize(self, request: AuthorizeRequest) -> AuthorizeRedirect:
        """Issue a code and redirect (auto-consent). Errors after the redirect URI is known redirect too."""
        params = request.params
        client, redirect_uri = self.check_authorize_client(params)
        state = params.get("state", "")
        try:
            with self._lock:
                code = self._new_code(client, redirect_uri, request)
        except OAuthError as exc:
            return AuthorizeRedirect(
                _with_query(
                    redirect_uri,
                    {
                        "error": exc.error,
                        "error_description": exc.description,
                        "state": state,
                        "iss": self.issuer_url,
                    },
                )
            )
        return AuthorizeRedirect(
            _with_query(redirect_uri, {"code": code, "state": state, "iss": self.issuer_url})
        )

    def _new_code(self, client: ClientConfig, redirect_uri: str, request: AuthorizeRequest) -> str:
        params = request.params
        if params.get("response_type", "") != "code":
            raise OAuthError("unsupported_response_type", "only response_type=code is supported")
        if "authorization_code" not in client.grant_types:
            raise OAuthError("unauthorized_client", "client may not use the authorization code flow")
        challenge = params.get("code_challenge", "")
        if challenge:
            rfc7636.check_challenge(challenge, params.get("code_challenge_method", "plain"))
        elif client.is_public:
            # RFC 9700 section 2.1.1: public clients MUST use PKCE.
            raise OAuthError("invalid_request", "code_challenge is required for public clients")
        scope = self._check_scope(client, _scopes(params.get("scope", "")))
        username = request.username or params.get("login_hint", "")
        if not username:
            if not self.users:
                raise OAuthError("access_denied", "no users are configured")
            username = next(iter(self.users))
        user = self.users.get(username)
        if user is None:
            raise OAuthError("access_denied", f"unknown user {username!r}")
        now = self.now()
        value = secrets.token_urlsafe(32)
        self._codes[value] = _Code(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            redirect_uri_sent="redirect_uri" in params,
            user=user,
            scope=scope,
            nonce=params.get("nonce", ""),
            challenge=challenge,
            expires_at=now + self.config.code_ttl,
            auth_time=now,
        )
        return value

    # ---- reading tokens back: introspection, userinfo, revocation ------------------------------------

    def _decode_own(self, token: str, *, verify_exp: bool) -> dict[str, Any] | None:
        """Verify a JWT against this issuer's published keys; None if it is not one of ours."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        now = self.now()
        for key in self.keys.published(now):
            if key.kid != header.get("kid") or key.alg != header.get("alg"):
                continue
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.private_key.public_key(),
                    algorithms=[key.alg],
                    options={
                        "verify_aud": False,
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                    },
                )
            except jwt.InvalidTokenError:
                return None
            if claims.get("iss") != self.issuer_url:
                return None
            if verify_exp and not (isinstance(claims.get("exp"), int | float) and now < claims["exp"]):
                return None
            return claims
        return None

    def _lookup_access(self, token: str, *, verify_exp: bool = True) -> dict[str, Any] | None:
        with self._lock:
            claims = self._opaque.get(token)
            if claims is None:
                claims = self._decode_own(token, verify_exp=verify_exp)
            elif verify_exp and self.now() >= claims["exp"]:
                return None
            if claims is None or claims.get("jti") in self._revoked_jtis:
                return None
            return dict(claims)

    def introspect(self, form: Mapping[str, str], auth: ClientAuth) -> dict[str, Any]:
        """RFC 7662 section 2: the caller authenticates; inactive tokens are just ``{"active": false}``."""
        self.authenticate_client(form, auth, allow_public=False)
        token = form.get("token", "")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        with self._lock:
            if form.get("token_type_hint") != "access_token":
                grant = self._refresh.get(token)
                if grant is not None and self.now() < grant.expires_at:
                    out: dict[str, Any] = {
                        "active": True,
                        "token_type": "refresh_token",
                        "client_id": grant.client_id,
                        "scope": " ".join(grant.scope),
                        "exp": int(grant.expires_at),
                        "iss": self.issuer_url,
                    }
                    if grant.user:
                        out["sub"] = grant.user.subject
                        out["username"] = grant.user.username
                    return out
            claims = self._lookup_access(token)
        if claims is None:
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}

    def revoke(self, form: Mapping[str, str], auth: ClientAuth) -> None:
        """RFC 7009 section 2.1: revoke a refresh or access token; unknown tokens are not an error."""
        client = self.authenticate_client(form, auth)
        token = form.get("token", "")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        with self._lock:
            grant = self._refresh.get(token)
            if grant is not None:
                if grant.client_id != client.client_id:
                    raise OAuthError("unauthorized_client", "the token was issued to another client")
                del self._refresh[token]
                # RFC 7009 section 2.1: also invalidate access tokens based on the same grant.
                self._revoked_jtis.update(grant.access_jtis)
                return
            claims = self._lookup_access(token, verify_exp=False)
            if claims is None:
                return
            if claims.get("client_id") != client.client_id:
                raise OAuthError("unauthorized_client", "the token was issued to another client")
            self._revoked_jtis.add(str(claims.get("jti")))
            self._opaque.pop(token, None)

    def userinfo(self, authorization: str) -> dict[str, Any]:
        """OpenID Connect Core section 5.3 with RFC 6750 section 2.1 bearer tokens."""
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UserinfoError("", "a Bearer access token is required")
        claims = self._lookup_access(token.strip())
        if claims is None:
            raise UserinfoError("invalid_token", "the access token is invalid, expired or revoked")
        sub = str(claims.get("sub", ""))
        user = next((u for u in self.users.values() if u.subject == sub), None)
        return {"sub": sub, **(dict(user.claims) if user else {})}

    # ---- admin ---------------------------------------------------------------------------------------

    def set_user(
        self,
        username: str,
        *,
        password: str | None = None,
        sub: str | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> UserConfig:
        with self._lock:
            old = self.users.get(username, UserConfig(username=username))
            user = replace(
                old,
                password=old.password if password is None else password,
                sub=old.sub if sub is None else sub,
                claims=dict(old.claims if claims is None else claims),
            )
            self.users[username] = user
            return user

    def delete_user(self, username: str) -> bool:
        with self._lock:
            return self.users.pop(username, None) is not None

    def set_client(self, client: ClientConfig) -> None:
        with self._lock:
            self.clients[client.client_id] = client

    def set_client_claims(self, client_id: str, claims: Mapping[str, Any]) -> ClientConfig:
        with self._lock:
            client = self.clients.get(client_id)
            if client is None:
                raise AuthzError(f"unknown client {client_id!r}", reason="unknown_client")
            client = replace(client, claims=dict(claims))
            self.clients[client_id] = client
            return client

    def set_fault(self, endpoint: str, fault: Fault) -> None:
        if endpoint not in ENDPOINTS:
            raise AuthzError(
                f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}", reason="unknown_endpoint"
            )
        if not (fault.status == 0 or 400 <= fault.status <= 599) or not 0 <= fault.delay <= MAX_FAULT_DELAY:
            raise AuthzError(
                f"status must be 0 or 400-599 and delay 0-{MAX_FAULT_DELAY}", reason="invalid_fault"
            )
        with self._lock:
            self.faults[endpoint] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, endpoint: str) -> Fault | None:
        """Count the request and return the fault to apply to it, if any (consuming one use)."""
        with self._lock:
            self.request_counts[endpoint] += 1
            fault = self.faults.get(endpoint)
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self.faults[endpoint]
            return fault


def _redirect_matches(registered: str, presented: str) -> bool:
    """Exact match (RFC 9700 section 4.1.3), except any port on a loopback IP (RFC 8252 section 7.3)."""
    if registered == presented:
        return True
    r, p = urlsplit(registered), urlsplit(presented)
    if r.scheme != "http" or r.hostname not in ("127.0.0.1", "::1") or r.port is not None:
        return False
    return (p.scheme, p.hostname, p.path, p.query) == (r.scheme, r.hostname, r.path, r.query)


def _with_query(uri: str, params: Mapping[str, str]) -> str:
    query = urlencode({k: v for k, v in params.items() if v})
    return f"{uri}{'&' if '?' in uri else '?'}{query}"

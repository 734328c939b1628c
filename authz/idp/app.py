"""The HTTP face of the mock OpenID Provider (FastAPI). Parses requests, calls :class:`Issuer`, renders.

Every issuer lives under ``/issuers/<name>``; its admin API under ``/issuers/<name>/admin``. Refusals are
RFC 6749 section 5.2 JSON bodies with the right status; nothing a client sends can cause a 500.
"""

from __future__ import annotations

import asyncio
import html
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from authz.errors import AuthzError
from authz.idp.issuer import AuthorizeRequest, ClientAuth, Fault, Issuer, UserinfoError, cert_thumbprint
from authz.idp.provider import Idp
from authz.idp.rfc6749 import OAuthError, parse_form

__all__ = ["build_app", "client_cert_thumbprint"]

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 section 5.1
MAX_ADMIN_BODY = 256 * 1024  # admin JSON bodies are small; refuse anything larger


def client_cert_thumbprint(request: Request, issuer: Issuer) -> str:
    """RFC 8705: the ``x5t#S256`` of the TLS client certificate, or of the dev-only trusted header."""
    tls = request.scope.get("extensions", {}).get("tls", {})
    chain = tls.get("client_cert_chain") or []
    pem = chain[0] if chain else ""
    header = issuer.config.trusted_client_cert_header
    if not pem and header:
        pem = urllib.parse.unquote(request.headers.get(header, ""))
    if not pem:
        return ""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return ""
    return cert_thumbprint(cert.public_bytes(Encoding.DER))


def _oauth_response(exc: OAuthError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _admin_error(exc: AuthzError, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": exc.reason, "error_description": exc.message}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise AuthzError("body too large", reason="invalid_request")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise AuthzError("body is not JSON", reason="invalid_request") from exc
    if not isinstance(data, dict):
        raise AuthzError("body must be a JSON object", reason="invalid_request")
    return data


def _number(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthzError(f"{key} must be a number", reason="invalid_request")
    return float(value)


def _text(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise AuthzError(f"{key} must be a string", reason="invalid_request")
    return value


def _login_form(issuer: Issuer, params: Mapping[str, str]) -> HTMLResponse:
    """A minimal login page: pick one of the configured users (development only, no passwords)."""
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in params.items()
    )
    options = "".join(
        f'<option value="{html.escape(u)}">{html.escape(u)}</option>' for u in sorted(issuer.users)
    )
    page = (
        "<!doctype html><html><head><title>Sign in</title></head><body>"
        f"<h1>Sign in to {html.escape(issuer.name)}</h1>"
        f'<form method="post" action="authorize">{hidden}'
        f'<label>User <select name="username">{options}</select></label>'
        '<button type="submit">Sign in</button></form></body></html>'
    )
    return HTMLResponse(page, headers=NO_STORE)


def build_app(idp: Idp) -> FastAPI:
    """The FastAPI application serving every issuer of ``idp`` and its admin API."""
    app = FastAPI(title="meshauthz mock OpenID Provider", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OAuthError)
    async def _on_oauth(_: Request, exc: OAuthError) -> Response:
        return _oauth_response(exc)

    @app.exception_handler(AuthzError)
    async def _on_authz(_: Request, exc: AuthzError) -> Response:
        status = 404 if exc.reason in ("unknown_issuer", "unknown_client", "unknown_kid") else 400
        return _admin_error(exc, status)

    async def guard(name: str, endpoint: str) -> tuple[Issuer, Response | None]:
        """Look up the issuer, count the request, apply an injected fault (delay, then status)."""
        issuer = idp.issuer(name)
        fault = issuer.take_fault(endpoint)
        if fault is None:
            return issuer, None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status:
            return issuer, JSONResponse(
                {"error": "injected_fault", "error_description": f"fault injected on {endpoint}"},
                status_code=fault.status,
            )
        return issuer, None

    async def form_of(request: Request) -> dict[str, str]:
        return parse_form(await request.body(), request.headers.get("content-type", ""))

    def client_auth(request: Request, issuer: Issuer) -> ClientAuth:
        return ClientAuth(
            authorization=request.headers.get("authorization", ""),
            cert_thumbprint=client_cert_thumbprint(request, issuer),
        )

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {"issuers": {name: iss.issuer_url for name, iss in idp.issuers.items()}}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/issuers/{name}/.well-known/openid-configuration")
    async def openid_configuration(name: str) -> Response:
        issuer, failed = await guard(name, "openid_configuration")
        return failed or JSONResponse(issuer.metadata())

    @app.get("/issuers/{name}/.well-known/oauth-authorization-server")
    @app.get("/.well-known/oauth-authorization-server/issuers/{name}")  # RFC 8414 section 3.1 path form
    async def oauth_authorization_server(name: str) -> Response:
        issuer, failed = await guard(name, "oauth_authorization_server")
        return failed or JSONResponse(issuer.metadata())

    @app.get("/issuers/{name}/jwks")
    async def jwks(name: str) -> Response:
        issuer, failed = await guard(name, "jwks")
        if failed:
            return failed
        cache = f"public, max-age={issuer.config.jwks_max_age}"
        return JSONResponse(
            issuer.jwks(), headers={"Cache-Control": cache}, media_type="application/jwk-set+json"
        )

    @app.post("/issuers/{name}/token")
    async def token(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "token")
        if failed:
            return failed
        form = await form_of(request)
        return JSONResponse(issuer.token(form, client_auth(request, issuer)), headers=NO_STORE)

    @app.get("/issuers/{name}/authorize")
    async def authorize(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "authorize")
        if failed:
            return failed
        params = {k: v for k, v in request.query_params.items() if v}
        issuer.check_authorize_client(params)
        if issuer.config.login == "form" and "login_hint" not in params:
            return _login_form(issuer, params)
        return RedirectResponse(issuer.authorize(AuthorizeRequest(params)).location, status_code=302)

    @app.post("/issuers/{name}/authorize")
    async def authorize_submit(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "authorize")
        if failed:
            return failed
        form = await form_of(request)
        username = form.pop("username", "")
        if not username:
            raise OAuthError("invalid_request", "username is required")
        redirect = issuer.authorize(AuthorizeRequest(form, username=username))
        return RedirectResponse(redirect.location, status_code=303)

    @app.api_route("/issuers/{name}/userinfo", methods=["GET", "POST"])
    async def userinfo(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "userinfo")
        if failed:
            return failed
        try:
            body = issuer.userinfo(request.headers.get("authorization", ""))
        except UserinfoError as exc:
            return JSONResponse(
                {"error": exc.error or "invalid_request", "error_description": exc.message},
                status_code=exc.status,
                headers={"WWW-Authenticate": exc.www_authenticate},
            )
        return JSONResponse(body, headers=NO_STORE)

    @app.post("/issuers/{name}/introspect")
    async def introspect(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "introspect")
        if failed:
            return failed
        form = await form_of(request)
        return JSONResponse(issuer.introspect(form, client_auth(request, issuer)), headers=NO_STORE)

    @app.post("/issuers/{name}/revoke")
    async def revoke(name: str, request: Request) -> Response:
        issuer, failed = await guard(name, "revoke")
        if failed:
            return failed
        form = await form_of(request)
        issuer.revoke(form, client_auth(request, issuer))
        return Response(status_code=200, headers=NO_STORE)  # RFC 7009 section 2.2: 200, empty body

    _add_admin_routes(app, idp)
    return app


def _add_admin_routes(app: FastAPI, idp: Idp) -> None:
    """``/issuers/<name>/admin/...``: keys, users, client claims, clock, faults, counters, minting."""

    @app.get("/issuers/{name}/admin/keys")
    async def keys(name: str) -> dict[str, Any]:
        issuer = idp.issuer(name)
        return {"keys": issuer.keys.describe(issuer.now())}

    @app.post("/issuers/{name}/admin/keys/publish")
    async def keys_publish(name: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        now = issuer.now()
        activate_in = data.get("activate_in_seconds")
        activate_at = None if activate_in is None else now + _number(data, "activate_in_seconds", 0)
        with issuer._lock:
            key = issuer.keys.publish(
                _text(data, "alg", issuer.config.signing_alg),
                now,
                activate_at=activate_at,
                kid=_text(data, "kid"),
            )
        return {"kid": key.kid, "keys": issuer.keys.describe(now)}

    @app.post("/issuers/{name}/admin/keys/activate")
    async def keys_activate(name: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        now = issuer.now()
        with issuer._lock:
            key = issuer.keys.activate(now, kid=_text(data, "kid"), alg=_text(data, "alg"))
        return {"kid": key.kid, "keys": issuer.keys.describe(now)}

    @app.post("/issuers/{name}/admin/keys/retire")
    async def keys_retire(name: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        now = issuer.now()
        with issuer._lock:
            retired = issuer.keys.retire(now, kid=_text(data, "kid"))
        return {"retired": [k.kid for k in retired], "keys": issuer.keys.describe(now)}

    @app.post("/issuers/{name}/admin/keys/rotate")
    async def keys_rotate(name: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        now = issuer.now()
        overlap = _number(data, "overlap_seconds", 0)
        retire_after = _number(data, "retire_after_seconds", 0)
        if overlap < 0 or retire_after < 0:
            raise AuthzError(
                "overlap_seconds and retire_after_seconds must be >= 0", reason="invalid_request"
            )
        with issuer._lock:
            key = issuer.keys.rotate(
                _text(data, "alg", issuer.config.signing_alg), now, overlap=overlap, retire_after=retire_after
            )
        return {"kid": key.kid, "keys": issuer.keys.describe(now)}

    @app.put("/issuers/{name}/admin/users/{username}")
    async def put_user(name: str, username: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        claims = data.get("claims")
        if claims is not None and not isinstance(claims, dict):
            raise AuthzError("claims must be an object", reason="invalid_request")
        password = _text(data, "password") if "password" in data else None
        sub = _text(data, "sub") if "sub" in data else None
        user = issuer.set_user(username, password=password, sub=sub, claims=claims)
        return {"username": user.username, "sub": user.subject, "claims": dict(user.claims)}

    @app.delete("/issuers/{name}/admin/users/{username}")
    async def delete_user(name: str, username: str) -> Response:
        if not idp.issuer(name).delete_user(username):
            raise AuthzError(f"unknown user {username!r}", reason="unknown_client")
        return Response(status_code=204)

    @app.put("/issuers/{name}/admin/clients/{client_id}/claims")
    async def put_client_claims(name: str, client_id: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        claims = data.get("claims", {})
        if not isinstance(claims, dict):
            raise AuthzError("claims must be an object", reason="invalid_request")
        client = issuer.set_client_claims(client_id, claims)
        return {"client_id": client.client_id, "claims": dict(client.claims)}

    @app.get("/issuers/{name}/admin/clock")
    async def get_clock(name: str) -> dict[str, float]:
        issuer = idp.issuer(name)
        return {"offset_seconds": issuer.clock_offset, "now": issuer.now()}

    @app.put("/issuers/{name}/admin/clock")
    async def put_clock(name: str, request: Request) -> dict[str, float]:
        issuer, data = idp.issuer(name), await _json_body(request)
        issuer.clock_offset = _number(data, "offset_seconds", 0)
        return {"offset_seconds": issuer.clock_offset, "now": issuer.now()}

    @app.post("/issuers/{name}/admin/clock/advance")
    async def advance_clock(name: str, request: Request) -> dict[str, float]:
        issuer, data = idp.issuer(name), await _json_body(request)
        issuer.clock_offset += _number(data, "seconds", 0)
        return {"offset_seconds": issuer.clock_offset, "now": issuer.now()}

    @app.put("/issuers/{name}/admin/faults/{endpoint}")
    async def put_fault(name: str, endpoint: str, request: Request) -> dict[str, Any]:
        issuer, data = idp.issuer(name), await _json_body(request)
        count = data.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise AuthzError("count must be a positive integer", reason="invalid_request")
        fault = Fault(
            status=int(_number(data, "status", 0)), delay=_number(data, "delay_seconds", 0), remaining=count
        )
        issuer.set_fault(endpoint, fault)
        return {"endpoint": endpoint, "status": fault.status, "delay_seconds": fault.delay, "count": count}

    @app.delete("/issuers/{name}/admin/faults")
    async def clear_faults(name: str) -> Response:
        idp.issuer(name).clear_faults()
        return Response(status_code=204)

    @app.get("/issuers/{name}/admin/requests")
    async def request_counts(name: str) -> dict[str, dict[str, int]]:
        return {"requests": dict(idp.issuer(name).request_counts)}

    @app.delete("/issuers/{name}/admin/requests")
    async def reset_request_counts(name: str) -> Response:
        idp.issuer(name).request_counts.clear()
        return Response(status_code=204)

    @app.post("/issuers/{name}/admin/mint")
    async def mint(name: str, request: Request) -> dict[str, str]:
        """Mint a token over HTTP, for scripts that are not Python (the demo, docker-compose)."""
        issuer, data = idp.issuer(name), await _json_body(request)
        claims = data.get("claims", {})
        aud = data.get("aud")
        if not isinstance(claims, dict) or not (aud is None or isinstance(aud, str | list)):
            raise AuthzError("claims must be an object and aud a string or list", reason="invalid_request")
        ttl = _number(data, "ttl_seconds", issuer.config.access_token_ttl)
        token = issuer.mint(
            sub=_text(data, "sub", "test-subject"),
            aud=aud,
            claims=claims,
            ttl=ttl,
            kid=_text(data, "kid"),
            alg=_text(data, "alg"),
            typ=_text(data, "typ", "at+jwt"),
        )
        return {"token": token}

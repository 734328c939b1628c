"""Per-issuer settings Istio has no field for: our extension kind ``JWTIssuerSettings``.

Istio kinds stay pure (no unknown fields inside a RequestAuthentication); what Envoy hard-codes or
istiod takes from environment variables is configured here, per issuer::

    apiVersion: meshauthz.dev/v1alpha1
    kind: JWTIssuerSettings
    metadata: {name: corp-idp, namespace: istio-system}
    spec:
      issuer: https://idp.corp.example
      clockSkew: 60s
      jwks: {minCacheDuration: 30s, maxCacheDuration: 24h, unknownKidCooldown: 15s, maxStaleness: 24h}
      hmacSecrets: [{kid: legacy-1, algorithm: HS256, secretRef: {env: LEGACY_JWT_SECRET}}]
      certificateBinding: optional
      spiffeBinding: {claim: sub, pattern: "system:serviceaccount:{namespace}:{service_account}"}

Secrets are references (``env`` or ``file``), never inline values: only the CLI resolves them, with
:func:`resolve_secrets`, because only the CLI reads files and the environment.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from authz.authn._fields import FieldReader
from authz.authn.jwk import HMAC_ALGORITHMS, Jwk, hmac_key
from authz.errors import ConfigError, ConfigErrors
from authz.identity.binding import compile_binding_pattern
from authz.resources import FieldPath, Resource

__all__ = [
    "API_VERSION",
    "KIND",
    "AuthnSettings",
    "CertificateBinding",
    "HmacSecret",
    "IntrospectionSettings",
    "IssuerSettings",
    "JwksSettings",
    "SecretRef",
    "SpiffeBinding",
    "load_issuer_settings",
    "resolve_secrets",
]

API_VERSION = "meshauthz.dev/v1alpha1"
KIND = "JWTIssuerSettings"

DEFAULT_CLOCK_SKEW = 60.0  # Envoy jwt_authn clock_skew_seconds default, which Istio does not override
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024  # far above real JWTs (1-3 KiB); below Envoy's 60 KiB header limit
# JWKS cache bounds. Cache-Control max-age is honoured within [min, max]: the floor stops an IdP that
# says max-age=0 from making us fetch on every request; the ceiling bounds how long a revoked key lives.
DEFAULT_JWKS_MIN_CACHE = 30.0
DEFAULT_JWKS_MAX_CACHE = 24 * 3600.0
DEFAULT_JWKS_CACHE = 300.0  # without Cache-Control: Envoy remote_jwks cache_duration default (5 min)
DEFAULT_REFRESH_BEFORE_EXPIRY = 30.0  # refresh ahead so requests never wait on an expired cache
DEFAULT_UNKNOWN_KID_COOLDOWN = 15.0  # istio#51581: refetch on unknown kid, rate limited
DEFAULT_MAX_STALENESS = 24 * 3600.0  # keep the last good keys this long while the IdP is failing
DEFAULT_INTROSPECTION_CACHE = 60.0  # RFC 7662 section 4: cache, but revocation should bite quickly

_SPEC_FIELDS = (
    "issuer",
    "clockSkew",
    "maxTokenBytes",
    "jwks",
    "requiredClaims",
    "hmacSecrets",
    "introspection",
    "certificateBinding",
    "spiffeBinding",
)
_JWKS_FIELDS = (
    "minCacheDuration",
    "maxCacheDuration",
    "defaultCacheDuration",
    "refreshBeforeExpiry",
    "unknownKidCooldown",
    "maxStaleness",
    "caBundleFile",
)


class CertificateBinding(enum.Enum):
    """RFC 8705 section 3: certificate-bound access tokens (``cnf.x5t#S256``)."""

    REQUIRED = "required"
    OPTIONAL = "optional"  # checked when the token carries cnf.x5t#S256, else not
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives: an environment variable or a file. Never the value itself."""

    env: str = ""
    file: str = ""

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True, slots=True)
class HmacSecret:
    kid: str | None
    algorithm: str
    ref: SecretRef


@dataclass(frozen=True, slots=True)
class SpiffeBinding:
    """The token claim ``claim`` must equal the peer's SPIFFE ID, or (with ``pattern``) the pattern with
    placeholders (``{trust_domain}``, ``{namespace}``, ``{service_account}``, ... see
    :mod:`authz.identity.binding`) filled from it. Checked by ``authz.identity.binding``."""

    claim: str = "sub"
    pattern: str = ""


@dataclass(frozen=True, slots=True)
class IntrospectionSettings:
    """RFC 7662 token introspection for opaque (non-JWT) tokens of this issuer."""

    endpoint: str
    client_id: str
    client_secret_ref: SecretRef
    auth_method: str = "client_secret_basic"  # RFC 7662 section 2.1 / RFC 6749 section 2.3.1
    cache_duration: float = DEFAULT_INTROSPECTION_CACHE
    client_secret: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class JwksSettings:
    min_cache_duration: float = DEFAULT_JWKS_MIN_CACHE
    max_cache_duration: float = DEFAULT_JWKS_MAX_CACHE
    default_cache_duration: float = DEFAULT_JWKS_CACHE
    refresh_before_expiry: float = DEFAULT_REFRESH_BEFORE_EXPIRY
    unknown_kid_cooldown: float = DEFAULT_UNKNOWN_KID_COOLDOWN
    max_staleness: float = DEFAULT_MAX_STALENESS
    ca_bundle_file: str = ""


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """Everything about one issuer that Istio's RequestAuthentication cannot say."""

    issuer: str = ""
    clock_skew: float = DEFAULT_CLOCK_SKEW
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    jwks: JwksSettings = field(default_factory=JwksSettings)
    required_claims: tuple[str, ...] = ()
    hmac_secrets: tuple[HmacSecret, ...] = ()
    introspection: IntrospectionSettings | None = None
    certificate_binding: CertificateBinding = CertificateBinding.DISABLED
    spiffe_binding: SpiffeBinding | None = None
    hmac_keys: tuple[Jwk, ...] = field(default=(), repr=False)
    """HMAC keys built from the resolved ``hmac_secrets`` (by :func:`resolve_secrets`)."""
    origin: str = ""


DEFAULT_ISSUER_SETTINGS = IssuerSettings()


@dataclass(frozen=True, slots=True)
class AuthnSettings:
    """Settings of every issuer; issuers without a ``JWTIssuerSettings`` get the defaults."""

    issuers: Mapping[str, IssuerSettings] = field(default_factory=dict)

    def for_issuer(self, issuer: str) -> IssuerSettings:
        found = self.issuers.get(issuer)
        if found is not None:
            return found
        return DEFAULT_ISSUER_SETTINGS if not issuer else IssuerSettings(issuer=issuer)


def load_issuer_settings(resources: Iterable[Resource]) -> AuthnSettings:
    """Parse every ``JWTIssuerSettings`` (other kinds are ignored). Raises :class:`ConfigErrors`."""
    errors: list[ConfigError] = []
    issuers: dict[str, IssuerSettings] = {}
    for res in resources:
        if res.kind != KIND:
            continue
        before = len(errors)
        settings = _parse(res, errors)
        if settings.issuer in issuers:
            errors.append(
                res.error(
                    ("spec", "issuer"),
                    f"issuer {settings.issuer!r} already configured by {issuers[settings.issuer].origin}",
                )
            )
        if len(errors) == before:
            issuers[settings.issuer] = settings
    if errors:
        raise ConfigErrors(errors)
    return AuthnSettings(issuers)


def resolve_secrets(
    settings: AuthnSettings,
    *,
    environ: Mapping[str, str],
    read_file: Callable[[str], bytes],
) -> AuthnSettings:
    """Resolve every :class:`SecretRef` (HMAC secrets, introspection client secrets).

    The CLI passes ``os.environ`` and a file reader; tests pass dicts. Raises :class:`ConfigErrors`
    naming the issuer and the reference (never the value) for each secret that cannot be read.
    """
    errors: list[ConfigError] = []

    def read(ref: SecretRef, where: str) -> bytes | None:
        try:
            if ref.env:
                if ref.env not in environ:
                    raise KeyError(ref.env)
                value = environ[ref.env].encode()
            else:
                value = read_file(ref.file).strip()
        except (KeyError, OSError) as exc:
            errors.append(
                ConfigError(f"cannot read secret {ref.describe()}: {type(exc).__name__}", field=where)
            )
            return None
        if not value:
            errors.append(ConfigError(f"secret {ref.describe()} is empty", field=where))
            return None
        return value

    out: dict[str, IssuerSettings] = {}
    for issuer, s in settings.issuers.items():
        keys: list[Jwk] = []
        for i, hs in enumerate(s.hmac_secrets):
            where = f"{s.origin}.spec.hmacSecrets[{i}]"
            secret = read(hs.ref, where)
            if secret is None:
                continue
            try:
                keys.append(hmac_key(secret, kid=hs.kid, algorithm=hs.algorithm))
            except ValueError as exc:
                errors.append(ConfigError(str(exc), field=where))
        intro = s.introspection
        if intro is not None:
            secret = read(intro.client_secret_ref, f"{s.origin}.spec.introspection.clientSecretRef")
            if secret is not None:
                intro = replace(intro, client_secret=secret.decode("utf-8", "replace"))
        out[issuer] = replace(s, hmac_keys=tuple(keys), introspection=intro)
    if errors:
        raise ConfigErrors(errors)
    return AuthnSettings(out)


def _parse(res: Resource, errors: list[ConfigError]) -> IssuerSettings:
    reader = FieldReader(res, errors)
    if res.api_version != API_VERSION:
        reader.fail(("apiVersion",), f"unsupported apiVersion {res.api_version!r} (use {API_VERSION})")
    spec = reader.mapping(res.spec, ("spec",), _SPEC_FIELDS)
    issuer = reader.string(spec, "issuer", ("spec",), required=True)
    skew = reader.duration(spec, "clockSkew", ("spec",), DEFAULT_CLOCK_SKEW)
    max_bytes = int(reader.number(spec, "maxTokenBytes", ("spec",), DEFAULT_MAX_TOKEN_BYTES, minimum=256))
    jwks = _jwks(reader, spec.get("jwks"))
    required = reader.string_list(spec, "requiredClaims", ("spec",), unique=True)
    secrets = tuple(_hmac(reader, p, item) for p, item in reader.objects(spec, "hmacSecrets", ("spec",)))
    intro = _introspection(reader, spec.get("introspection"))
    binding_raw = spec.get("certificateBinding", "disabled")
    try:
        binding = CertificateBinding(binding_raw)
    except ValueError:
        reader.fail(
            ("spec", "certificateBinding"), f"must be required, optional or disabled, got {binding_raw!r}"
        )
        binding = CertificateBinding.DISABLED
    return IssuerSettings(
        issuer=issuer,
        clock_skew=skew,
        max_token_bytes=max_bytes,
        jwks=jwks,
        required_claims=required,
        hmac_secrets=secrets,
        introspection=intro,
        certificate_binding=binding,
        spiffe_binding=_spiffe(reader, spec.get("spiffeBinding")),
        origin=f"{res.file}:{res.line} {KIND} {res.namespace}/{res.name}",
    )


def _jwks(reader: FieldReader, value: Any) -> JwksSettings:
    path: FieldPath = ("spec", "jwks")
    obj = reader.mapping(value, path, _JWKS_FIELDS)
    s = JwksSettings(
        min_cache_duration=reader.duration(obj, "minCacheDuration", path, DEFAULT_JWKS_MIN_CACHE),
        max_cache_duration=reader.duration(
            obj, "maxCacheDuration", path, DEFAULT_JWKS_MAX_CACHE, positive=True
        ),
        default_cache_duration=reader.duration(
            obj, "defaultCacheDuration", path, DEFAULT_JWKS_CACHE, positive=True
        ),
        refresh_before_expiry=reader.duration(
            obj, "refreshBeforeExpiry", path, DEFAULT_REFRESH_BEFORE_EXPIRY
        ),
        unknown_kid_cooldown=reader.duration(obj, "unknownKidCooldown", path, DEFAULT_UNKNOWN_KID_COOLDOWN),
        max_staleness=reader.duration(obj, "maxStaleness", path, DEFAULT_MAX_STALENESS),
        ca_bundle_file=reader.string(obj, "caBundleFile", path),
    )
    if s.min_cache_duration > s.max_cache_duration:
        reader.fail((*path, "minCacheDuration"), "must not exceed maxCacheDuration")
    return s


def _secret_ref(reader: FieldReader, value: Any, path: FieldPath) -> SecretRef:
    obj = reader.mapping(value, path, ("env", "file"))
    if value is None:
        reader.fail(path, "is required ({env: NAME} or {file: /path})")
    env = reader.string(obj, "env", path)
    file = reader.string(obj, "file", path)
    if value is not None and bool(env) == bool(file):
        reader.fail(path, "set exactly one of env or file (secrets are never written inline)")
    return SecretRef(env=env, file=file)


def _hmac(reader: FieldReader, path: FieldPath, item: Any) -> HmacSecret:
    obj = reader.mapping(item, path, ("kid", "algorithm", "secretRef"))
    kid = reader.string(obj, "kid", path) or None
    alg = reader.string(obj, "algorithm", path) or "HS256"
    if alg not in HMAC_ALGORITHMS:
        reader.fail((*path, "algorithm"), f"must be one of {sorted(HMAC_ALGORITHMS)}, got {alg!r}")
    return HmacSecret(
        kid=kid, algorithm=alg, ref=_secret_ref(reader, obj.get("secretRef"), (*path, "secretRef"))
    )


def _introspection(reader: FieldReader, value: Any) -> IntrospectionSettings | None:
    if value is None:
        return None
    path: FieldPath = ("spec", "introspection")
    obj = reader.mapping(
        value, path, ("endpoint", "clientId", "clientSecretRef", "authMethod", "cacheDuration")
    )
    endpoint = reader.string(obj, "endpoint", path, required=True)
    if endpoint:
        reader.http_url(endpoint, (*path, "endpoint"))
    method = reader.string(obj, "authMethod", path) or "client_secret_basic"
    if method not in ("client_secret_basic", "client_secret_post"):
        reader.fail((*path, "authMethod"), "must be client_secret_basic or client_secret_post")
    return IntrospectionSettings(
        endpoint=endpoint,
        client_id=reader.string(obj, "clientId", path, required=True),
        client_secret_ref=_secret_ref(reader, obj.get("clientSecretRef"), (*path, "clientSecretRef")),
        auth_method=method,
        cache_duration=reader.duration(obj, "cacheDuration", path, DEFAULT_INTROSPECTION_CACHE),
    )


def _spiffe(reader: FieldReader, value: Any) -> SpiffeBinding | None:
    if value is None:
        return None
    path: FieldPath = ("spec", "spiffeBinding")
    obj = reader.mapping(value, path, ("claim", "pattern"))
    claim = reader.string(obj, "claim", path) or "sub"
    pattern = reader.string(obj, "pattern", path)
    if pattern:
        # Validated by the same compiler that checks bindings at request time (authz.identity).
        try:
            compile_binding_pattern(pattern)
        except ConfigError as exc:
            reader.fail((*path, "pattern"), exc.message)
    return SpiffeBinding(claim=claim, pattern=pattern)

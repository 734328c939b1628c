from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from bench import configs
from bench.tokens import (
    BENCH_GROUP,
    BENCH_ISSUER,
    BENCH_SUBJECT,
    bench_claims,
    mint_key,
    mint_token,
    public_jwks,
)

ENVOY = Path(sys.executable).with_name("envoy")


def hcm(boot: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return result


def filter_names(boot: dict[str, Any]) -> list[str]:
    return [f["name"] for f in hcm(boot)["http_filters"]]


def test_plain_proxy_has_only_the_router_and_points_at_the_upstream() -> None:
    boot = configs.plain_proxy_bootstrap(4321)
    assert filter_names(boot) == ["envoy.filters.http.router"]
    clusters = boot["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["app"]
    endpoint = clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4321}
    route = hcm(boot)["route_config"]["virtual_hosts"][0]["routes"][0]
    assert "typed_per_filter_config" not in route


def test_native_rows_differ_only_in_the_jwt_cache() -> None:
    jwks = '{"keys":[]}'
    no_cache = configs.native_auth_bootstrap(1, jwks, cache_size=None)
    cached = configs.native_auth_bootstrap(1, jwks, cache_size=100)
    assert (
        filter_names(no_cache)
        == filter_names(cached)
        == [
            "envoy.filters.http.jwt_authn",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router",
        ]
    )
    p0 = hcm(no_cache)["http_filters"][0]["typed_config"]["providers"]["origins-0"]
    p1 = hcm(cached)["http_filters"][0]["typed_config"]["providers"]["origins-0"]
    assert "jwt_cache_config" not in p0
    assert p1.pop("jwt_cache_config") == {"jwt_cache_size": 100}
    assert p0 == p1
    assert p0["local_jwks"] == {"inline_string": jwks}
    assert p0["issuer"] == BENCH_ISSUER


def test_rbac_is_the_policy_rule() -> None:
    policy = configs.rbac_filter()["typed_config"]["rules"]["policies"]["ns[default]-policy[bench]-rule[0]"]
    assert policy["permissions"] == [{"url_path": {"path": {"prefix": "/api/"}}}]
    ids = policy["principals"][0]["and_ids"]["ids"]
    claims = {m["metadata"]["path"][1]["key"]: m["metadata"]["value"] for m in ids}
    assert claims["iss"] == {"string_match": {"exact": BENCH_ISSUER}}
    assert claims["sub"] == {"string_match": {"exact": BENCH_SUBJECT}}
    assert claims["groups"] == {"list_match": {"one_of": {"string_match": {"exact": BENCH_GROUP}}}}
    assert {m["metadata"]["path"][0]["key"] for m in ids} == {BENCH_ISSUER}  # payload_in_metadata


def test_istio_policy_says_the_same_rule() -> None:
    docs = list(yaml.safe_load_all(configs.bench_policy_yaml('{"keys":[]}')))
    assert [d["kind"] for d in docs] == ["RequestAuthentication", "AuthorizationPolicy"]
    ra, ap = docs
    assert ra["spec"]["jwtRules"] == [{"issuer": BENCH_ISSUER, "jwks": '{"keys":[]}'}]
    (rule,) = ap["spec"]["rules"]
    assert rule["from"][0]["source"]["requestPrincipals"] == [f"{BENCH_ISSUER}/{BENCH_SUBJECT}"]
    assert rule["to"][0]["operation"]["paths"] == ["/api/*"]
    assert rule["when"] == [{"key": "request.auth.claims[groups]", "values": [BENCH_GROUP]}]
    assert (
        ap["spec"]["selector"]["matchLabels"] == ra["spec"]["selector"]["matchLabels"] == configs.BENCH_LABELS
    )
    assert configs.BENCH_PATH.startswith("/api/")


def test_ext_authz_rows_use_the_sidecar_bootstrap() -> None:
    for mode in ("grpc", "http"):
        boot = configs.ext_authz_bootstrap(mode, upstream_port=11, authz_port=22)
        assert filter_names(boot) == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
        authz = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "meshauthz")
        addr = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert addr["socket_address"]["port_value"] == 22
        assert boot["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 0


def test_proxy_config() -> None:
    doc = yaml.safe_load(
        configs.proxy_config_yaml(inbound_port=5, admin_port=6, upstream_port=7, policy_dir="/tmp/p")
    )
    assert doc["kind"] == "ProxyConfig"
    assert doc["spec"]["inbound"]["port"] == 5
    assert doc["spec"]["inbound"]["appPort"] == 7
    assert doc["spec"]["authorizer"] == {"mode": "local", "policies": ["/tmp/p"]}
    plain = yaml.safe_load(
        configs.proxy_config_yaml(inbound_port=5, admin_port=6, upstream_port=7, policy_dir=None)
    )
    assert plain["spec"]["authorizer"] == {"mode": "none"}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_tokens_verify_against_the_public_jwks(alg: str) -> None:
    key = mint_key(alg)
    jwks = json.loads(public_jwks(key))
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == key.kid and jwk["alg"] == alg
    assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()  # public material only
    now = time.time()
    token = mint_token(key, bench_claims(now, serial=3))
    public = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, public, algorithms=[alg], audience="bench-api")
    assert claims["iss"] == BENCH_ISSUER and claims["sub"] == BENCH_SUBJECT and claims["jti"] == "bench-3"
    assert claims["exp"] > now


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY.exists() and shutil.which("envoy") is None, reason="envoy binary not installed")
def test_envoy_accepts_every_bootstrap(tmp_path: Path) -> None:
    envoy = str(ENVOY) if ENVOY.exists() else "envoy"
    jwks = public_jwks(mint_key("RS256"))
    boots = {
        "upstream": configs.upstream_bootstrap(),
        "plain": configs.plain_proxy_bootstrap(1234),
        "native": configs.native_auth_bootstrap(1234, jwks, cache_size=100),
        "grpc": configs.ext_authz_bootstrap("grpc", upstream_port=1234, authz_port=1235),
        "http": configs.ext_authz_bootstrap("http", upstream_port=1234, authz_port=1235),
    }
    for name, boot in boots.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(boot))
        done = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{name}: {done.stdout[-400:]!r} {done.stderr[-400:]!r}"


def test_the_engine_loads_the_bench_policies() -> None:
    resources_mod = pytest.importorskip("authz.resources")
    policy_mod = pytest.importorskip("authz.policy")
    authn_model = pytest.importorskip("authz.authn.model")
    jwks = public_jwks(mint_key("RS256"))
    resources = resources_mod.parse_documents(configs.bench_policy_yaml(jwks), "bench.yaml")
    policies, warnings = policy_mod.load_authorization_policies(resources)
    assert [p.name for p in policies] == ["bench"]
    assert warnings == []
    (ra,) = authn_model.load_request_authentications(resources)
    assert ra.jwt_rules[0].issuer == BENCH_ISSUER
    assert ra.jwt_rules[0].jwks == jwks

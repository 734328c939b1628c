"""The engine's own steps: workload scoping, remote.ip, peer identity, fail closed, decision log."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.authn import Authenticator
from authz.authn.settings import AuthnSettings, CertificateBinding, IssuerSettings
from authz.authn.testing import SigningKey, jwks_document
from authz.clock import FrozenClock
from authz.config import MeshConfig
from authz.decision import Decision
from authz.decision_log import DecisionLog
from authz.engine import Engine, remote_ip
from authz.identity import PeerTrust
from authz.identity.certs import thumbprint_from_hex_hash
from authz.metrics import CHECK_LATENCY, CHECKS
from authz.request import HttpAttributes, Peer, Request, Workload
from authz.resources import parse_documents
from authz.snapshot import Snapshot, build_snapshot
from authz.workload import resolve_workload

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-frontend, namespace: orders}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/web/sa/frontend"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-remote, namespace: orders}
spec:
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
"""


def snapshot(text: str = POLICIES, mesh: MeshConfig | None = None) -> Snapshot:
    return build_snapshot(parse_documents(text), mesh or MeshConfig(), generation=1, loaded_at=0.0)


def engine(mesh: MeshConfig | None = None, **kw: Any) -> Engine:
    mesh = mesh or MeshConfig()
    snap = snapshot(mesh=mesh)
    clock = FrozenClock()
    return Engine(
        snap,
        mesh=mesh,
        authenticator=Authenticator(settings=snap.authn_settings, clock=clock),
        clock=clock,
        **kw,
    )


def req(
    principal: str = "", xff: str = "", path: str = "/", ns: str = "orders", labels: str = "app=orders"
) -> Request:
    headers = {"x-forwarded-for": xff} if xff else {}
    return Request(
        source=Peer(address="10.0.0.9", principal=principal),
        http=HttpAttributes(method="GET", host="orders", path=path, headers=headers),
        context_extensions={"namespace": ns, "labels": labels},
    )


FRONTEND = "spiffe://cluster.local/ns/web/sa/frontend"


async def test_principal_policy_allows_the_right_workload_and_denies_others() -> None:
    e = engine()
    ok = await e.check(req(FRONTEND))
    assert (ok.allowed, ok.reason, ok.principal) == (True, "allowed_by_policy", FRONTEND)
    other = await e.check(req("spiffe://cluster.local/ns/web/sa/admin"))
    assert (other.allowed, other.status, other.reason, other.policy_id) == (
        False,
        403,
        "no_allow_match",
        "none",
    )
    plaintext = await e.check(req(""))
    assert not plaintext.allowed


async def test_workload_scoping_from_context_extensions() -> None:
    e = engine()
    d = await e.check(req("", ns="billing", labels="app=billing"))
    assert (d.allowed, d.reason) == (True, "allowed_no_policy")


def test_resolve_workload_order() -> None:
    default = Workload("fallback", {"app": "x"})
    assert resolve_workload(
        {"namespace": "a", "labels": "k=v"}, "spiffe://td/ns/b/sa/s", default
    ) == Workload("a", {"k": "v"})
    assert resolve_workload({}, "spiffe://td/ns/b/sa/s", default) == Workload("b", {"app": "x"})
    assert resolve_workload({}, "", default) is default


@pytest.mark.parametrize(
    ("xff", "trusted", "expected"),
    [
        ("", 0, "10.0.0.9"),
        ("203.0.113.5", 0, "10.0.0.9"),
        ("203.0.113.5", 1, "203.0.113.5"),
        ("203.0.113.5, 10.1.1.1", 1, "10.1.1.1"),
        ("203.0.113.5, 10.1.1.1", 2, "203.0.113.5"),
        ("203.0.113.5", 2, "10.0.0.9"),
    ],
)
def test_remote_ip_honours_trusted_proxies(xff: str, trusted: int, expected: str) -> None:
    assert remote_ip(req(xff=xff), trusted) == expected


async def test_remote_ip_blocks_use_the_xff_derived_address() -> None:
    e = engine(MeshConfig(num_trusted_proxies=1))
    d = await e.check(req(FRONTEND, xff="203.0.113.7"))
    assert (d.allowed, d.reason, d.policy_id) == (
        False,
        "denied_by_policy",
        "ns[orders]-policy[deny-remote]-rule[0]",
    )
    assert (await e.check(req(FRONTEND, xff="198.51.100.1"))).allowed


async def test_malformed_path_is_400() -> None:
    d = await engine().check(req(FRONTEND, path="/a%00b"))
    assert (d.allowed, d.status) == (False, 400)


def break_evaluation(e: Engine) -> None:
    """A bug inside a check: the policy set in force is not one the evaluator can read (the modules may be
    compiled, so the bug is planted in the data rather than by patching a function)."""
    e.swap(dataclasses.replace(e.snapshot, policies=object()))  # type: ignore[arg-type]


async def test_internal_error_fails_closed_and_is_counted() -> None:
    e = engine()
    break_evaluation(e)
    d = await e.check(req(FRONTEND))
    assert (d.allowed, d.status, d.reason) == (False, 403, "internal_error")
    e.fail_open = True
    assert (await e.check(req(FRONTEND))).allowed


async def test_decision_ids_are_unique_and_logged() -> None:
    stream = io.StringIO()
    log = DecisionLog(stream, flush_interval=0.01)
    e = engine(decision_log=log)
    a = await e.check(req(FRONTEND, path="/x?y=1"))
    b = await e.check(req(""))
    log.close()
    assert a.decision_id != b.decision_id
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["decision_id"] for line in lines] == [a.decision_id, b.decision_id]
    assert (
        lines[0]["path"] == "/x"
        and lines[0]["decision"] == "allow"
        and lines[1]["reason"] == "no_allow_match"
    )
    assert lines[0]["workload"] == {"namespace": "orders", "labels": {"app": "orders"}}


async def test_swap_is_atomic_per_check() -> None:
    e = engine()
    assert not (await e.check(req(""))).allowed
    e.swap(snapshot("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"))
    assert (await e.check(req(""))).allowed


async def test_xfcc_identity_only_when_trusted() -> None:
    from authz.identity import PeerTrust

    xfcc = f"By=spiffe://cluster.local/ns/orders/sa/orders;URI={FRONTEND}"
    request = Request(
        source=Peer(address="10.0.0.9"),
        http=HttpAttributes(method="GET", host="orders", path="/", headers={"x-forwarded-client-cert": xfcc}),
        context_extensions={"namespace": "orders", "labels": "app=orders"},
    )
    untrusted = await engine().check(request)
    assert (untrusted.allowed, untrusted.principal) == (False, "")
    trusted = await engine(peer_trust=PeerTrust(trust_xfcc=True, trust_domain="cluster.local")).check(request)
    assert (trusted.allowed, trusted.principal) == (True, FRONTEND)


def jwt_snapshot(key: SigningKey, *, required_sub: str = "alice") -> Snapshot:
    return snapshot(_jwt_policy_text(key, required_sub))


def _jwt_policy_text(key: SigningKey, required_sub: str) -> str:
    jwks = json.dumps(jwks_document(key))
    return (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: orders}\n"
        f"spec: {{jwtRules: [{{issuer: 'https://idp.test', jwks: '{jwks}'}}]}}\n"
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: by-token, namespace: orders}\n"
        f"spec: {{rules: [{{from: [{{source: {{requestPrincipals: ['https://idp.test/{required_sub}']}}}}]}}]}}\n"
    )


def bearer_request(token: str, labels: str = "app=orders") -> Request:
    return Request(
        source=Peer(address="10.0.0.9"),
        http=HttpAttributes(
            method="GET", host="orders", path="/", headers={"authorization": f"Bearer {token}"}
        ),
        context_extensions={"namespace": "orders", "labels": labels},
    )


async def test_repeated_checks_of_a_token_keep_their_answers_across_swaps() -> None:
    # The engine memoizes workloads, jwtRules per workload and snapshot, and identity fields per
    # authentication result: repeats must answer as the first check did, and a swap must be seen.
    key = SigningKey.generate("RS256", kid="k1")
    clock = FrozenClock(1_700_000_000.0)
    snap = jwt_snapshot(key)
    e = Engine(
        snap,
        mesh=MeshConfig(),
        authenticator=Authenticator(settings=snap.authn_settings, clock=clock),
        clock=clock,
    )
    alice = key.sign({"iss": "https://idp.test", "sub": "alice", "exp": 1_700_000_600, "scope": "a b"})
    bob = key.sign({"iss": "https://idp.test", "sub": "bob", "exp": 1_700_000_600})
    for _ in range(3):
        ok = await e.check(bearer_request(alice))
        assert (ok.allowed, ok.request_principal) == (True, "https://idp.test/alice")
        assert dict(ok.claims) == {
            "iss": "https://idp.test",
            "sub": "alice",
            "exp": 1_700_000_600,
            "scope": "a b",
        }
        with pytest.raises(TypeError):
            ok.claims["sub"] = "mallory"  # type: ignore[index]  # shared between decisions: read-only
        no = await e.check(bearer_request(bob))
        assert (no.allowed, no.request_principal, no.reason) == (
            False,
            "https://idp.test/bob",
            "no_allow_match",
        )
        assert (await e.check(bearer_request("garbage"))).status == 401
    e.swap(jwt_snapshot(key, required_sub="bob"))
    assert not (await e.check(bearer_request(alice))).allowed
    assert (await e.check(bearer_request(bob))).allowed
    e.swap(snapshot())  # no RequestAuthentication any more: a garbage token is not even looked at
    assert (await e.check(bearer_request("garbage"))).reason == "no_allow_match"


async def test_workload_memo_follows_the_default_workload() -> None:
    e = engine()
    bare = Request(source=Peer(address="10.0.0.9", principal=FRONTEND), http=HttpAttributes(path="/"))
    assert (await e.check(bare)).reason == "allowed_no_policy"  # default workload: default/{}
    e.default_workload = Workload("orders", {"app": "orders"})
    assert (await e.check(bare)).reason == "allowed_by_policy"


# -- check_now: the same decisions, without waiting ------------------------------------------------------


def _fields(decision: Decision) -> dict[str, Any]:
    """Every field but the decision id (unique per check)."""
    return {
        f.name: getattr(decision, f.name) for f in dataclasses.fields(Decision) if f.name != "decision_id"
    }


def jwt_engine(key: SigningKey, clock: FrozenClock, **settings: Any) -> Engine:
    snap = jwt_snapshot(key)
    authn_settings = snap.authn_settings
    if settings:
        authn_settings = AuthnSettings(issuers={ISSUER: IssuerSettings(issuer=ISSUER, **settings)})
    return Engine(
        snap,
        mesh=MeshConfig(),
        authenticator=Authenticator(settings=authn_settings, clock=clock),
        peer_trust=PeerTrust(trust_xfcc=True),
        clock=clock,
    )


ISSUER = "https://idp.test"
NOW = 1_700_000_000.0


async def test_check_now_decides_as_check_once_the_token_is_verified() -> None:
    key = SigningKey.generate("RS256", kid="k1")
    clock = FrozenClock(NOW)
    e = jwt_engine(key, clock)
    alice = key.sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 600})
    bob = key.sign({"iss": ISSUER, "sub": "bob", "exp": NOW + 600})
    # A token never verified: its signature must be checked first, so check_now cannot answer.
    assert e.check_now(bearer_request(alice)) is None
    for token, allowed in ((alice, True), (bob, False)):
        waited = await e.check(bearer_request(token))
        assert waited.allowed is allowed
        for _ in range(2):  # the second time from the decision kept for these results
            now = e.check_now(bearer_request(token))
            assert now is not None and _fields(now) == _fields(waited)
            assert now.decision_id != waited.decision_id
    # No token: nothing to verify, check_now answers (deny: the policy wants a request principal).
    nobody = Request(
        http=HttpAttributes(path="/"), context_extensions={"namespace": "orders", "labels": "app=orders"}
    )
    anonymous = e.check_now(nobody)
    assert anonymous is not None and (anonymous.allowed, anonymous.reason) == (False, "no_allow_match")


async def test_check_now_is_none_for_a_bad_or_expired_token_and_check_gives_the_401() -> None:
    key = SigningKey.generate("RS256", kid="k1")
    clock = FrozenClock(NOW)
    e = jwt_engine(key, clock)
    assert e.check_now(bearer_request("garbage")) is None  # failures are never cached: always verified
    bad = await e.check(bearer_request("garbage"))
    assert (bad.status, bad.reason) == (401, "malformed_token")
    assert e.check_now(bearer_request("garbage")) is None
    alice = key.sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 60})
    assert (await e.check(bearer_request(alice))).allowed
    assert e.check_now(bearer_request(alice)) is not None
    clock.now = NOW + 3600  # expired (past any clock skew): the cached verification no longer answers
    assert e.check_now(bearer_request(alice)) is None
    expired = await e.check(bearer_request(alice))
    assert (expired.allowed, expired.status) == (False, 401)


async def test_check_now_sees_a_swap_and_a_rotated_key_at_once() -> None:
    key = SigningKey.generate("RS256", kid="k1")
    clock = FrozenClock(NOW)
    e = jwt_engine(key, clock)
    bob = key.sign({"iss": ISSUER, "sub": "bob", "exp": NOW + 600})
    assert not (await e.check(bearer_request(bob))).allowed
    e.swap(jwt_snapshot(key, required_sub="bob"))  # same rules and keys: the cached token still counts
    now = e.check_now(bearer_request(bob))
    assert now is not None and now.allowed
    rotated = SigningKey.generate("RS256", kid="k2")
    e.swap(jwt_snapshot(rotated, required_sub="bob"))  # k1 gone: bob's token must be verified again
    assert e.check_now(bearer_request(bob)) is None
    assert (await e.check(bearer_request(bob))).status == 401


async def test_check_now_answers_malformed_and_failing_checks_like_check() -> None:
    e = engine()
    bad_path = e.check_now(req(FRONTEND, path="/a%00b"))
    assert bad_path is not None and _fields(bad_path) == _fields(await e.check(req(FRONTEND, path="/a%00b")))
    assert bad_path.status == 400
    break_evaluation(e)
    failed = e.check_now(req(FRONTEND))
    assert failed is not None and (failed.allowed, failed.reason) == (False, "internal_error")


async def test_check_now_counts_only_what_it_decides() -> None:
    key = SigningKey.generate("RS256", kid="k1")
    e = jwt_engine(key, FrozenClock(NOW))
    alice = key.sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 600})
    allowed = CHECKS.labels(decision="allow", reason="allowed_by_policy")
    before, observed = allowed.value, sum(CHECK_LATENCY.unlabelled().counts)
    assert e.check_now(bearer_request(alice)) is None
    assert (allowed.value, sum(CHECK_LATENCY.unlabelled().counts)) == (before, observed)
    await e.check(bearer_request(alice))
    e.check_now(bearer_request(alice))
    assert (allowed.value, sum(CHECK_LATENCY.unlabelled().counts)) == (before + 2, observed + 2)


async def test_certificate_binding_is_checked_on_every_check_of_a_kept_decision() -> None:
    # The decision for (policy result, token, peer principal, path) is kept; the binding to the peer's
    # certificate is not part of that key, so it must still be checked against each check's peer.
    key = SigningKey.generate("RS256", kid="k1")
    e = jwt_engine(key, FrozenClock(NOW), certificate_binding=CertificateBinding.OPTIONAL)
    good_hash, other_hash = "ab" * 32, "cd" * 32
    token = key.sign(
        {
            "iss": ISSUER,
            "sub": "alice",
            "exp": NOW + 600,
            "cnf": {"x5t#S256": thumbprint_from_hex_hash(good_hash)},
        }
    )

    def from_peer(cert_hash: str) -> Request:
        request = bearer_request(token)
        assert request.http is not None
        headers = {**request.http.headers, "x-forwarded-client-cert": f"Hash={cert_hash};URI={FRONTEND}"}
        return dataclasses.replace(request, http=dataclasses.replace(request.http, headers=headers))

    for _ in range(2):
        assert (await e.check(from_peer(good_hash))).allowed
        ok = e.check_now(from_peer(good_hash))
        assert ok is not None and ok.allowed and ok.principal == FRONTEND
        for stolen in (await e.check(from_peer(other_hash)), e.check_now(from_peer(other_hash))):
            assert stolen is not None
            assert (stolen.allowed, stolen.reason) == (False, "certificate_binding_mismatch")


_PROPERTY_KEY = SigningKey.generate("ES256", kid="k1")
_PROPERTY_TOKENS = {
    "none": None,
    "alice": _PROPERTY_KEY.sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 600}),
    "bob": _PROPERTY_KEY.sign({"iss": ISSUER, "sub": "bob", "exp": NOW + 600}),
    "garbage": "garbage",
}
_PROPERTY_CHECKS = st.tuples(
    st.sampled_from(["", FRONTEND, "spiffe://cluster.local/ns/web/sa/admin", "not-spiffe"]),
    st.sampled_from(["/", "/a", "/a/../b", "/a%2Fb", "/a%00b"]),
    st.sampled_from(["", "203.0.113.7", "198.51.100.1"]),
    st.sampled_from(["app=orders", "app=billing"]),
    st.sampled_from(sorted(_PROPERTY_TOKENS)),
)


def _property_request(principal: str, path: str, xff: str, labels: str, token: str) -> Request:
    headers = {"x-forwarded-for": xff} if xff else {}
    value = _PROPERTY_TOKENS[token]
    if value is not None:
        headers["authorization"] = f"Bearer {value}"
    return Request(
        source=Peer(address="10.0.0.9", principal=principal),
        http=HttpAttributes(method="GET", host="orders", path=path, headers=headers),
        context_extensions={"namespace": "orders", "labels": labels},
    )


def _property_engine() -> Engine:
    text = _jwt_policy_text(_PROPERTY_KEY, "alice") + "---\n" + POLICIES
    snap = snapshot(text, mesh=MeshConfig(num_trusted_proxies=1))
    clock = FrozenClock(NOW)
    return Engine(
        snap,
        mesh=MeshConfig(num_trusted_proxies=1),
        authenticator=Authenticator(settings=snap.authn_settings, clock=clock),
        clock=clock,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PROPERTY_CHECKS, min_size=1, max_size=8))
def test_a_warm_engine_decides_every_check_as_a_fresh_one(checks: list[tuple[str, ...]]) -> None:
    # The memos (workloads, paths, rules, token results, policy outcomes, kept decisions) only ever
    # save work: after any history of checks, each check is decided as an engine that has seen nothing.
    async def run() -> None:
        warm = _property_engine()
        for _ in range(2):
            for check in checks:
                request = _property_request(*check)
                expected = await _property_engine().check(request)
                now = warm.check_now(request)
                waited = await warm.check(request)
                assert _fields(waited) == _fields(expected)
                if now is not None:
                    assert _fields(now) == _fields(expected)

    asyncio.run(run())

"""The engine's own steps: workload scoping, remote.ip, peer identity, fail closed, decision log."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from authz.authn import Authenticator
from authz.authn.testing import SigningKey, jwks_document
from authz.clock import FrozenClock
from authz.config import MeshConfig
from authz.decision_log import DecisionLog
from authz.engine import Engine, remote_ip
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


async def test_internal_error_fails_closed_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine()

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr("authz.engine.evaluate", boom)
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
    jwks = json.dumps(jwks_document(key))
    return snapshot(
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

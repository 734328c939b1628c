"""The ``authz`` command. Each command group lives beside the code it drives and registers itself here.

Only this module (and the ``cli`` modules it imports) reads files, flags and the environment.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# Modules that expose ``register(subparsers) -> None``. Each adds its sub-commands with
# ``set_defaults(func=...)``, where ``func(args) -> int`` returns the exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "authz.server.cli",
    "authz.policy_cli",
    "authz.proxy.cli",
    "authz.identity.cli",
    "authz.idp.cli",
    "authz.envoy.config_cli",
    "authz.launcher.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz",
        description="meshauthz: Istio-compatible external authorization for Envoy and a bundled proxy",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    code: int = func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``authz ca``: create a development CA and issue X.509-SVIDs from it.

    authz ca init --trust-domain TD --out DIR [--validity 365d] [--force]
    authz ca issue spiffe://TD/ns/NS/sa/SA --ca DIR --out DIR [--validity 24h] [--dns NAME]...

Exit codes: 0 done; 1 refused (malformed SPIFFE ID, another trust domain, unreadable CA, existing CA
without ``--force``, unwritable directory), with ``authz ca: error: ...`` on stderr; 2 bad usage
(argparse).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from authz.errors import AuthzError, ConfigError
from authz.identity.ca import (
    CA_KEY_FILE,
    DEFAULT_CA_VALIDITY,
    DEFAULT_SVID_VALIDITY,
    create_ca,
    issue_svid,
    load_ca,
    write_ca,
    write_svid,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "parse_duration", "register"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION = timedelta(days=3650)  # ten years: beyond that a "dev" certificate is a mistake


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``365d`` or a concatenation (``1h30m``); positive, at most ten years."""
    spec = text.strip()
    pos, total = 0, 0
    for match in _DURATION.finditer(spec):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not spec or pos != len(spec) or total <= 0:
        raise ConfigError(
            f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 365d, 1h30m)",
            field="validity",
            reason="invalid_validity",
        )
    if total > _MAX_DURATION.total_seconds():
        raise ConfigError(
            f"validity {text!r} is longer than ten years", field="validity", reason="invalid_validity"
        )
    return timedelta(seconds=total)


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _error(exc: AuthzError) -> int:
    text = str(exc)
    if isinstance(exc, ConfigError) and not exc.file:
        text = f"{exc.field}: {exc.message}" if exc.field else exc.message
    print(f"authz ca: error: {text} [{exc.reason}]", file=sys.stderr)
    return EXIT_ERROR


def _print_files(files: dict[str, Path]) -> None:
    for kind, path in sorted(files.items()):
        print(f"{kind:7} {path}")


def _cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / CA_KEY_FILE).exists() and not args.force:
        return _error(
            ConfigError(
                "a CA already exists here; pass --force to replace it (every SVID it issued stops verifying)",
                file=str(out / CA_KEY_FILE),
                reason="ca_exists",
            )
        )
    try:
        ca = create_ca(args.trust_domain, validity=args.validity)
        files = write_ca(ca, out)
    except AuthzError as exc:
        return _error(exc)
    print(f"created CA for trust domain {ca.trust_domain}")
    _print_files(files)
    return EXIT_OK


def _cmd_issue(args: argparse.Namespace) -> int:
    try:
        ca = load_ca(Path(args.ca))
        svid = issue_svid(ca, args.spiffe_id, validity=args.validity, dns_names=tuple(args.dns))
        files = write_svid(svid, Path(args.out))
    except AuthzError as exc:
        return _error(exc)
    print(f"issued {svid.spiffe_id}")
    _print_files(files)
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``authz ca init`` and ``authz ca issue`` to the ``authz`` command."""
    ca = subparsers.add_parser("ca", help="development CA: mint X.509-SVIDs for mutual TLS")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND")
    ca.set_defaults(func=lambda _args: (ca.print_help(), EXIT_USAGE)[1])

    init = ca_sub.add_parser("init", help="create a self-signed root CA for a trust domain")
    init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. cluster.local")
    init.add_argument("--out", required=True, help="directory for ca-cert.pem and ca-key.pem (0600)")
    init.add_argument(
        "--validity", type=_duration_arg, default=DEFAULT_CA_VALIDITY, help="lifetime, e.g. 365d (default)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    init.set_defaults(func=_cmd_init)

    issue = ca_sub.add_parser("issue", help="issue an X.509-SVID (cert.pem, key.pem, chain.pem, bundle.pem)")
    issue.add_argument("spiffe_id", metavar="SPIFFE_ID", help="spiffe://TD/ns/NS/sa/SA")
    issue.add_argument("--ca", required=True, help="directory written by `authz ca init`")
    issue.add_argument("--out", required=True, help="directory for the SVID files")
    issue.add_argument(
        "--validity", type=_duration_arg, default=DEFAULT_SVID_VALIDITY, help="lifetime, e.g. 24h (default)"
    )
    issue.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="add a DNS SAN (repeatable)"
    )
    issue.set_defaults(func=_cmd_issue)

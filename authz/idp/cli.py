"""``authz idp``: run the mock OpenID Provider. The only module of the package that reads files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from authz.errors import AuthzError, ConfigError, ConfigErrors
from authz.idp.provider import Idp
from authz.idp.server import TlsFiles, serve

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "idp",
        help="run the mock OpenID Provider (development and tests only)",
        description="Serve a mock OIDC/OAuth 2.0 provider. Issuers live at <url>/issuers/<name>.",
    )
    parser.add_argument(
        "--config", type=Path, help="MockIdentityProvider YAML (default: embedded demo config)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to bind (0: any free port)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables HTTPS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="CA bundle for optional client certificates (RFC 8705)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=run)


def load(args: argparse.Namespace) -> Idp:
    if args.config is None:
        return Idp.from_config()
    try:
        text = args.config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(args.config)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8: {exc.reason}", file=str(args.config)) from exc
    return Idp.from_yaml(text, file=str(args.config))


def run(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        print("authz idp: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_client_ca is not None and args.tls_cert is None:
        print("authz idp: --tls-client-ca needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    try:
        idp = load(args)
    except (ConfigError, ConfigErrors) as exc:
        print(f"authz idp: {exc}", file=sys.stderr)
        return 2
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None

    def announce(url: str) -> None:
        for issuer in idp.issuers.values():
            print(f"issuer {issuer.name}: {issuer.issuer_url}", file=sys.stderr)
            for client in issuer.clients.values():
                if client.secret_generated:
                    print(
                        f"  client {client.client_id}: generated secret {client.client_secret}",
                        file=sys.stderr,
                    )
        print(f"mock IdP listening on {url}", file=sys.stderr)

    try:
        serve(idp, host=args.host, port=args.port, tls=tls, log_level=args.log_level, announce=announce)
    except (OSError, AuthzError) as exc:
        print(f"authz idp: {exc}", file=sys.stderr)
        return 1
    return 0

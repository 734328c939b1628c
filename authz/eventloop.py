"""The event loop the long-running commands use.

uvloop (a dependency) cuts the per-request CPU of the Protocol-based data paths (the bundled proxy, the
HTTP ext_authz front). grpc.aio is the exception: behind Envoy, a gRPC-only ``authz serve`` measured
215 us CPU per check on asyncio's loop against 240 us on uvloop (a bare allow-all grpc.aio server: 153 and
130 us), so a process that serves gRPC and not HTTP runs on asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, uvloop_preferred: bool = True) -> T:
    if uvloop_preferred:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; kept for platforms without wheels
            pass
        else:
            result: T = uvloop.run(main)
            return result
    return asyncio.run(main)

"""The per-request code compiled with mypyc, and the guard that never lets a stale build run.

``make`` compiles the modules in :data:`COMPILED` with mypyc (``tools/build_native.py``): the same typed
sources, as C extension modules next to them (one shared library, ``authz/_native__mypyc``), plus a
manifest of the SHA-256 of each source they were built from and of all the package's sources. Python
loads an extension module in preference to its source, so :func:`guard` runs first (from
``authz/__init__.py``, before any of those modules can be imported): unless the manifest matches the
sources as they are now, they all load from source.
Changing a source file therefore never runs old compiled code; ``make`` rebuilds.

``MESHAUTHZ_PURE_PYTHON=1`` loads the sources even when the build is fresh (``make test`` runs the tests of
these modules both ways). Without a C compiler or mypyc there is no build and everything is pure Python.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED", "MANIFEST", "PURE_PYTHON_ENV", "SourceFirst", "guard", "manifest_for", "status"]

COMPILED = (
    # the bundled proxy's data path: codec, connections, listener, sidecar and their helpers
    "authz.proxy.http1",
    "authz.proxy.channel",
    "authz.proxy.pool",
    "authz.proxy.listener",
    "authz.proxy.message",
    "authz.proxy.cluster",
    "authz.proxy.sidecar",
    "authz.proxy.telemetry",
    "authz.proxy.xfcc",
    "authz.proxy.paths",
    "authz.proxy.metrics",
    # the decision's module (its classes stay regular Python classes), and the token's keys
    "authz.decision",
    "authz.authn.jwk",
    "authz.authn.jwks",
    # a warm check: the engine, authentication from the verified-token cache, evaluation
    "authz.engine",
    "authz.authn.authenticator",
    "authz.policy.evaluate",
    "authz.policy.normalize",
    "authz.identity.peer",
    "authz.loop_metrics",
    # the HTTP ext_authz front
    "authz.server.http_ext_authz",
)
"""The modules compiled, by name: what runs for every request."""
MANIFEST = "_native.json"
PURE_PYTHON_ENV = "MESHAUTHZ_PURE_PYTHON"

_status = ["pure Python (not built)"]  # set by guard()


def _source(root: Path, module: str) -> Path:
    """The source file of ``module`` (a dotted name under the package whose directory is ``root``)."""
    return root.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(root: Path, modules: Sequence[str]) -> dict[str, object]:
    """The manifest of a build of ``modules``: each source's SHA-256 by module name, and one SHA-256 over
    every source of the package (compiled code relies on the types of the modules it imports, compiled or
    not: any change there makes the build stale too)."""
    package = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        package.update(f"{path.relative_to(root)}\0".encode())
        package.update(path.read_bytes())
    return {
        "modules": {name: _digest(_source(root, name)) for name in modules},
        "package": package.hexdigest(),
    }


class SourceFirst(importlib.abc.MetaPathFinder):
    """Loads the named modules from their ``.py`` source even where a compiled build sits beside it."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _reason_not_to_use(root: Path, modules: Sequence[str]) -> str:
    """Why the compiled modules must not be used ("" when they may)."""
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return f"{PURE_PYTHON_ENV}=1"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not any(_source(root, name).with_suffix(suffix).exists() for name in modules for suffix in suffixes):
        return "not built"
    try:
        built = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no manifest"
    if built != manifest_for(root, modules):
        return "stale: a source changed since the build (run make)"
    return ""


def guard(root: Path, modules: Sequence[str] = COMPILED) -> bool:
    """Decide, before any of them is imported, whether ``modules`` (dotted names under the package whose
    directory is ``root``) run compiled; when not, make them all load from source. True when compiled."""
    reason = _reason_not_to_use(root, modules)
    if not reason:
        _status[0] = "compiled (mypyc)"
        return True
    _status[0] = f"pure Python ({reason})"
    sys.meta_path.insert(0, SourceFirst({name: _source(root, name) for name in modules}))
    return False


def status() -> str:
    """How the per-request code runs: "compiled (mypyc)" or "pure Python (<why>)"."""
    return _status[0]

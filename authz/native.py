"""The proxy's data path compiled with mypyc, and the guard that never lets a stale build run.

``make`` compiles the modules in :data:`COMPILED` with mypyc (``tools/build_native.py``): the same typed
sources, as C extension modules next to them, plus a manifest of the SHA-256 of each source they were
built from. Python loads an extension module in preference to its source, so :func:`guard` runs first (from
``authz/proxy/__init__.py``, before any of those modules is imported): unless the manifest matches every
source as it is now, those modules load from source. Changing a source file therefore never runs old
compiled code; ``make`` rebuilds.

``MESHAUTHZ_PURE_PYTHON=1`` loads the sources even when the build is fresh (the test suite runs the proxy's
tests both ways). Without a C compiler or mypyc there is no build and everything runs as pure Python.
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
    "http1",
    "channel",
    "pool",
    "listener",
    "message",
    "cluster",
    "sidecar",
    "telemetry",
    "xfcc",
    "paths",
    "metrics",
)
"""The modules of ``authz.proxy`` compiled: the per-request path (codec, connections, listener, sidecar)."""
MANIFEST = "_native.json"
PURE_PYTHON_ENV = "MESHAUTHZ_PURE_PYTHON"

_status = ["pure Python (not built)"]  # set by guard()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(package_dir: Path, modules: Sequence[str]) -> dict[str, str]:
    """The manifest of a build of ``modules``: each source's SHA-256, by module name."""
    return {name: _digest(package_dir / f"{name}.py") for name in modules}


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


def _reason_not_to_use(package_dir: Path, modules: Sequence[str]) -> str:
    """Why the compiled modules must not be used ("" when they may)."""
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return f"{PURE_PYTHON_ENV}=1"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not any((package_dir / f"{name}{suffix}").exists() for name in modules for suffix in suffixes):
        return "not built"
    try:
        built = json.loads((package_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no manifest"
    if not isinstance(built, dict) or built.get("modules") != manifest_for(package_dir, modules):
        return "stale: a source changed since the build (run make)"
    return ""


def guard(package: str, package_dir: Path, modules: Sequence[str] = COMPILED) -> bool:
    """Decide, before they are imported, whether ``package``'s ``modules`` run compiled; when not, make them
    load from source. Returns True when the compiled build is used."""
    reason = _reason_not_to_use(package_dir, modules)
    if not reason:
        _status[0] = "compiled (mypyc)"
        return True
    _status[0] = f"pure Python ({reason})"
    finder = SourceFirst({f"{package}.{name}": package_dir / f"{name}.py" for name in modules})
    sys.meta_path.insert(0, finder)
    return False


def status() -> str:
    """How the proxy's data path runs: "compiled (mypyc)" or "pure Python (<why>)"."""
    return _status[0]

"""Compile the proxy's data path with mypyc, in place (``make native``), and write its manifest.

The modules in ``authz.native.COMPILED`` become C extension modules next to their sources (one shared
library, ``authz/proxy/_native__mypyc``), built from the same typed Python; ``authz/proxy/_native.json``
records the SHA-256 of each source, and ``authz.native.guard`` uses the build only while they all match.
Needs a C compiler and mypy (in the test extra). Usage: ``python tools/build_native.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "authz.proxy"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import os

    os.chdir(ROOT)
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    from authz.native import COMPILED, MANIFEST, manifest_for

    package_dir = ROOT / "authz" / "proxy"
    (package_dir / MANIFEST).unlink(missing_ok=True)  # no manifest while the build is not complete
    sources = [f"authz/proxy/{name}.py" for name in COMPILED]
    setup(
        name="meshauthz-native",
        ext_modules=mypycify(sources, opt_level="3", group_name=f"{PACKAGE}._native"),
        script_args=["build_ext", "--inplace", "--build-temp", "build/native", "--quiet"],
    )
    manifest = {"modules": manifest_for(package_dir, COMPILED)}
    (package_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"compiled {len(COMPILED)} modules of {PACKAGE} with mypyc")
    return 0


if __name__ == "__main__":
    sys.exit(main())

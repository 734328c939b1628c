"""Compile the per-request modules with mypyc, in place (``make native``), and write their manifest.

The modules in ``authz.native.COMPILED`` become C extension modules next to their sources (one shared
library, ``authz/_native__mypyc``), built from the same typed Python; ``authz/_native.json`` records the
SHA-256 of each source, and ``authz.native.guard`` uses the build only while they all match. Needs a C
compiler and mypy (in the test extra). Usage: ``python tools/build_native.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    os.environ["MESHAUTHZ_PURE_PYTHON"] = "1"  # importing authz below must not load a build being replaced
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    from authz.native import COMPILED, MANIFEST, manifest_for

    package = ROOT / "authz"
    (package / MANIFEST).unlink(missing_ok=True)  # no manifest while the build is not complete
    sources = [str(Path(*name.split(".")).with_suffix(".py")) for name in COMPILED]
    setup(
        name="meshauthz-native",
        ext_modules=mypycify(sources, opt_level="3", group_name="authz._native"),
        script_args=["build_ext", "--inplace", "--build-temp", "build/native"],
    )
    manifest = manifest_for(package, COMPILED)
    (package / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"compiled {len(COMPILED)} modules with mypyc")
    return 0


if __name__ == "__main__":
    sys.exit(main())

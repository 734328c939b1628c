"""The guard of the compiled (mypyc) build: it runs only while it matches every source it was built from;
otherwise, or when asked (``MESHAUTHZ_PURE_PYTHON=1``), the modules load from source even though an
extension module sits beside them."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import authz
import authz.native
from authz.native import MANIFEST, PURE_PYTHON_ENV, SourceFirst, guard, manifest_for

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A package ``nativepkg`` with one module built: its source, a (broken) extension module beside it,
    and a manifest that matches. Importing the extension would fail: a module that imports came from source.
    """
    monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
    root = tmp_path / "root"
    pkg = root / "nativepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("WHERE = 'source'\n")
    (pkg / f"mod{SUFFIX}").write_bytes(b"not an extension module")
    (pkg / "other.py").write_text("NOT_COMPILED = 1\n")
    (pkg / MANIFEST).write_text(json.dumps(manifest_for(pkg, ["nativepkg.mod"])))
    monkeypatch.syspath_prepend(str(root))
    finders, status = list(sys.meta_path), authz.native.status()
    yield "nativepkg", pkg
    sys.meta_path[:] = finders
    authz.native._status[0] = status
    for name in ("nativepkg.mod", "nativepkg"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def test_a_fresh_build_is_used(package: tuple[str, Path]) -> None:
    name, pkg = package
    assert guard(pkg, [f"{name}.mod"]) is True
    assert authz.native.status() == "compiled (mypyc)"
    assert not any(isinstance(f, SourceFirst) and f"{name}.mod" in f.sources for f in sys.meta_path)


def test_a_changed_source_loads_from_source_not_the_stale_build(package: tuple[str, Path]) -> None:
    name, pkg = package
    (pkg / "mod.py").write_text("WHERE = 'edited source'\n")
    assert guard(pkg, [f"{name}.mod"]) is False
    assert authz.native.status().startswith("pure Python (stale")
    module = importlib.import_module(f"{name}.mod")
    assert module.WHERE == "edited source"
    assert module.__file__ == str(pkg / "mod.py")


def test_a_change_to_a_module_not_compiled_makes_the_build_stale_too(package: tuple[str, Path]) -> None:
    """Compiled code relies on the types of what it imports: any source of the package invalidates it."""
    name, pkg = package
    (pkg / "other.py").write_text("NOT_COMPILED: str = 'a changed type'\n")
    assert guard(pkg, [f"{name}.mod"]) is False
    assert authz.native.status().startswith("pure Python (stale")
    assert importlib.import_module(f"{name}.mod").WHERE == "source"


def test_the_environment_forces_source(package: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    name, pkg = package
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    assert guard(pkg, [f"{name}.mod"]) is False
    assert authz.native.status() == f"pure Python ({PURE_PYTHON_ENV}=1)"
    assert importlib.import_module(f"{name}.mod").WHERE == "source"


@pytest.mark.parametrize("broken", ["missing", "not json", "another build"])
def test_a_build_without_its_manifest_is_not_trusted(package: tuple[str, Path], broken: str) -> None:
    name, pkg = package
    if broken == "missing":
        (pkg / MANIFEST).unlink()
    elif broken == "not json":
        (pkg / MANIFEST).write_text("{")
    else:
        built = json.loads((pkg / MANIFEST).read_text())
        (pkg / MANIFEST).write_text(json.dumps({**built, "modules": {"nativepkg.mod": "0" * 64}}))
    assert guard(pkg, [f"{name}.mod"]) is False
    assert importlib.import_module(f"{name}.mod").WHERE == "source"


def test_no_build_is_pure_python(package: tuple[str, Path]) -> None:
    name, pkg = package
    (pkg / f"mod{SUFFIX}").unlink()
    assert guard(pkg, [f"{name}.mod"]) is False
    assert authz.native.status() == "pure Python (not built)"


def test_the_package_runs_the_build_its_status_names() -> None:
    """Whichever build this test session runs (make test runs both), the compiled modules are what status()
    says, all of them."""
    modules = [importlib.import_module(name) for name in authz.native.COMPILED]
    compiled = {Path(m.__file__ or "").name.endswith(SUFFIX) for m in modules}
    expected = authz.native._reason_not_to_use(Path(authz.__file__).parent, authz.native.COMPILED) == ""
    assert compiled == {expected}
    assert authz.native.status().startswith("compiled" if expected else "pure Python")

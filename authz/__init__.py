"""meshauthz: an Istio-compatible external authorizer for Envoy, with a bundled proxy and a mock IdP."""

from pathlib import Path

from authz.native import guard

__version__ = "0.1.0"

# Before any module of the package is imported: the compiled (mypyc) build of the per-request modules runs
# only if it matches their sources as they are now (authz/native.py).
guard(Path(__file__).parent)

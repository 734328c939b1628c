"""Benchmarks of meshauthz against real Envoy, measured side by side in one run (``python -m bench``)."""

__all__: list[str] = []

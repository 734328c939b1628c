"""Test-session settings shared by every test package."""

from __future__ import annotations


def pytest_report_header() -> str:
    """Which build of the per-request modules the tests exercise (authz/native.py)."""
    import authz.native  # importing the package decided the build

    return f"meshauthz per-request modules: {authz.native.status()}"

"""Test-session settings shared by every test package."""

from __future__ import annotations


def pytest_report_header() -> str:
    """Which build of the proxy's data path the tests exercise (authz/native.py)."""
    import authz.native
    import authz.proxy  # importing the package decides the build

    return f"meshauthz proxy data path: {authz.native.status()}"

"""The reliability suite: marker ``reliability``, and the one-line figures each scenario reports.

Each scenario calls ``figures.record(name, **numbers)``; the lines are printed at the end of the run by
``pytest_terminal_summary`` (no ``-s`` needed), so CI logs carry the table ``docs/reliability.md`` quotes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.soak import SOAK, SOAK_FACTOR

_LINES: list[str] = []


class Figures:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def record(self, scenario: str, **numbers: object) -> str:
        parts = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
        line = f"{scenario}: {parts}"
        _LINES.append(line)
        return line


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield Figures(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LINES:
        return
    mode = f"soak x{SOAK_FACTOR}" if SOAK else "ci"
    terminalreporter.section(f"reliability figures ({mode})")
    for line in _LINES:
        terminalreporter.write_line(line)

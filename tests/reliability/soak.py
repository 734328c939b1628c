"""``MESHAUTHZ_SOAK=1`` runs the long soak: every count and duration of the suite is multiplied by
:data:`SOAK_FACTOR`. CI runs the short version (the whole suite in well under three minutes)."""

from __future__ import annotations

import os

SOAK_FACTOR = 10
SOAK = os.environ.get("MESHAUTHZ_SOAK", "") not in ("", "0")


def scaled(n: int) -> int:
    return n * SOAK_FACTOR if SOAK else n


def scaled_seconds(s: float) -> float:
    return s * SOAK_FACTOR if SOAK else s

"""A bounded LRU of verified tokens, so a repeated token costs a dictionary look-up, not a signature check.

An entry never outlives the token's ``exp`` (nor ``MAX_ENTRY_TTL``). The cache only answers "was this
token verified, and until when"; the caller must also check that the key which verified it is still in
the issuer's current key set (:attr:`VerifiedToken.key_fingerprint`), so a key removed by rotation
revokes its cached tokens at once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

from authz.metrics import TOKEN_CACHE

__all__ = ["CACHE_HITS", "DEFAULT_MAX_ENTRIES", "MAX_ENTRY_TTL", "TtlLru", "token_digest"]

DEFAULT_MAX_ENTRIES = 10_000  # ~10k active callers per authorizer; a few MiB of memory at most
MAX_ENTRY_TTL = 300.0  # re-verify at least every 5 minutes, whatever the token's exp says

V = TypeVar("V")

CACHE_HITS = TOKEN_CACHE.labels(result="hit")
"""Counts a hit, also one answered from a memo in front of the cache (the token verified and valid)."""
_MISS = TOKEN_CACHE.labels(result="miss")


def token_digest(token: str) -> bytes:
    """The cache key part for a token: its SHA-256, so raw tokens are not kept as keys."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TtlLru(Generic[V]):
    """LRU with a per-entry deadline. Not thread-safe; used from one event loop."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *, count_metrics: bool = True) -> None:
        self.max_entries = max_entries
        self.count_metrics = count_metrics
        self._entries: OrderedDict[object, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object, now: float) -> V | None:
        entry = self.get_entry(key, now)
        return None if entry is None else entry[0]

    def get_entry(self, key: object, now: float) -> tuple[V, float] | None:
        """The value under ``key`` and the time it expires, or ``None`` (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            if self.count_metrics:
                _MISS.inc()
            return None
        if now >= entry[1]:
            del self._entries[key]
            if self.count_metrics:
                _MISS.inc()
            return None
        self._entries.move_to_end(key)
        if self.count_metrics:
            CACHE_HITS.inc()
        return entry

    def put(self, key: object, value: V, *, now: float, expires_at: float | None, max_ttl: float) -> None:
        deadline = now + max_ttl if expires_at is None else min(expires_at, now + max_ttl)
        if deadline <= now:
            return
        self._entries[key] = (value, deadline)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: object) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

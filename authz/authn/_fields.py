"""Typed reading of resource fields that collects every mistake as a :class:`ConfigError`.

Shared by :mod:`authz.authn.model` (Istio kinds) and :mod:`authz.authn.settings` (our extension kind).
Each reader returns a usable default after recording an error, so one load reports all mistakes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from authz.errors import ConfigError
from authz.resources import FieldPath, Resource

__all__ = ["FieldReader", "parse_duration"]

# Go ``time.ParseDuration`` units (Kubernetes/Istio duration strings such as ``5s``, ``1m30s``, ``10ms``).
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
MAX_URI_LENGTH = 2048  # istio validation.go ParseJwksURI / CRD maxLength on jwksUri


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration string (``1m30s``, ``250ms``), or ``None`` if it is not one."""
    text = text.strip()
    if not text:
        return None
    pos = 0
    total = 0.0
    while pos < len(text):
        m = _DURATION_RE.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


class FieldReader:
    """Reads fields of one resource, appending a located :class:`ConfigError` for each mistake."""

    def __init__(self, resource: Resource, errors: list[ConfigError]) -> None:
        self.resource = resource
        self.errors = errors

    def fail(self, path: FieldPath, message: str) -> None:
        self.errors.append(self.resource.error(path, message))

    def mapping(self, value: Any, path: FieldPath, known: Iterable[str]) -> Mapping[str, Any]:
        """A mapping whose keys are all in ``known`` (unknown fields are errors, as with a strict CRD)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "must be a mapping")
            return {}
        allowed = set(known)
        for key in value:
            if key not in allowed:
                self.fail((*path, key), f"unknown field {key!r} (known: {', '.join(sorted(allowed))})")
        return value

    def string(self, obj: Mapping[str, Any], key: str, path: FieldPath, *, required: bool = False) -> str:
        value = obj.get(key)
        if value is None:
            if required:
                self.fail((*path, key), "is required")
            return ""
        if not isinstance(value, str):
            self.fail((*path, key), "must be a string")
            return ""
        if required and not value:
            self.fail((*path, key), "must not be empty")
        return value

    def boolean(self, obj: Mapping[str, Any], key: str, path: FieldPath, default: bool = False) -> bool:
        value = obj.get(key, default)
        if not isinstance(value, bool):
            self.fail((*path, key), "must be true or false")
            return default
        return value

    def number(
        self, obj: Mapping[str, Any], key: str, path: FieldPath, default: float, *, minimum: float = 0.0
    ) -> float:
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail((*path, key), "must be a number")
            return default
        if value < minimum:
            self.fail((*path, key), f"must be at least {minimum:g}")
            return default
        return float(value)

    def duration(
        self, obj: Mapping[str, Any], key: str, path: FieldPath, default: float, *, positive: bool = False
    ) -> float:
        """A Go duration string (``30s``); plain numbers are rejected to keep units explicit."""
        value = obj.get(key)
        if value is None:
            return default
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.fail((*path, key), f"must be a duration such as '5s' or '250ms', got {value!r}")
            return default
        if positive and seconds <= 0:
            self.fail((*path, key), "must be greater than zero")
            return default
        return seconds

    def string_list(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: FieldPath,
        *,
        max_items: int | None = None,
        unique: bool = False,
    ) -> tuple[str, ...]:
        """A list of non-empty strings."""
        value = obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail((*path, key), "must be a list of strings")
            return ()
        if max_items is not None and len(value) > max_items:
            self.fail((*path, key), f"must have at most {max_items} items, has {len(value)}")
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail((*path, key, i), "must be a non-empty string")
                continue
            if unique and item in out:
                self.fail((*path, key, i), f"duplicate value {item!r}")
                continue
            out.append(item)
        return tuple(out)

    def objects(self, obj: Mapping[str, Any], key: str, path: FieldPath) -> list[tuple[FieldPath, Any]]:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail((*path, key), "must be a list")
            return []
        return [((*path, key, i), item) for i, item in enumerate(value)]

    def http_url(self, value: str, path: FieldPath) -> bool:
        """Istio ``ParseJwksURI``: scheme http or https, a host, a numeric port if any, ≤2048 chars."""
        if len(value) > MAX_URI_LENGTH:
            self.fail(path, f"must be at most {MAX_URI_LENGTH} characters")
            return False
        try:
            parts = urlsplit(value)
            _ = parts.port
        except ValueError as exc:
            self.fail(path, f"invalid URL {value!r}: {exc}")
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(path, f"must be an http:// or https:// URL with a host, got {value!r}")
            return False
        try:
            ip = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return True
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            # istio jwks_resolver.go jwksBlockedIP: link-local (cloud metadata 169.254.169.254) is refused.
            self.fail(path, f"refusing a link-local, multicast or unspecified address: {parts.hostname}")
            return False
        return True

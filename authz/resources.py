"""Kubernetes-style YAML resources with source positions, so every error names file, line and field.

Policy files are multi-document YAML (``---``), in a folder tree. Each document becomes a
:class:`Resource` holding plain Python data plus a map from field paths to line numbers. Kind-specific
parsing (AuthorizationPolicy, RequestAuthentication, our extension kinds) lives with each kind and
reports mistakes through :meth:`Resource.error`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz.errors import ConfigError, ConfigErrors

__all__ = ["FieldPath", "Resource", "iter_policy_files", "load_resources", "parse_documents"]

FieldPath = tuple[str | int, ...]

YAML_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 4 * 1024 * 1024  # a policy file larger than this is a mistake, not a policy


@dataclass(frozen=True)
class Resource:
    """One YAML document: ``apiVersion``, ``kind``, ``metadata`` and ``spec`` with positions."""

    api_version: str
    kind: str
    name: str
    namespace: str
    annotations: Mapping[str, str]
    labels: Mapping[str, str]
    spec: Any
    file: str
    line: int
    positions: Mapping[FieldPath, int] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    """The whole document (``metadata``, ``spec`` and any other top-level key such as ``tests``)."""

    def line_of(self, path: FieldPath) -> int:
        """Line of the deepest known ancestor of ``path`` (``("spec", "rules", 0, "from")``)."""
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.line

    def error(self, path: FieldPath, message: str, *, reason: str | None = None) -> ConfigError:
        """A :class:`ConfigError` naming this resource's file, the line of ``path`` and the field."""
        return ConfigError(
            f"{self.kind} {self.namespace}/{self.name}: {message}",
            file=self.file,
            line=self.line_of(path),
            field=format_path(path),
            reason=reason,
        )


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps plain data; positions are collected from the composed node tree."""


def _construct(node: yaml.Node, loader: yaml.SafeLoader, path: FieldPath, pos: dict[FieldPath, int]) -> Any:
    pos[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise ConfigError(
                    "mapping keys must be scalars",
                    line=key_node.start_mark.line + 1,
                    field=format_path(path),
                )
            k = str(key)
            if k in out:
                raise ConfigError(
                    f"duplicate key {k!r}",
                    line=key_node.start_mark.line + 1,
                    field=format_path((*path, k)),
                )
            out[k] = _construct(value_node, loader, (*path, k), pos)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, loader, (*path, i), pos) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_documents(text: str, file: str = "<string>") -> list[Resource]:
    """Parse a (multi-document) YAML string into resources. Raises :class:`ConfigErrors`."""
    errors: list[ConfigError] = []
    out: list[Resource] = []
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # e.g. control characters, rejected by the reader before parsing
        raise ConfigErrors([ConfigError(f"YAML syntax error: {exc}", file=file)]) from None
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            pos: dict[FieldPath, int] = {}
            try:
                data = _construct(node, loader, (), pos)
            except ConfigError as exc:
                exc.file = file
                errors.append(exc)
                continue
            if data is None:
                continue
            line = node.start_mark.line + 1
            try:
                out.append(_to_resource(data, file, line, pos))
            except ConfigError as exc:
                errors.append(exc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(
            ConfigError(f"YAML syntax error: {problem}", file=file, line=(mark.line + 1) if mark else 0)
        )
    finally:
        loader.dispose()
    if errors:
        raise ConfigErrors(errors)
    return out


def _to_resource(data: Any, file: str, line: int, pos: Mapping[FieldPath, int]) -> Resource:
    if not isinstance(data, dict):
        raise ConfigError("a document must be a mapping with apiVersion and kind", file=file, line=line)
    api_version = data.get("apiVersion")
    kind = data.get("kind")
    if not isinstance(api_version, str) or not api_version:
        raise ConfigError("apiVersion is required", file=file, line=line, field="apiVersion")
    if not isinstance(kind, str) or not kind:
        raise ConfigError("kind is required", file=file, line=line, field="kind")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ConfigError(
            "metadata must be a mapping", file=file, line=pos.get(("metadata",), line), field="metadata"
        )
    name = meta.get("name", "")
    namespace = meta.get("namespace", "default")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "metadata.name is required", file=file, line=pos.get(("metadata",), line), field="metadata.name"
        )
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(
            "metadata.namespace must be a non-empty string",
            file=file,
            line=pos.get(("metadata", "namespace"), line),
            field="metadata.namespace",
        )
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    for fname, value in (("annotations", annotations), ("labels", labels)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(
                f"metadata.{fname} must map strings to strings",
                file=file,
                line=pos.get(("metadata", fname), line),
                field=f"metadata.{fname}",
            )
    return Resource(
        api_version=api_version,
        kind=kind,
        name=name,
        namespace=namespace,
        annotations=dict(annotations),
        labels=dict(labels),
        spec=data.get("spec"),
        file=file,
        line=line,
        positions=dict(pos),
        body=data,
    )


def iter_policy_files(root: Path) -> Iterator[Path]:
    """YAML/JSON files under ``root`` (a file or a folder), sorted, skipping hidden entries."""
    if root.is_file():
        yield root
        return
    for p in sorted(root.rglob("*")):
        if (
            p.is_file()
            and p.suffix in YAML_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ):
            yield p


def load_resources(roots: Iterable[Path]) -> list[Resource]:
    """Load every resource under ``roots``. Collects all errors and raises :class:`ConfigErrors`."""
    errors: list[ConfigError] = []
    out: list[Resource] = []
    for root in roots:
        if not root.exists():
            errors.append(ConfigError("no such file or folder", file=str(root)))
            continue
        for path in iter_policy_files(root):
            try:
                raw = path.read_bytes()
                if len(raw) > MAX_FILE_BYTES:
                    raise ConfigError(f"file is larger than {MAX_FILE_BYTES} bytes", file=str(path))
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(ConfigError(f"not UTF-8: {exc.reason}", file=str(path)))
                continue
            except ConfigError as exc:
                errors.append(exc)
                continue
            except OSError as exc:
                errors.append(ConfigError(f"cannot read: {exc.strerror}", file=str(path)))
                continue
            try:
                out.extend(parse_documents(text, str(path)))
            except ConfigErrors as exc:
                errors.extend(exc.errors)
    if errors:
        raise ConfigErrors(errors)
    return out

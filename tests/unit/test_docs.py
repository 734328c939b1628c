"""Every example in the README and docs/ is exercised: YAML parses and loads, commands parse with the real
CLI, fragments are taken from the files they name, JSON samples have the fields the code writes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.cli import build_parser
from authz.config import MeshConfig, parse_mesh_config
from authz.decision import Decision
from authz.decision_log import decision_record
from authz.policy.testing import load_policy_tests, run_policy_tests
from authz.policy_cli import upstream_headers_for
from authz.request import Request, Workload
from authz.resources import parse_documents
from authz.server.grpc_ext_authz import denied_body
from authz.snapshot import build_snapshot

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
POLICY_KINDS = {
    "AuthorizationPolicy",
    "RequestAuthentication",
    "JWTIssuerSettings",
    "AuthorizationPolicyTest",
}


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text(encoding="utf-8")):
            if m.group(1) == lang:
                out.append((f"{doc.name}:{doc.read_text()[: m.start()].count(chr(10)) + 1}", m.group(2)))
    return out


def test_docs_have_examples() -> None:
    assert len(blocks("yaml")) >= 8 and len(blocks("sh")) >= 4 and len(blocks("json")) >= 2


@pytest.mark.parametrize(("where", "text"), blocks("yaml"), ids=[w for w, _ in blocks("yaml")])
def test_yaml_examples(where: str, text: str) -> None:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert docs, where
    first = text.splitlines()[0]
    if m := re.match(r"# from ([^\s:]+)", first):
        source = (ROOT / m.group(1)) if (ROOT / m.group(1)).exists() else (ROOT / "docs" / m.group(1))
        full = yaml.safe_load(source.read_text())
        assert contains(full, docs[0]), f"{where}: fragment is not part of {source}"
        return
    kinds = {d.get("kind") for d in docs if isinstance(d, dict)}
    if kinds & POLICY_KINDS:
        resources = parse_documents(text, where)
        snapshot = build_snapshot(resources, MeshConfig(), generation=1, loaded_at=0.0)
        cases = load_policy_tests(resources)
        if cases:
            report = run_policy_tests(
                snapshot.policies, cases, upstream_headers=upstream_headers_for(snapshot)
            )
            assert report.ok, report.format(verbose=True)
    elif "Deployment" in kinds:
        (container,) = docs[0]["spec"]["template"]["spec"]["containers"]
        build_parser().parse_args([str(a) for a in container["args"]])
    elif isinstance(docs[0], dict) and not docs[0].get("apiVersion"):
        parse_mesh_config(docs[0], where)  # a MeshConfig
    else:
        pytest.fail(f"{where}: unrecognised example, teach this test what it is")


def contains(tree: Any, fragment: Any) -> bool:
    """``fragment`` equals a sub-tree of ``tree`` (mappings may be partial; lists must match)."""
    if subset(fragment, tree):
        return True
    if isinstance(tree, dict):
        return any(contains(v, fragment) for v in tree.values())
    if isinstance(tree, list):
        return any(contains(v, fragment) for v in tree)
    return False


def subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(subset, small, big))
    return bool(small == big)


SH = [(w, line) for w, text in blocks("sh") for line in text.splitlines() if line.startswith("authz ")]


@pytest.mark.parametrize(("where", "line"), SH, ids=[f"{w}:{line[:40]}" for w, line in SH])
def test_shell_examples_parse_with_the_real_cli(where: str, line: str) -> None:
    argv = shlex.split(line.split("#", 1)[0])[1:]
    args = build_parser().parse_args(argv)
    assert getattr(args, "func", None) is not None, where


def test_json_samples_have_the_fields_the_code_writes() -> None:
    decision = Decision(allowed=False, status=403, reason="denied_by_policy")
    body_keys = set(json.loads(denied_body(decision)))
    log_keys = set(decision_record(decision, Request(), Workload(), now=0.0, latency_s=0.0))
    seen = set()
    for where, text in blocks("json"):
        keys = set(json.loads(text))
        assert keys in (body_keys, log_keys), where
        seen.add(frozenset(keys))
    assert seen == {frozenset(body_keys), frozenset(log_keys)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_local_links_exist(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"

"""Loading AuthorizationPolicy: webhook rules rejected with file:line:field, lint warnings."""

from __future__ import annotations

import textwrap

import pytest

from authz.errors import ConfigErrors
from authz.policy.model import Action, PolicyWarning, load_authorization_policies, parse_claim_path
from authz.resources import parse_documents


def load(text: str) -> tuple[list, list[PolicyWarning]]:  # type: ignore[type-arg]
    return load_authorization_policies(parse_documents(textwrap.dedent(text), "p.yaml"))


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as exc:
        load(text)
    return [str(e) for e in exc.value.errors]


HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
"""


def test_both_api_versions_and_other_kinds_ignored() -> None:
    policies, _ = load(
        HEAD
        + "spec: {}\n---\n"
        + HEAD.replace("v1\n", "v1beta1\n").replace("name: p", "name: q")
        + "spec: {action: DENY, rules: [{}]}\n---\n"
        + "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\nspec: {}\n"
    )
    assert [(p.name, p.action, p.rules) for p in policies] == [
        ("p", Action.ALLOW, None),
        ("q", Action.DENY, (policies[1].rules[0],)),
    ]
    assert policies[1].rules[0].sources is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # istio validation.go ValidateAuthorizationPolicy
        (
            "spec: {action: DENY}",
            "p.yaml:4: spec.rules: AuthorizationPolicy ns/p: DENY action without `rules`",
        ),
        ("spec: {action: CUSTOM, rules: [{}]}", "p.yaml:4: spec.provider: "),
        ("spec: {action: AUDIT, provider: {name: x}, rules: [{}]}", "spec.provider: "),
        ("spec:\n  rules:\n  - from: []\n", "p.yaml:6: spec.rules[0].from: "),
        ("spec:\n  rules:\n  - to:\n    - operation: {}\n", "p.yaml:7: spec.rules[0].to[0].operation: "),
        (
            "spec:\n  rules:\n  - from:\n    - source: {principals: ['']}\n",
            "spec.rules[0].from[0].source.principals[0]: ",
        ),
        ("spec:\n  rules:\n  - from:\n    - source: {ipBlocks: ['10.0.0.300']}\n", "invalid IP"),
        ("spec:\n  rules:\n  - from:\n    - source: {remoteIpBlocks: ['1.2.3.0/33']}\n", "invalid IP"),
        ("spec:\n  rules:\n  - to:\n    - operation: {ports: ['70000']}\n", "invalid port"),
        ("spec:\n  rules:\n  - to:\n    - operation: {ports: [80]}\n", "must be a string"),
        (
            "spec:\n  rules:\n  - to:\n    - operation: {paths: ['/foo/{*}.txt']}\n",
            "invalid or unsupported path",
        ),
        ("spec:\n  rules:\n  - to:\n    - operation: {paths: ['/a/{**}/b/{*}']}\n", "{**} is not the last"),
        ("spec:\n  rules:\n  - to:\n    - operation: {paths: ['/a/{x}']}\n", "beyond a supported"),
        (
            "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: [a], principals: [b]}\n",
            "serviceAccounts cannot be set with principals",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source: {serviceAccounts: ['a*']}\n",
            "wildcards are not supported",
        ),
        (
            "spec:\n  rules:\n  - from:\n    - source: {trustDomains: ['a*b']}\n",
            "only supported at the start",
        ),
        ("spec:\n  rules:\n  - when:\n    - key: request.time\n      values: [x]\n", "unknown attribute"),
        ("spec:\n  rules:\n  - when:\n    - key: destination.labels[app]\n      values: [x]\n", "selector"),
        ("spec:\n  rules:\n  - when:\n    - key: source.ip\n", "at least one of `values`"),
        ("spec:\n  rules:\n  - when:\n    - key: request.headers[]\n      values: [x]\n", "invalid key"),
        ("spec:\n  rules:\n  - when:\n    - key: request.auth.claims\n      values: [x]\n", "invalid key"),
        ("spec:\n  rules:\n  - when:\n    - key: destination.port\n      values: [http]\n", "invalid port"),
        ("spec:\n  rules: [null]\n", "`rule` must not be nil"),
        ("spec:\n  rule: []\n", "unknown field 'rule'"),
        ("spec:\n  rules:\n  - from:\n    - source: {principal: [a]}\n", "unknown field 'principal'"),
        ("spec: {action: PERMIT}", "unknown action"),
        ("spec: {selector: {matchLabels: {app: '*'}}}", "wildcard is not supported"),
        (
            "spec: {selector: {matchLabels: {app: a}}, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]}",  # noqa: E501
            "only one of",
        ),
        (
            "spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - from:\n    - source: {principals: [a]}\n",  # noqa: E501
            "not supported with CUSTOM",
        ),
        (
            "spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - when:\n    - key: request.auth.claims[x]\n      values: [a]\n",  # noqa: E501
            "not supported with CUSTOM",
        ),
    ],
)
def test_webhook_errors(spec: str, expected: str) -> None:
    errors = errors_of(HEAD + spec)
    assert any(expected in e for e in errors), errors


def test_dry_run_annotation_rules() -> None:
    def meta(value: str, action: str) -> str:
        return (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata:\n  name: p\n  annotations:\n    istio.io/dry-run: '{value}'\n"
            f"spec: {{action: {action}, rules: [{{}}]}}\n"
        )

    policies, _ = load(meta("true", "DENY"))
    assert policies[0].dry_run is True
    policies, _ = load(meta("F", "ALLOW"))
    assert policies[0].dry_run is False
    assert any("only supported for ALLOW and DENY" in e for e in errors_of(meta("true", "AUDIT")))
    errors = errors_of(meta("yes", "ALLOW"))
    assert errors == [
        "p.yaml:6: metadata.annotations.istio.io/dry-run: AuthorizationPolicy default/p: "
        "invalid istio.io/dry-run value 'yes' (want true or false)"
    ]


def test_all_errors_of_a_load_are_collected_with_lines() -> None:
    text = HEAD + textwrap.dedent(
        """\
        spec:
          rules:
          - from:
            - source:
                ipBlocks: ["nope"]
            to:
            - operation:
                ports: ["-1"]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: other, namespace: ns}
        spec: {action: DENY}
        """
    )
    errors = errors_of(text)
    assert len(errors) == 3
    assert errors[0].startswith("p.yaml:8: spec.rules[0].from[0].source.ipBlocks: ")
    assert errors[1].startswith("p.yaml:11: spec.rules[0].to[0].operation.ports: ")
    assert errors[2].startswith("p.yaml:16: spec.rules: AuthorizationPolicy ns/other")


def test_duplicate_names_are_rejected() -> None:
    errors = errors_of(HEAD + "spec: {}\n---\n" + HEAD + "spec: {}\n")
    assert any("duplicate AuthorizationPolicy ns/p" in e for e in errors)


def test_when_keys_parsed() -> None:
    policies, _ = load(
        HEAD
        + textwrap.dedent(
            """\
            spec:
              rules:
              - when:
                - key: request.headers[X-Token]
                  values: ["a"]
                - key: request.auth.claims[nested][key]
                  values: ["b"]
                - key: experimental.envoy.filters.http.foo[bar]
                  values: ["[c]"]
                - key: connection.sni
                  notValues: ["x"]
            """
        )
    )
    conds = policies[0].rules[0].conditions
    assert [(c.attribute, c.key) for c in conds] == [
        ("request.headers", ("x-token",)),
        ("request.auth.claims", ("nested", "key")),
        ("experimental.envoy.filters", ("envoy.filters.http.foo", "bar")),
        ("connection.sni", ()),
    ]


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        # istio pilot/pkg/security/authz/model/util_test.go TestExtractNameInNestedBrackets
        ("[good]", ["good"]),
        ("[good][abc][xyz]", ["good", "abc", "xyz"]),
        ("[]", [""]),
        ("[[good]", ["[good"]),
        ("[good]]", ["good]"]),
        ("[[good]]", ["[good]"]),
        ("[foo.com/name]", ["foo.com/name"]),
    ],
)
def test_claim_path(suffix: str, expected: list[str]) -> None:
    assert parse_claim_path(suffix) == expected


def test_claim_path_invalid() -> None:
    with pytest.raises(ValueError):
        parse_claim_path("x[bad]")


def test_lint_warnings() -> None:
    _, warnings = load(
        HEAD
        + textwrap.dedent(
            """\
            spec:
              action: DENY
              rules:
              - from:
                - source:
                    principals: ["spiffe://cluster.local/ns/a/sa/b"]
                    requestPrincipals: ["https://sts.windows.net/tid//alice"]
                to:
                - operation:
                    hosts: ["example.com", "*.example.int:*"]
                    paths: ["/service/*health"]
                when:
                - key: request.auth.claims[admin]
                  values: ["true"]
            """
        )
    )
    codes = sorted(w.code for w in warnings)
    assert codes == [
        "host_port_wildcard",
        "host_without_port",
        "middle_wildcard",
        "non_string_claim",
        "request_principal_ambiguous",
        "spiffe_prefix",
        "tcp_widened",
    ]
    by_code = {w.code: w for w in warnings}
    assert str(by_code["spiffe_prefix"]).startswith(
        "p.yaml:9: warning: spec.rules[0].from[0].source.principals: "
    )
    assert by_code["tcp_widened"].line == 7


def test_no_warnings_for_clean_policy() -> None:
    _, warnings = load(
        HEAD + "spec:\n  rules:\n  - to:\n    - operation: {hosts: [a.com, 'a.com:*'], paths: ['/x/{**}']}\n"
    )
    assert warnings == []

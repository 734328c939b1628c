from __future__ import annotations

import authz.idp
import authz.idp.mint


def test_public_names_are_exactly_the_intended_ones() -> None:
    assert set(authz.idp.__all__) == {
        "Idp",
        "IdpConfig",
        "Issuer",
        "RunningIdp",
        "TlsFiles",
        "default_config",
        "parse_config",
        "running_idp",
    }
    assert set(authz.idp.mint.__all__) == {"Idp", "Issuer", "RunningIdp", "mint", "running_idp"}
    for name in authz.idp.__all__:
        assert getattr(authz.idp, name) is not None


def test_idp_imports_only_shared_values_and_its_own_modules() -> None:
    """STYLE: idp sits beside server and proxy; it must not reach into authn, identity, policy or engine."""
    import ast
    from pathlib import Path

    allowed = ("authz.idp", "authz.errors", "authz.clock", "authz.resources")
    for path in Path(authz.idp.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("authz"):
                assert node.module.startswith(allowed), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("authz") or alias.name.startswith(allowed)


def test_mint_helper_uses_the_embedded_default() -> None:
    import jwt

    idp = authz.idp.Idp.from_config()
    token = authz.idp.mint.mint(idp, sub="alice", aud="demo-api", claims={"groups": ["g"]})
    key = idp.issuer().signing_key()
    claims = jwt.decode(token, key.private_key.public_key(), algorithms=["RS256"], audience="demo-api")
    assert (claims["sub"], claims["groups"], claims["iss"]) == (
        "alice",
        ["g"],
        "http://127.0.0.1/issuers/demo",
    )

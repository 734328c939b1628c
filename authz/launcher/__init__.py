"""The local mesh: ``authz run`` starts the mock IdP, the authorizer, demo services and their sidecars on
loopback; ``authz demo`` walks through the story against it."""

__all__: list[str] = []

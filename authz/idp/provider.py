"""The mock OpenID Provider: several issuers sharing one clock and one server URL."""

from __future__ import annotations

from pathlib import Path

from authz.clock import Clock, system_clock
from authz.errors import AuthzError
from authz.idp.config import IdpConfig, default_config, parse_config
from authz.idp.issuer import Issuer

__all__ = ["Idp"]


class Idp:
    """All issuers of one configuration. ``base_url`` is set once the server knows its bound port."""

    def __init__(self, config: IdpConfig, *, clock: Clock = system_clock, base_url: str = "") -> None:
        self.config = config
        self.clock = clock
        self.issuers: dict[str, Issuer] = {
            ic.name: Issuer(ic, clock=clock, base_url=config.public_url or base_url) for ic in config.issuers
        }

    @classmethod
    def from_config(
        cls, config: IdpConfig | None = None, *, clock: Clock = system_clock, base_url: str = ""
    ) -> Idp:
        """An IdP from a parsed config (default: the embedded one). Keys are generated here."""
        return cls(config or default_config(), clock=clock, base_url=base_url)

    @classmethod
    def from_yaml(
        cls, text: str, *, file: str = "<string>", clock: Clock = system_clock, base_url: str = ""
    ) -> Idp:
        return cls(parse_config(text, file), clock=clock, base_url=base_url)

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Clock = system_clock, base_url: str = "") -> Idp:
        p = Path(path)
        return cls.from_yaml(p.read_text(encoding="utf-8"), file=str(p), clock=clock, base_url=base_url)

    @property
    def base_url(self) -> str:
        return next(iter(self.issuers.values())).base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        """Called by the server after binding; a configured ``publicUrl`` wins."""
        for issuer in self.issuers.values():
            issuer.base_url = (self.config.public_url or url).rstrip("/")

    def issuer(self, name: str = "") -> Issuer:
        """The issuer called ``name`` (default: the first configured)."""
        if not name:
            return next(iter(self.issuers.values()))
        try:
            return self.issuers[name]
        except KeyError:
            raise AuthzError(f"no issuer named {name!r}", reason="unknown_issuer") from None

"""DestinationRule TLS origination over real sockets: the proxy takes plain HTTP from the app and speaks TLS
(SIMPLE) or mutual TLS (MUTUAL) to a loopback upstream whose certificates are minted at test time; an
upstream whose certificate does not verify is refused with 503 and response flag UF, as Envoy does."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from authz.errors import AuthzError
from authz.proxy.sidecar import Sidecar
from tests.integration.proxy_upstream import Upstream, echo, service_entry, sidecar_config
from tests.unit.proxy.pki import SERVER_NAME, Pki, make_pki

pytestmark = pytest.mark.integration

PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  accessLog: true
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsUpstream:
    """An h11 upstream behind TLS that records the SNI of every handshake."""

    def __init__(self, cert: Path, key: Path, *, client_ca: Path | None = None) -> None:
        self.server_names: list[str | None] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED

        def remember(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            self.server_names.append(name)

        ctx.sni_callback = remember
        self.upstream = Upstream(echo, ssl_context=ctx)


StartProxy = Callable[[TlsUpstream, str], Awaitable[Sidecar]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    started: list[tuple[Sidecar, Upstream]] = []

    async def start(server: TlsUpstream, tls_yaml: str) -> Sidecar:
        await server.upstream.start()
        rule = (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            "metadata: {name: api, namespace: default}\n"
            f"spec:\n  host: {SERVER_NAME}\n  trafficPolicy:\n{tls_yaml}"
        )
        config = sidecar_config(
            PROXY + "---\n" + service_entry(SERVER_NAME, [server.upstream.port]) + "---\n" + rule
        )
        sidecar = Sidecar(config)  # type: ignore[arg-type]
        await sidecar.start()
        started.append((sidecar, server.upstream))
        return sidecar

    yield start
    for sidecar, upstream in started:
        await sidecar.stop()
        await upstream.close()


async def get(sidecar: Sidecar, path: str = "/hello", n: int = 1) -> list[httpx.Response]:
    assert sidecar.outbound is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sidecar.outbound.port}") as client:
        return [await client.get(path, headers={"host": SERVER_NAME}) for _ in range(n)]


def simple(ca: Path, extra: str = "") -> str:
    return f"    tls:\n      mode: SIMPLE\n      caCertificates: {ca}\n{extra}"


async def test_simple_originates_tls_with_auto_sni_and_pools_the_connection(
    pki: Pki, start_proxy: StartProxy
) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key)
    sidecar = await start_proxy(server, simple(pki.ca))
    responses = await get(sidecar, "/hello?x=1", n=5)
    assert [r.status_code for r in responses] == [200] * 5
    assert json.loads(responses[0].content)["target"] == "/hello?x=1"
    assert server.server_names == [SERVER_NAME]  # Envoy auto_sni: the destination host
    assert server.upstream.connections == 1  # one handshake, kept alive for the five requests


async def test_explicit_sni_is_sent(pki: Pki, start_proxy: StartProxy) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key)
    sidecar = await start_proxy(server, simple(pki.ca, "      sni: custom.example.net\n"))
    assert [r.status_code for r in await get(sidecar)] == [200]
    assert server.server_names == ["custom.example.net"]


async def test_certificate_for_another_name_is_refused_with_uf(
    pki: Pki, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = TlsUpstream(pki.wrong_cert, pki.wrong_key)  # valid chain, but for other.example.org
    sidecar = await start_proxy(server, simple(pki.ca))
    with caplog.at_level(logging.INFO, logger="authz.proxy.access"):
        (r,) = await get(sidecar)
    assert r.status_code == 503
    assert server.upstream.requests == []  # nothing was sent over the unverified connection
    (entry,) = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "authz.proxy.access"]
    assert "UF" in entry["response_flags"].split(",")


async def test_untrusted_chain_is_refused(pki: Pki, start_proxy: StartProxy) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key)
    sidecar = await start_proxy(server, simple(pki.other_ca))
    (r,) = await get(sidecar)
    assert r.status_code == 503 and server.upstream.requests == []


async def test_subject_alt_names_are_checked_instead_of_the_hostname(
    pki: Pki, start_proxy: StartProxy
) -> None:
    wrong_name = TlsUpstream(pki.wrong_cert, pki.wrong_key)
    accepted = await start_proxy(wrong_name, simple(pki.ca, "      subjectAltNames: [other.example.org]\n"))
    assert [r.status_code for r in await get(accepted)] == [200]
    right_name = TlsUpstream(pki.wrong_cert, pki.wrong_key)
    refused = await start_proxy(right_name, simple(pki.ca, f"      subjectAltNames: [{SERVER_NAME}]\n"))
    assert [r.status_code for r in await get(refused)] == [503]
    assert right_name.upstream.requests == []


async def test_insecure_skip_verify_accepts_any_certificate(pki: Pki, start_proxy: StartProxy) -> None:
    server = TlsUpstream(pki.wrong_cert, pki.wrong_key)
    sidecar = await start_proxy(server, "    tls: {mode: SIMPLE, insecureSkipVerify: true}\n")
    assert [r.status_code for r in await get(sidecar)] == [200]


async def test_mutual_presents_the_client_certificate(pki: Pki, start_proxy: StartProxy) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key, client_ca=pki.ca)
    sidecar = await start_proxy(
        server,
        simple(
            pki.ca, f"      clientCertificate: {pki.client_cert}\n      privateKey: {pki.client_key}\n"
        ).replace("SIMPLE", "MUTUAL"),
    )
    responses = await get(sidecar, n=3)
    assert [r.status_code for r in responses] == [200] * 3
    assert server.upstream.requests[0].peer_principal == "spiffe://example.org/client"
    assert server.upstream.connections == 1


async def test_mutual_with_a_certificate_the_upstream_does_not_trust_is_uf(
    pki: Pki, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key, client_ca=pki.ca)
    tls = simple(
        pki.ca, f"      clientCertificate: {pki.foreign_cert}\n      privateKey: {pki.foreign_key}\n"
    )
    sidecar = await start_proxy(server, tls.replace("SIMPLE", "MUTUAL"))
    with caplog.at_level(logging.INFO, logger="authz.proxy.access"):
        (r,) = await get(sidecar)
    assert r.status_code == 503 and server.upstream.requests == []
    (entry,) = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "authz.proxy.access"]
    assert "UF" in entry["response_flags"].split(",")


async def test_port_level_tls_overrides_the_policy(pki: Pki, start_proxy: StartProxy) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key)
    # The policy trusts the wrong CA; the entry for service port 80 (the ServiceEntry's) the right one.
    policy = simple(pki.other_ca) + (
        "    portLevelSettings:\n"
        "    - port: {number: 80}\n"
        f"      tls: {{mode: SIMPLE, caCertificates: {pki.ca}}}\n"
    )
    sidecar = await start_proxy(server, policy)
    assert [r.status_code for r in await get(sidecar)] == [200]


async def test_a_bad_certificate_file_fails_the_reload_and_keeps_the_old_generation(
    pki: Pki, start_proxy: StartProxy, tmp_path: Path
) -> None:
    server = TlsUpstream(pki.server_cert, pki.server_key)
    sidecar = await start_proxy(server, simple(pki.ca))
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    broken = sidecar_config(
        PROXY
        + "---\n"
        + service_entry(SERVER_NAME, [server.upstream.port])
        + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: api, namespace: default}}\nspec:\n  host: {SERVER_NAME}\n  trafficPolicy:\n"
        + simple(bogus)
    )
    with pytest.raises(AuthzError):
        sidecar.reload(broken)  # type: ignore[arg-type]
    assert [r.status_code for r in await get(sidecar)] == [200]

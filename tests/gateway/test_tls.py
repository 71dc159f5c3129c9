"""TLS on both hops: HTTPS to the gateway (with client certificates) and TLS to gRPC."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import trustme

import gateway
from tests.gateway.conftest import EchoServicer, EchoState, echo_options
from tests.gateway.testproto import echo_pb2_grpc

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_backend(authority: trustme.CA) -> AsyncIterator[str]:
    """An EchoService that only speaks TLS."""
    certificate = authority.issue_cert("localhost")
    credentials = grpc.ssl_server_credentials(
        [(certificate.private_key_pem.bytes(), certificate.cert_chain_pems[0].bytes())]
    )
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(EchoState()), server)
    port = server.add_secure_port("localhost:0", credentials)
    await server.start()
    yield f"localhost:{port}"
    await server.stop(None)


async def test_https_with_client_certificates_to_a_tls_grpc_server(
    authority: trustme.CA, tls_backend: str, tmp_path: Path
) -> None:
    server_cert = authority.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    options = echo_options(
        tls_backend, tls=gateway.ClientTLS(root_certificates=authority.cert_pem.bytes())
    )
    tls = gateway.ServerTLS(
        certfile=str(tmp_path / "server.pem"),
        keyfile=str(tmp_path / "server.pem"),
        client_ca_file=str(tmp_path / "ca.pem"),
    )
    server = gateway.HttpServer(gateway.create_app(options), port=0, tls=tls, access_log=False)
    await server.start()
    try:
        trusted = ssl.create_default_context()
        authority.configure_trust(trusted)
        with_cert = ssl.create_default_context()
        authority.configure_trust(with_cert)
        authority.issue_cert("client").configure_cert(with_cert)
        url = f"https://127.0.0.1:{server.port}/v1/echo/secure"
        async with httpx.AsyncClient(verify=with_cert) as client:
            response = await client.get(url)
        assert (response.status_code, response.json()["text"]) == (200, "secure")
        async with httpx.AsyncClient(verify=trusted) as client:
            with pytest.raises((httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError)):
                await client.get(url)
    finally:
        await server.stop()

"""The docs page and its offline assets, the index page, and the health check."""

from __future__ import annotations

import re

import httpx
import pytest
from grpc_health.v1 import health_pb2

import gateway
from tests.gateway.conftest import Backend, Live, echo_options, unused_target

pytestmark = pytest.mark.asyncio


async def test_docs_page_and_its_assets_are_served_locally(live: Live) -> None:
    page = await live.client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'url: "/openapi.json"' in page.text
    # Swagger UI's default would have each reader's browser send the
    # document's address to an online validator.
    assert "validatorUrl: null" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {asset.rsplit("/", 1)[1] for asset in assets} >= {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
    }
    for asset in assets:
        assert asset.startswith("/docs/static/"), asset
        response = await live.client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 100
    bundle = await live.client.get("/docs/static/swagger-ui-bundle.js")
    assert "javascript" in bundle.headers["content-type"]
    # Swagger UI 5 is the first with the OpenAPI 3.1 plugin.
    assert "isOAS31" in bundle.text


async def test_index_links_to_docs_and_names_the_target(
    client: httpx.AsyncClient, backend: Backend
) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert 'href="/docs"' in page.text
    assert '<a href="/openapi.json">OpenAPI document (/openapi.json)</a>' in page.text
    assert backend.target in page.text


async def test_index_names_the_public_target_instead_of_a_private_one() -> None:
    options = echo_options("unix:/run/private.sock", public_target="grpc.example.org:443")
    [page] = await get_each(options, "/")
    assert "grpc.example.org:443" in page.text and "private.sock" not in page.text


async def test_healthz_reports_serving(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "SERVING"})


async def test_healthz_is_503_when_not_serving(client: httpx.AsyncClient, backend: Backend) -> None:
    backend.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (503, {"status": "NOT_SERVING"})


async def test_healthz_is_503_when_the_server_is_down() -> None:
    app = gateway.create_app(echo_options(unused_target(), health_timeout=1.0))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        response = await http.get("/healthz")
    await app.state.gateway.upstream.close()
    assert (response.status_code, response.json()) == (503, {"status": "UNAVAILABLE"})


async def test_openapi_served_at_every_configured_path(backend: Backend) -> None:
    options = echo_options(backend.target, openapi_paths=("/openapi.json", "/api/v1/openapi.json"))
    first, second = await get_each(options, "/openapi.json", "/api/v1/openapi.json")
    assert first.json() == second.json()
    assert first.json()["info"]["title"] == "Echo"


async def test_the_gateways_pages_win_over_bindings_on_their_paths(backend: Backend) -> None:
    # Each page's path is one a binding matches too: GET /v1/count and
    # GET /v1/echo/{text}, and /v1/files/{text=**}:read under the assets.
    options = echo_options(
        backend.target,
        openapi_paths=("/v1/count",),
        health_path="/v1/echo/healthz",
        docs_path="/v1/files",
    )
    document, health, asset, missing, echoed, counted = await get_each(
        options,
        "/v1/count",
        "/v1/echo/healthz",
        "/v1/files/static/swagger-ui.css",
        "/v1/files/static/nothing:read",
        "/v1/echo/hello",
        "/v1/count/2",
    )
    assert document.json()["info"]["title"] == "Echo"
    assert health.json() == {"status": "SERVING"}
    assert asset.status_code == 200 and "text/css" in asset.headers["content-type"]
    assert missing.status_code == 404
    assert echoed.json()["text"] == "hello"
    assert counted.status_code == 200


async def get_each(options: gateway.GatewayOptions, *paths: str) -> list[httpx.Response]:
    """GET each path in turn from a gateway app made with options, in-process;
    the app's lifespan closes its upstream channel at the end."""
    app = gateway.create_app(options)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as http,
    ):
        return [await http.get(path) for path in paths]

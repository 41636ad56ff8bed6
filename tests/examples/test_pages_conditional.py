"""The pages services' conditional requests: ``If-Match: *`` saves to the head (never a 500),
``If-None-Match`` lists and weak tags give 304, hostile headers a typed 4xx. ASGI on SQLite and
PostgreSQL, and the Flask (WSGI) service on SQLite.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from examples.flask_pages.app import create_app as create_flask_app
from examples.flask_pages.app import pages_service
from examples.pages_service.app import create_app
from examples.pages_service.client import PagesClient
from examples.pages_service.store import Settings

from hardening import Metrics
from tests.examples.test_pages_service import BLOCKS, lifespan

PATCH_TYPE = "application/json-patch+json"
EDIT = [{"op": "replace", "path": "/1/content", "value": "Ship it"}]


@pytest.fixture
async def http(sql_engine: sa.Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI service on each SQL backend, called in process."""
    app = create_app(Settings(worker="off"), engine=sql_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def _page(http: httpx.AsyncClient) -> str:
    page = await PagesClient(http).create(BLOCKS)
    return f"/pages/{page.id}"


@pytest.mark.anyio
async def test_patch_with_if_match_star_saves_to_the_head(http: httpx.AsyncClient) -> None:
    """``If-Match: *`` patches whatever version is current: 200 and the next ETag."""
    url = await _page(http)
    first = await http.patch(
        url, content=json.dumps(EDIT), headers={"content-type": PATCH_TYPE, "if-match": '"v1"'}
    )
    assert first.headers["etag"] == '"v2"'
    more = [{"op": "replace", "path": "/2/content", "value": "Now"}]
    star = await http.patch(
        url, content=json.dumps(more), headers={"content-type": PATCH_TYPE, "if-match": "*"}
    )
    assert star.status_code == 200, star.text
    assert star.headers["etag"] == '"v3"'
    blocks = (await http.get(url)).json()["blocks"]
    assert [b["content"] for b in blocks[1:]] == ["Ship it", "Now"]


@pytest.mark.anyio
async def test_if_match_star_on_a_missing_page_or_a_bad_patch_is_4xx(
    http: httpx.AsyncClient,
) -> None:
    """``*`` on a page that does not exist is 404; a patch that does not apply is 422."""
    headers = {"content-type": PATCH_TYPE, "if-match": "*"}
    missing = await http.patch("/pages/nope", content=json.dumps(EDIT), headers=headers)
    assert missing.status_code == 404
    url = await _page(http)
    bad = [{"op": "remove", "path": "/9"}]
    refused = await http.patch(url, content=json.dumps(bad), headers=headers)
    assert refused.status_code == 422
    surrogate = b'[{"op": "replace", "path": "/1/content", "value": "\\ud800"}]'
    lone = await http.patch(url, content=surrogate, headers=headers)
    assert lone.status_code == 422  # a lone surrogate is refused, never a 500
    assert (await http.get(url)).headers["etag"] == '"v1"'


@pytest.mark.anyio
async def test_put_with_if_match_star_replaces_the_head(http: httpx.AsyncClient) -> None:
    """``PUT`` with ``If-Match: *`` replaces whatever version is current."""
    url = await _page(http)
    moved = [BLOCKS[2], BLOCKS[0], BLOCKS[1]]
    put = await http.put(url, json={"blocks": moved}, headers={"if-match": "*"})
    assert put.status_code == 200, put.text
    assert put.headers["etag"] == '"v2"'
    assert (await http.get(url)).json()["blocks"] == moved


@pytest.mark.anyio
@pytest.mark.parametrize("header", ['"v1"', 'W/"v1"', '"v0", W/"v1"', "*"])
async def test_get_is_not_modified_by_weak_comparison(http: httpx.AsyncClient, header: str) -> None:
    """A listed tag equal by weak comparison (or ``*``) answers 304 with the ETag."""
    url = await _page(http)
    cached = await http.get(url, headers={"if-none-match": header})
    assert cached.status_code == 304
    assert cached.headers["etag"] == '"v1"'
    changed = await http.get(url, headers={"if-none-match": '"v0"'})
    assert changed.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["v1", '"v1', '"v1" "v2"', ",", '"' + "x" * 9000 + '"'])
async def test_hostile_if_none_match_is_a_412_not_a_500(
    http: httpx.AsyncClient, header: str
) -> None:
    """A malformed If-None-Match is a problem+json 412 naming the header."""
    url = await _page(http)
    response = await http.get(url, headers={"if-none-match": header})
    assert response.status_code == 412
    problem = response.json()
    assert (problem["reason"], problem["header"]) == ("malformed", "If-None-Match")


def test_flask_patch_and_put_with_if_match_star(sqlite_engine: sa.Engine) -> None:
    """The Flask service takes ``If-Match: *`` the same way: 200, never 500."""
    app = create_flask_app(Settings(worker="off"), engine=sqlite_engine)
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            created = http.post("/pages", json={"blocks": BLOCKS})
            url = f"/pages/{created.json()['id']}"
            star = http.patch(
                url, content=json.dumps(EDIT), headers={"Content-Type": PATCH_TYPE, "If-Match": "*"}
            )
            assert (star.status_code, star.headers["ETag"]) == (200, '"v2"')
            put = http.put(url, json={"blocks": BLOCKS}, headers={"If-Match": "*"})
            assert (put.status_code, put.headers["ETag"]) == (200, '"v3"')
            assert http.get(url).json()["blocks"] == BLOCKS
    finally:
        pages_service(app).close()

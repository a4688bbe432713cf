"""service/ui.py without a browser: what it serves, with which headers, and what it refuses."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.ui import ASSETS, STATIC_DIR, router


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


def test_index_is_html_with_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>MPRNet image restoration</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_assets_are_served_with_their_type(client, name):
    r = client.get(f"/static/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"] == ASSETS[name]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == (STATIC_DIR / name).read_bytes()
    # revalidation works: the second load can be a 304 with no body
    again = client.get(f"/static/{name}", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize("path", ["/static/index.html.bak", "/static/..%2Fui.py", "/static/", "/static/nope.js"])
def test_nothing_outside_the_allowlist(client, path):
    assert client.get(path).status_code == 404


def test_every_file_in_static_is_served_or_is_the_page():
    # A new asset must be added to ASSETS, or the page would link a file that answers 404.
    on_disk = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
    assert on_disk == set(ASSETS) | {"index.html"}


def test_the_page_references_nothing_outside_the_service():
    # Only relative references: no CDN, web font or analytics, and the page works under a path prefix.
    absolute = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not absolute.findall(text), f"{path.name} references another origin: {absolute.findall(text)}"
        assert not re.search(r"""(?:src|href)=["']/""", text), f"{path.name} has a root-absolute URL; use a relative one"


def test_the_page_is_not_in_the_api_schema(client):
    assert client.get("/openapi.json").json().get("paths", {}) == {}

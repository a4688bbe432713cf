"""The try-it page: `GET /` and the few static files it is made of.

Plain HTML, CSS and JavaScript from `service/static/`: no build step, nothing fetched from another
origin. `service.app` includes this router when `settings.ui_enabled` (env `MPRNET_UI_ENABLED`).
The page uses only the public API (`POST restore/{task}`, `GET tasks`) through relative URLs, so it
also works when the service sits behind a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"

# An allowlist (file name -> media type) rather than a directory mount: nothing else in the package
# can be fetched, and no part of the URL ever becomes a filesystem path.
ASSETS = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# The page loads only its own files and talks only to its own origin. `blob:` shows the picked
# image and the result in the browser before anything is downloaded.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Revalidate on every load (a 304 when nothing changed), so an upgraded service never runs a stale
# script against a changed API.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

# Kept out of the OpenAPI schema: the schema describes the API, and the page is not part of it.
router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    """The try-it page: pick a task and an image, compare before and after."""
    return _file(request, "index.html", "text/html; charset=utf-8", {"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@router.get("/static/{name}")
async def asset(name: str, request: Request) -> Response:
    """One of the page's own files (stylesheet, script, icon)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"No such file: {name}")
    return _file(request, name, media_type)


def _file(request: Request, name: str, media_type: str, extra: dict[str, str] | None = None) -> Response:
    # FileResponse sends an ETag but does not answer If-None-Match itself (StaticFiles does).
    path = STATIC_DIR / name
    stat = path.stat()
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    headers = {**_HEADERS, **(extra or {}), "ETag": etag}
    given = {tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")}
    if etag in given or "*" in given:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers, stat_result=stat)

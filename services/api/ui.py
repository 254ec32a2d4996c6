"""The labeling page: plain HTML, JS and CSS under services/api/static/, served at /ui/.

The page talks to the same API as every other client (queries, labels, undo, /me), with the
labeler's token in an Authorization header, so it needs no endpoint of its own. Its files are
public (they hold no data), so these routes ask for no token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).parent / "static"

# Only these files are served: nothing else under the package directory can be read through /ui.
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
# Revalidate on every load (cheap: ETag/Last-Modified), so a new release is picked up at once.
_NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_redirect(request: Request) -> RedirectResponse:
    """/ui → /ui/ (query kept), so the page's relative links resolve inside /ui/ behind any prefix."""
    query = request.url.query
    return RedirectResponse("ui/" + (f"?{query}" if query else ""), status_code=307)


@router.get("/ui/")
def ui_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_CACHE)


@router.get("/ui/{asset}")
def ui_asset(asset: str) -> FileResponse:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(404, f"no such file in the labeling page: {asset!r}")
    return FileResponse(STATIC_DIR / asset, media_type=media_type, headers=_NO_CACHE)

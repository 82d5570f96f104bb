"""``/ui``: a read-only status page (plain HTML + a little JS, no build step).

The page itself holds no data and is public; it asks for an API key, keeps it in
the tab's session storage, and reads the same REST and SSE endpoints as the CLI.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["operations"])


@cache
def _page() -> str:
    return files("gpufleet.ui").joinpath("index.html").read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def status_page() -> HTMLResponse:
    return HTMLResponse(
        _page(),
        headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                 "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"},
    )

"""The chat page at `/`: static files shipped in the package (minisgl/server/web/), no build step.

The page talks only to this server's own API (/v1/models, /v1/chat/completions, /status); its
Content-Security-Policy forbids every other origin, so it works offline and never fetches from the internet.
The page and its assets are served without the API key (they hold no data); the API it calls is not.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parent / "web"
ASSETS_PREFIX = "/web"
OPEN_PATHS = ("/",)  # with ASSETS_PREFIX/*: reachable without the API key
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(ASSETS_PREFIX + "/")


def install_web_ui(app: FastAPI) -> None:
    """GET / (the page) and GET /web/<file> (its script and style)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=_HEADERS)

    app.mount(ASSETS_PREFIX, StaticFiles(directory=WEB_DIR), name="web")

"""The web console at ``/``: static files shipped inside the package (``countersign/web``).

No build step and no Node at install or run time: plain ES modules and one vendored library
(``web/vendor``, with its licences). The page talks only to the public API, by the login cookie
with its CSRF token, so it is also a living example of that API.

``/`` answers ``index.html`` (never cached, so a new release is picked up at once); every other
file is served under ``/static/<version>/``, where the version is a hash of all the files' bytes,
so those answers may be cached for a year (gzipped for clients that accept it). Both carry the
page's security headers: a Content-Security-Policy with no inline script and no other origin,
``frame-ancestors 'none'``, ``Referrer-Policy`` and ``X-Content-Type-Options``.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@cache
def asset_version() -> str:
    """A short hash of every file of the page: part of the static files' URLs."""
    digest = hashlib.sha256()
    for path in sorted(WEB_ROOT.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(WEB_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@cache
def _index_html() -> str:
    return (
        (WEB_ROOT / "index.html")
        .read_text("utf-8")
        .replace("{{static}}", f"/static/{asset_version()}")
    )


class _StaticFiles(StaticFiles):
    """The page's files, with its security headers and a year of caching (versioned URLs)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        if response.status_code == 200:
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return response


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The web console."""
    return HTMLResponse(_index_html(), headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


def mount_web_console(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static/<version>/``."""
    app.include_router(router)
    app.mount(
        f"/static/{asset_version()}",
        GZipMiddleware(_StaticFiles(directory=WEB_ROOT, html=False), minimum_size=512),
        name="static",
    )

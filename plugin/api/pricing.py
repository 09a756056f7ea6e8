"""The pricing changelog, open to anyone (customers read it): `GET /pricing/changelog` (JSON) and
`GET /pricing/changelog.html` (a page, rendered by plugin/api/pricing_html.py)."""

from __future__ import annotations

import asyncio

from fastapi.responses import HTMLResponse, JSONResponse

from plugin import runtime
from plugin.api.pricing_html import render_changelog
from plugin.api.routes import router
from plugin.services.pricing import changelog

CHANGELOG_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors *",
    "Cache-Control": "public, max-age=60",
}
"""Nothing loads from elsewhere and nothing runs; anyone may embed or cache it (it holds no secret)."""


@router.get("/pricing/changelog")
async def pricing_changelog() -> JSONResponse:
    """Every recorded change of plans and pricing, newest first (no key needed)."""
    return JSONResponse(await asyncio.to_thread(changelog, runtime.current().engine),
                        headers={"Cache-Control": CHANGELOG_HEADERS["Cache-Control"]})


@router.get("/pricing/changelog.html")
async def pricing_changelog_page() -> HTMLResponse:
    """The changelog as a small page to link from a pricing page (no key needed)."""
    log = await asyncio.to_thread(changelog, runtime.current().engine)
    return HTMLResponse(render_changelog(log), headers=CHANGELOG_HEADERS)

"""meterline's routes on the proxy app. Plain FastAPI: nothing here knows about LiteLLM."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from plugin import __version__, runtime

PREFIX = "/meterline/v1"

router = APIRouter(prefix=PREFIX, tags=["meterline"])


def _database_ok() -> bool:
    with runtime.current().engine.connect() as connection:
        connection.execute(text("select 1"))
    return True


@router.get("/health")
async def health() -> JSONResponse:
    """Liveness of meterline itself: the ledger database answers."""
    try:
        await asyncio.to_thread(_database_ok)
    except Exception as exc:  # reported, not raised: a health probe must always answer
        return JSONResponse(
            {"status": "unavailable", "database": exc.__class__.__name__, "version": __version__}, status_code=503
        )
    return JSONResponse({"status": "ok", "database": "ok", "version": __version__})

"""meterline's routes on the proxy app. Plain FastAPI: nothing here knows about LiteLLM."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import stripe
from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from plugin import __version__, metrics, runtime
from plugin.ledger.store import as_utc
from plugin.outbox import store as outbox_store
from plugin.outbox.retry import Status
from plugin.services import invoices as stripe_events
from plugin.settings import ConfigError

PREFIX = "/meterline/v1"


def _error(status: int, reason: str, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI-shaped, like every other error the proxy gives (DESIGN "Contract: errors")."""
    return JSONResponse(
        {"error": {"message": message, "type": reason, "param": param, "code": str(status)}},
        status_code=status, headers={"x-meterline-error": reason},
    )


class OpenAIShapedRoute(APIRoute):
    """Answers invalid input (a bad body or query) with an OpenAI-shaped 422 instead of FastAPI's
    `{"detail": [...]}`. Done per route because exception handlers cannot be added to LiteLLM's
    app once it is serving, which is when meterline is loaded."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_or_refuse(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as invalid:
                first = invalid.errors()[0]
                if first.get("type") == "json_invalid":
                    return _error(422, "invalid_request", "The request body is not valid JSON.")
                where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
                return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}", param=where)

        return handle_or_refuse


router = APIRouter(prefix=PREFIX, tags=["meterline"], route_class=OpenAIShapedRoute)


def operator_refusal(authorization: str | None) -> JSONResponse | None:
    """None when `Authorization: Bearer <LITELLM_MASTER_KEY>` is presented (compared in constant time),
    else the 401 to answer. A plain check, not a raising dependency: exception handlers cannot be added
    to LiteLLM's app once it is serving, which is when meterline is loaded."""
    master = runtime.current().settings.master_key
    presented = (authorization or "").removeprefix("Bearer ").strip()
    if master and presented and secrets.compare_digest(presented.encode(), master.encode()):
        return None
    return _error(401, "invalid_api_key", "This route needs the master key (Authorization: Bearer ...).")


Authorization = Annotated[str | None, Header()]


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


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus exposition: outbox depth and age, relay outcomes."""
    body = await asyncio.to_thread(metrics.render, lambda: runtime.current().engine)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _when(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


@router.get("/outbox")
async def outbox(
    authorization: Authorization = None,
    status: Annotated[Literal[tuple(s.value for s in Status)] | None, Query()] = None,  # type: ignore[valid-type]
    customer: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    """Queue health and events: every undelivered one by default, or those with `status` (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    engine = runtime.current().engine

    def read():
        return outbox_store.stats(engine), outbox_store.list_events(engine, status=status, customer_id=customer,
                                                                    limit=limit)

    stats, events = await asyncio.to_thread(read)
    return JSONResponse({
        "depth": stats.depth,
        "oldest_waiting_at": _when(stats.oldest_waiting_at),
        "oldest_age_seconds": stats.oldest_age_seconds(datetime.now(UTC)),
        "events": [
            {"id": event.id, "customer_id": event.customer_id, "value_ucr": event.value_ucr, "status": event.status,
             "attempts": event.attempts, "occurred_at": _when(event.occurred_at),
             "next_attempt_at": _when(event.next_attempt_at), "uncertain": bool(event.uncertain),
             "last_error": event.last_error}
            for event in events
        ],
    })


@router.post("/stripe/webhook")
async def stripe_webhook(request: Request, stripe_signature: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Stripe's webhooks, snapshot or thin, verified with STRIPE_WEBHOOK_SECRET (bad, missing or older
    than 300 s: 400, nothing processed); each event acted on once (plugin/services/invoices.py)."""
    meterline = runtime.current()
    secret = meterline.settings.stripe_webhook_secret
    if not secret:
        return _error(503, "webhook_not_configured", "Set STRIPE_WEBHOOK_SECRET to receive Stripe webhooks.")
    payload = await request.body()

    def process() -> dict:
        client = runtime.stripe_config(meterline.settings, meterline.config).client() \
            if meterline.settings.stripe_api_key else None
        return stripe_events.handle(meterline, stripe_events.read_event(payload, stripe_signature, secret, client),
                                    client)

    try:
        return JSONResponse(await asyncio.to_thread(process))
    except stripe.SignatureVerificationError:
        return _error(400, "invalid_signature", "The Stripe-Signature header does not match this payload.")
    except ValueError:
        return _error(400, "invalid_payload", "The webhook body is not a Stripe event.")
    except ConfigError as problem:
        return _error(503, "stripe_not_configured", str(problem).splitlines()[0])
    except stripe.StripeError as problem:  # reading the event's object failed: Stripe delivers it again
        return _error(502, "stripe_unavailable", f"Could not read the event from Stripe: {problem.__class__.__name__}")


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(max_length=100)]] = Field(default=[], max_length=10_000)
    all_dead: bool = False
    force: bool = False
    """Also re-queue `unknown` events; resending them may bill twice."""


@router.post("/outbox/retry")
async def outbox_retry(body: RetryRequest, authorization: Authorization = None) -> JSONResponse:
    """Re-queue dead (or held) events by id, or every dead event (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    if bool(body.ids) == body.all_dead:
        return _error(422, "invalid_request", "Give `ids` or `all_dead: true` (not both).")
    count = await asyncio.to_thread(
        outbox_store.requeue, runtime.current().engine, now=datetime.now(UTC), ids=body.ids,
        all_dead=body.all_dead, force=body.force,
    )
    return JSONResponse({"requeued": count})

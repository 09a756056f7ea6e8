"""The HTTP face of the emulator: Stripe's v1/v2 routes over `EmulatorState`, plus the control API.

Every Stripe call goes through one pipeline, in this order (the order is what the fault switches
promise): count the call -> the billing cycle catches up with the clock (ended periods become drafts,
drafts past their grace are finalized: a real-time clock works too) -> authenticate -> decode params
-> hold the customer+meter slot (v1 meter events) -> injected delay -> injected failure *before* any
work -> Idempotency-Key replay or run the operation -> injected failure *after* the work ("ambiguous":
done, but the caller sees an error).
The idempotent answer stored is the operation's real one, so a retry with the same key after an
ambiguous failure replays the success, as it would after a lost response from Stripe.

Control API (no auth) under ``/_emulator/``; see `control_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugin.stripe.emulator.clock import AdjustableClock
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.faults import injected_error
from plugin.stripe.emulator.forms import (
    InvalidParam,
    Params,
    decode_form,
    decode_query,
    parse_integer,
)
from plugin.stripe.emulator.idempotency import StoredResponse
from plugin.stripe.emulator.state import EmulatorState
from plugin.stripe.emulator.webhooks import WebhookSender

logger = logging.getLogger(__name__)

API_KEY_PREFIXES = ("sk_test_", "sk_live_", "rk_")
"""Secret and restricted keys; publishable keys (``pk_``) cannot call these endpoints, as at Stripe."""

Handler = Callable[[EmulatorState, Params, dict[str, str]], dict[str, Any] | None]


@dataclass(frozen=True)
class Operation:
    """One Stripe endpoint: what it does and how its requests are read."""

    handler: Handler
    body: Literal["form", "json"] = "form"
    auth: Literal["api_key", "session"] = "api_key"
    status: int = 200
    holds_meter_slot: bool = False
    """v1 meter events: one call at a time per customer and meter (`EmulatorState.strict_concurrency`)."""


# ------------------------------------------------------------------------------ pipeline


def encode(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def json_response(status: int, text: str, *, replayed: bool = False, should_retry: bool | None = None) -> Response:
    headers = {"Request-Id": f"req_{secrets.token_hex(7)}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if should_retry is not None:
        headers["Stripe-Should-Retry"] = "true" if should_retry else "false"
    return Response(text, status, headers=headers, media_type="application/json")


def as_api_error(error: InvalidParam | ApiError) -> ApiError:
    return ApiError.from_invalid_param(error) if isinstance(error, InvalidParam) else error


def error_response(error: InvalidParam | ApiError) -> Response:
    error = as_api_error(error)
    return json_response(error.status, encode(error.body()), should_retry=error.should_retry)


def decode_json_object(body: bytes) -> dict[str, Any]:
    """A JSON request body (v2 and the control API); empty means no params."""
    try:
        decoded = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise InvalidParam(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise InvalidParam("The request body must be a JSON object.")
    return decoded


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def masked(secret: str) -> str:
    """Stripe's way of naming a wrong key without echoing it: a few characters at each end."""
    return f"{secret[:8]}{'*' * (len(secret) - 12)}{secret[-4:]}" if len(secret) > 16 else "*" * len(secret)


def authenticate(request: Request, operation: Operation, state: EmulatorState) -> None:
    token = bearer_token(request)
    if operation.auth == "session":
        state.check_session_token(token or "")
        return
    if token is None:
        raise ApiError(401, "You did not provide an API key. You need to provide your API key in the Authorization "
                       "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').")
    if not token.startswith(API_KEY_PREFIXES):
        raise ApiError(401, f"Invalid API Key provided: {masked(token)}")


async def read_params(request: Request, operation: Operation) -> dict[str, Any]:
    if request.method == "GET":
        return decode_query(request.url.query)
    body = await request.body()
    return decode_form(body) if operation.body == "form" else decode_json_object(body)


def run_idempotently(request: Request, operation: Operation, state: EmulatorState,
                     raw: dict[str, Any]) -> tuple[StoredResponse, bool]:
    """The operation's answer and whether it is a replay of an earlier request with the same Idempotency-Key."""
    key = request.headers.get("idempotency-key") if request.method == "POST" else None
    if key:
        fingerprint = f"{request.method} {request.url.path} {json.dumps(raw, sort_keys=True, separators=(',', ':'))}"
        replay = state.idempotency_begin(key, fingerprint)
        if replay is not None:
            return replay, True
    try:
        body = operation.handler(state, Params(raw), request.path_params)
        outcome = StoredResponse(operation.status, encode(body or {}))
        if (failure := state.take_fault(request.url.path, after_record=True)) is not None:
            # Stripe did the work, then failed to answer: it saves *that* answer under the key and
            # replays it, a 500 included; only a fresh key (or the identifier's dedupe) tells more
            raise injected_error(failure)
    except (InvalidParam, ApiError) as raised:
        error = as_api_error(raised)
        outcome = StoredResponse(error.status, encode(error.body()), error.should_retry)
    except BaseException:
        if key:
            state.idempotency_abandon(key)
        raise
    if key:
        state.idempotency_finish(key, outcome)
    return outcome, False


async def dispatch(request: Request, operation: Operation) -> Response:
    state: EmulatorState = request.app.state.emulator
    path = request.url.path
    state.count_call(request.method, path)
    try:
        state.run_due_billing()
        authenticate(request, operation, state)
        raw = await read_params(request, operation)
        slot = state.claim_meter_event_slot(raw) if operation.holds_meter_slot else None
        try:
            if state.faults.delay_ms:
                await asyncio.sleep(state.faults.delay_ms / 1000)
            failure = state.take_fault(path, after_record=False)
            if failure is not None:
                raise injected_error(failure)
            outcome, replayed = run_idempotently(request, operation, state, raw)
            return json_response(outcome.status, outcome.body, replayed=replayed, should_retry=outcome.should_retry)
        finally:
            state.release_meter_event_slot(slot)
    except (InvalidParam, ApiError) as error:
        return error_response(error)
    except Exception:
        logger.exception("emulator bug on %s %s", request.method, path)
        return error_response(ApiError(500, "The emulator failed on this request (see its log).", type="api_error"))


def stripe_route(method: str, path: str, operation: Operation) -> Route:
    async def endpoint(request: Request) -> Response:
        return await dispatch(request, operation)

    return Route(path, endpoint, methods=[method], name=f"{method} {path}")


def _retrieve(kind: str) -> Handler:
    return lambda state, params, path: state.retrieve(kind, path["id"], params)


STRIPE_ROUTES = [
    ("POST", "/v1/customers", Operation(lambda state, params, _: state.create_customer(params))),
    ("GET", "/v1/customers", Operation(lambda state, params, _: state.list_customers(params))),
    ("GET", "/v1/customers/{id}", Operation(_retrieve("customer"))),
    ("POST", "/v1/products", Operation(lambda state, params, _: state.create_product(params))),
    ("GET", "/v1/products", Operation(lambda state, params, _: state.list_products(params))),
    ("GET", "/v1/products/{id}", Operation(_retrieve("product"))),
    ("POST", "/v1/prices", Operation(lambda state, params, _: state.create_price(params))),
    ("GET", "/v1/prices", Operation(lambda state, params, _: state.list_prices(params))),
    ("GET", "/v1/prices/{id}", Operation(_retrieve("price"))),
    ("POST", "/v1/subscriptions", Operation(lambda state, params, _: state.create_subscription(params))),
    ("GET", "/v1/subscriptions", Operation(lambda state, params, _: state.list_subscriptions(params))),
    ("GET", "/v1/subscriptions/{id}", Operation(_retrieve("subscription"))),
    ("POST", "/v1/subscription_items", Operation(lambda state, params, _: state.create_subscription_item(params))),
    ("POST", "/v1/subscription_schedules",
     Operation(lambda state, params, _: state.create_subscription_schedule(params))),
    ("GET", "/v1/subscription_schedules",
     Operation(lambda state, params, _: state.list_subscription_schedules(params))),
    ("GET", "/v1/subscription_schedules/{id}", Operation(_retrieve("subscription_schedule"))),
    ("POST", "/v1/subscription_schedules/{id}",
     Operation(lambda state, params, path: state.update_subscription_schedule(path["id"], params))),
    ("POST", "/v1/billing/meters", Operation(lambda state, params, _: state.create_meter(params))),
    ("GET", "/v1/billing/meters", Operation(lambda state, params, _: state.list_meters(params))),
    ("GET", "/v1/billing/meters/{id}", Operation(_retrieve("meter"))),
    ("POST", "/v1/billing/meters/{id}/deactivate",
     Operation(lambda state, params, path: state.set_meter_active(path["id"], False, params))),
    ("POST", "/v1/billing/meters/{id}/reactivate",
     Operation(lambda state, params, path: state.set_meter_active(path["id"], True, params))),
    ("GET", "/v1/billing/meters/{id}/event_summaries",
     Operation(lambda state, params, path: state.meter_event_summaries(path["id"], params))),
    ("POST", "/v1/billing/meter_events",
     Operation(lambda state, params, _: state.create_meter_event(params), holds_meter_slot=True)),
    ("POST", "/v1/invoices/create_preview", Operation(lambda state, params, _: state.preview_invoice(params))),
    ("GET", "/v1/invoices", Operation(lambda state, params, _: state.list_invoices(params))),
    ("GET", "/v1/invoices/{id}", Operation(_retrieve("invoice"))),
    ("POST", "/v1/invoices/{id}", Operation(lambda state, params, path: state.update_invoice(path["id"], params))),
    ("POST", "/v1/invoices/{id}/finalize",
     Operation(lambda state, params, path: state.finalize_invoice(path["id"], params))),
    ("GET", "/v1/invoices/{id}/lines",
     Operation(lambda state, params, path: state.list_invoice_lines(path["id"], params))),
    ("POST", "/v1/invoiceitems", Operation(lambda state, params, _: state.create_invoice_item(params))),
    ("GET", "/v1/invoiceitems", Operation(lambda state, params, _: state.list_invoice_items(params))),
    ("GET", "/v1/invoiceitems/{id}", Operation(_retrieve("invoiceitem"))),
    ("GET", "/v1/events", Operation(lambda state, params, _: state.list_events(params))),
    ("GET", "/v1/events/{id}", Operation(_retrieve("event"))),
    ("GET", "/v2/core/events", Operation(lambda state, params, _: state.list_thin_events(params))),
    ("GET", "/v2/core/events/{id}", Operation(_retrieve("thin_event"))),
    ("POST", "/v2/billing/meter_event_session",
     Operation(lambda state, params, _: state.create_meter_event_session(params), body="json")),
    ("POST", "/v2/billing/meter_event_stream",
     Operation(lambda state, params, _: state.accept_meter_event_stream(params), body="json", auth="session",
               status=202)),
]


async def unknown_route(request: Request) -> Response:
    request.app.state.emulator.count_call(request.method, request.url.path)
    return error_response(ApiError(
        404, f"Unrecognized request URL ({request.method}: {request.url.path}). The meterline Stripe emulator "
        "implements only the endpoints meterline uses.",
    ))


# ------------------------------------------------------------------------------ control API


async def control_body(request: Request) -> Params:
    return Params(decode_json_object(await request.body()))


def control_endpoint(action: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Control calls answer JSON, and a bad body is a 400 in the same error shape as the Stripe routes."""

    async def endpoint(request: Request) -> Response:
        try:
            return json_response(200, encode(await action(request)))
        except (InvalidParam, ApiError) as error:
            return error_response(error)
        except ValueError as error:
            return error_response(ApiError(400, str(error)))

    return endpoint


async def control_health(_: Request) -> dict[str, Any]:
    return {"ok": True}


async def control_reset(request: Request) -> dict[str, Any]:
    """Forget everything: objects, events, keys, faults, counters, summary lag, webhook log, clock offset."""
    state: EmulatorState = request.app.state.emulator
    state.reset()
    if request.app.state.webhooks is not None:
        request.app.state.webhooks.reset()
    if isinstance(state.clock, AdjustableClock):
        state.clock.offset = 0.0
    return {"ok": True}


async def control_faults(request: Request) -> dict[str, Any]:
    """POST ``{"count": N, "status": 500, "path_prefix": null, "after_record": false}``; GET shows the switches."""
    state: EmulatorState = request.app.state.emulator
    if request.method == "POST":
        params = (await control_body(request)).only("count", "status", "path_prefix", "after_record")
        state.add_fault(params.integer("count", required=True, minimum=0), params.integer("status") or 500,
                        params.text("path_prefix"), bool(params.boolean("after_record")))
    return state.fault_settings()


async def control_delay(request: Request) -> dict[str, Any]:
    """POST ``{"ms": N}``: every Stripe call waits N ms (after taking its customer+meter slot)."""
    state: EmulatorState = request.app.state.emulator
    state.set_delay((await control_body(request)).only("ms").integer("ms", required=True, minimum=0))
    return state.fault_settings()


async def control_meter_events(request: Request) -> dict[str, Any]:
    """Recorded meter events from ``?offset=N``, plus rejections and the duplicate count."""
    offset = parse_integer(request.query_params.get("offset", "0"))
    if offset is None or offset < 0:
        raise InvalidParam("offset must be a non-negative integer", "offset")
    return request.app.state.emulator.meter_event_log(offset)


async def control_forget_meter_event(request: Request) -> dict[str, Any]:
    """POST ``{"identifier": "mtr_..."}``: Stripe loses that recorded event (its identifier is free again).

    Answers the event's log entry, now flagged ``"forgotten": true``; 404 when no live record has it.
    """
    params = (await control_body(request)).only("identifier")
    return request.app.state.emulator.forget_meter_event(params.text("identifier", required=True))


def seconds_knob(setting: str, what: str) -> Callable[[Request], Any]:
    """A control endpoint for one of the state's knobs in seconds: POST ``{"seconds": N}`` sets it (N >= 0)
    with ``set_<setting>``, GET shows it with ``<setting>()``; both answer ``{"seconds": N}``."""

    async def endpoint(request: Request) -> dict[str, Any]:
        state: EmulatorState = request.app.state.emulator
        if request.method == "POST":
            seconds = (await control_body(request)).only("seconds").integer("seconds", required=True, minimum=0)
            getattr(state, f"set_{setting}")(seconds)
        return {"seconds": getattr(state, setting)()}

    endpoint.__doc__ = what
    return endpoint


control_summary_lag = seconds_knob("summary_lag", "Summaries leave out events received less than N s ago.")
control_invoice_grace = seconds_knob("invoice_grace", "How long a new cycle draft waits before it finalizes itself.")


async def control_webhook_deliveries(request: Request) -> dict[str, Any]:
    webhooks: WebhookSender | None = request.app.state.webhooks
    return {"configured": webhooks is not None, "deliveries": webhooks.deliveries() if webhooks else []}


async def control_calls(request: Request) -> dict[str, Any]:
    return {"calls": request.app.state.emulator.call_counts()}


async def control_clock(request: Request) -> dict[str, Any]:
    """POST ``{"advance_seconds": N}`` or ``{"advance_to": <epoch>}`` moves the emulator's clock forward
    (identifier window, session expiry, the billing cycle); reading or moving it runs what fell due."""
    state: EmulatorState = request.app.state.emulator
    if not isinstance(state.clock, AdjustableClock):
        raise ApiError(400, "This emulator was started with a fixed clock; it cannot be moved.")
    if request.method == "POST":
        params = (await control_body(request)).only("advance_seconds", "advance_to")
        target = params.integer("advance_to")
        if target is not None and params.has("advance_seconds"):
            raise InvalidParam("Give advance_seconds or advance_to, not both.", "advance_to")
        if target is not None and target < state.clock():
            raise InvalidParam(f"advance_to ({target}) is in the emulator's past: the clock only moves forward.",
                               "advance_to")
        seconds = (target - state.clock() if target is not None
                   else params.integer("advance_seconds", required=True, minimum=0))
        state.clock.advance(seconds)
    state.run_due_billing()
    return {"now": state.clock(), "offset_seconds": state.clock.offset}


async def control_finalize_invoice(request: Request) -> dict[str, Any]:
    """POST ``{"subscription": "sub_...", "at": <epoch, optional>}``: a draft for the period containing `at`
    (default now) + ``invoice.created``, outside the cycle; it finalizes itself after the invoice grace."""
    params = (await control_body(request)).only("subscription", "at")
    return request.app.state.emulator.finalize_period(params.text("subscription", required=True),
                                                      params.integer("at"))


async def control_webhook_mode(request: Request) -> dict[str, Any]:
    """POST ``{"mode": "snapshot" | "thin"}``: v1 snapshot events, or thin v2 notifications as Stripe's event
    destinations send (meter error reports then come as ``v1.billing.meter.*`` thin events); GET shows it."""
    state: EmulatorState = request.app.state.emulator
    if request.method == "POST":
        state.set_webhook_mode((await control_body(request)).only("mode").text("mode", required=True))
    return {"mode": state.webhook_mode()}


def control_routes() -> list[Route]:
    table = [
        ("/_emulator/health", control_health, ["GET"]),
        ("/_emulator/reset", control_reset, ["POST"]),
        ("/_emulator/faults", control_faults, ["GET", "POST"]),
        ("/_emulator/delay", control_delay, ["POST"]),
        ("/_emulator/meter_events", control_meter_events, ["GET"]),
        ("/_emulator/meter_events/forget", control_forget_meter_event, ["POST"]),
        ("/_emulator/summary_lag", control_summary_lag, ["GET", "POST"]),
        ("/_emulator/webhook_deliveries", control_webhook_deliveries, ["GET"]),
        ("/_emulator/calls", control_calls, ["GET"]),
        ("/_emulator/clock", control_clock, ["GET", "POST"]),
        ("/_emulator/invoices", control_finalize_invoice, ["POST"]),
        ("/_emulator/webhook_mode", control_webhook_mode, ["GET", "POST"]),
        ("/_emulator/invoice_grace", control_invoice_grace, ["GET", "POST"]),
    ]
    return [Route(path, control_endpoint(action), methods=methods) for path, action, methods in table]


# ------------------------------------------------------------------------------ factory


def create_app(state: EmulatorState, *, webhooks: WebhookSender | None = None) -> Starlette:
    """The ASGI app. Pass the same `webhooks` the state's `on_event` publishes to, so it is closed on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if webhooks is not None:
            await webhooks.aclose()

    routes = [stripe_route(method, path, operation) for method, path, operation in STRIPE_ROUTES]
    routes += control_routes()
    routes.append(Route("/{path:path}", unknown_route, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = state
    app.state.webhooks = webhooks
    return app

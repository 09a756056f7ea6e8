"""Limits, previews, breakers, the global overage block and alerts, under /meterline/v1.

Customer routes take the customer's key (or the master key with X-Meterline-Customer, like the
proxy); operator routes take the master key. A customer key reaches only its own customer.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Annotated, Any, Literal

import stripe
from fastapi import Header, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from plugin import runtime
from plugin.api.routes import Authorization, _error, operator_refusal, router
from plugin.ledger import accounts, reconciliations
from plugin.ledger import store as ledger_store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK
from plugin.ledger.store import StoreError, as_utc
from plugin.rules.identity import CUSTOMER_HEADER, AuthFailure, identify
from plugin.services import invoices as invoice_service
from plugin.services.breaker import breaker_status, move_breaker
from plugin.services.limits import LimitsBody, LimitsRefused, set_limits, show_limits
from plugin.services.preview import preview_answer
from plugin.services.reconcile import reconcile
from plugin.settings import ConfigError
from plugin.sinks.base import one_line

CustomerHeader = Annotated[str | None, Header(alias=CUSTOMER_HEADER)]


async def _customer(authorization: str | None, named: str | None) -> tuple[str | None, JSONResponse | None]:
    """(customer id, None) for a customer key or master key + X-Meterline-Customer; else (None, refusal)."""
    meterline = runtime.current()
    directory = meterline.directory
    presented = (authorization or "").removeprefix("Bearer ").strip()
    headers = {CUSTOMER_HEADER: named} if named else {}
    try:
        identity = await asyncio.to_thread(identify, presented, headers, meterline.settings.master_key,
                                           directory.customer_for_secret, directory.customer_exists)
    except AuthFailure as failure:
        return None, _error(failure.status, failure.reason, failure.message)
    if identity.customer_id is None:
        return None, _error(400, "customer_required", "With the master key, name the customer in X-Meterline-Customer.")
    return identity.customer_id, None


def _limits_refusal(refused: LimitsRefused) -> JSONResponse:
    reason = "unknown_customer" if refused.status == 404 else "invalid_request"
    return _error(refused.status, reason, str(refused), param=refused.param)


async def _put_limits(customer_id: str, body: LimitsBody, by: str) -> JSONResponse:
    try:
        return JSONResponse(await asyncio.to_thread(set_limits, runtime.current(), customer_id, body, by=by))
    except LimitsRefused as refused:
        return _limits_refusal(refused)


@router.put("/limits")
async def put_own_limits(body: LimitsBody, authorization: Authorization = None,
                         customer: CustomerHeader = None) -> JSONResponse:
    """A customer sets its own soft thresholds, hard limit and overage block."""
    customer_id, refusal = await _customer(authorization, customer)
    if refusal is not None:
        return refusal
    return await _put_limits(customer_id, body, by=f"customer:{customer_id}")


@router.get("/limits")
async def get_own_limits(authorization: Authorization = None, customer: CustomerHeader = None) -> JSONResponse:
    customer_id, refusal = await _customer(authorization, customer)
    if refusal is not None:
        return refusal
    try:
        return JSONResponse(await asyncio.to_thread(show_limits, runtime.current(), customer_id))
    except LimitsRefused as refused:
        return _limits_refusal(refused)


CustomerId = Annotated[str, Path(max_length=64)]


@router.put("/customers/{customer_id}/limits")
async def put_customer_limits(customer_id: CustomerId, body: LimitsBody,
                              authorization: Authorization = None) -> JSONResponse:
    """The operator sets a customer's limits (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    return await _put_limits(customer_id, body, by="operator")


class BreakerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["trip", "reset"]
    reason: str = Field(default="", max_length=500)
    by: str = Field(default="operator", min_length=1, max_length=100)
    """Who did it, for the audit log (an operator's name or email)."""


@router.post("/customers/{customer_id}/breaker")
async def customer_breaker(customer_id: CustomerId, body: BreakerBody,
                           authorization: Authorization = None) -> JSONResponse:
    """Trip or reset a customer's circuit breaker (master key); every move is in the audit log."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    try:
        answer = await asyncio.to_thread(move_breaker, meterline, customer_id, body.action, f"api:{body.by}",
                                         body.reason)
    except StoreError:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")
    return JSONResponse(answer)


@router.get("/customers/{customer_id}/breaker")
async def get_customer_breaker(customer_id: CustomerId, authorization: Authorization = None) -> JSONResponse:
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    try:
        return JSONResponse(await asyncio.to_thread(breaker_status, runtime.current(), customer_id))
    except StoreError:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")


class SwitchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool


@router.put("/overage-block")
async def overage_block(body: SwitchBody, authorization: Authorization = None) -> JSONResponse:
    """The operator's kill switch: no customer is billed past its included quota while it is on."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    await asyncio.to_thread(accounts.set_switch, meterline.engine, GLOBAL_OVERAGE_BLOCK, body.enabled, by="operator")
    meterline.directory.forget_switch(GLOBAL_OVERAGE_BLOCK)
    return JSONResponse({"enabled": body.enabled})


@router.get("/overage-block")
async def get_overage_block(authorization: Authorization = None) -> JSONResponse:
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    engine = runtime.current().engine
    return JSONResponse({"enabled": await asyncio.to_thread(accounts.get_switch, engine, GLOBAL_OVERAGE_BLOCK)})


@router.get("/alerts")
async def alerts(authorization: Authorization = None, customer: CustomerHeader = None,
                 kind: Annotated[str | None, Query(max_length=64)] = None,
                 customer_id: Annotated[str | None, Query(max_length=64)] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JSONResponse:
    """In-app alerts, newest first. The master key sees all (or one customer's: `customer_id`);
    a customer key sees its own."""
    if operator_refusal(authorization) is not None or customer:
        own, refusal = await _customer(authorization, customer)
        if refusal is not None:
            return refusal
        customer_id = own
    engine = runtime.current().engine
    found = await asyncio.to_thread(ledger_store.list_alerts, engine, kind, customer_id=customer_id, limit=limit,
                                    newest_first=True)
    return JSONResponse({"alerts": [
        {"id": item.id, "kind": item.kind, "customer_id": item.customer_id, "subject_id": item.subject_id,
         "message": item.message, "created_at": as_utc(item.created_at).isoformat(),
         "acknowledged": item.acknowledged_at is not None,
         "acknowledged_at": None if item.acknowledged_at is None else as_utc(item.acknowledged_at).isoformat()}
        for item in found
    ]})


@router.post("/alerts/{alert_id}/ack")
async def acknowledge(alert_id: Annotated[int, Path(ge=1, le=2**62)],
                      authorization: Authorization = None) -> JSONResponse:
    """An operator has seen the alert (master key): it no longer counts as open; repeating it changes nothing."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    at = await asyncio.to_thread(ledger_store.acknowledge_alert, meterline.engine, alert_id, meterline.clock())
    if at is None:
        return _error(404, "unknown_alert", f"No alert {alert_id}.")
    return JSONResponse({"id": alert_id, "acknowledged": True, "acknowledged_at": at.isoformat()})


class PreviewBody(BaseModel):
    """A chat request as it would be sent (`messages`, `max_tokens`...), or a model with token estimates."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=255)
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=10_000)
    prompt_tokens: Annotated[StrictInt, Field(ge=0, le=10_000_000)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None


@router.post("/preview")
async def preview(body: PreviewBody, authorization: Authorization = None,
                  customer: CustomerHeader = None) -> JSONResponse:
    """What a request would cost at most, and whether it would run: nothing is reserved or billed."""
    customer_id, refusal = await _customer(authorization, customer)
    if refusal is not None:
        return refusal
    if body.messages is None and body.prompt_tokens is None:
        return _error(422, "invalid_request", "Give `messages` (a chat request) or `prompt_tokens`.", param="messages")
    meterline = runtime.current()
    profile = await asyncio.to_thread(accounts.load_profile, meterline.engine, customer_id)
    prompt = body.prompt_tokens
    if prompt is None:
        prompt = await asyncio.to_thread(meterline.count_prompt_tokens, body.model, body.messages)
    return JSONResponse(await asyncio.to_thread(preview_answer, meterline, profile, body.model, prompt,
                                                body.max_completion_tokens or body.max_tokens))




@router.get("/reconciliation")
async def last_reconciliation(authorization: Authorization = None) -> JSONResponse:
    """The last whole-fleet reconciliation (master key): DESIGN "Contract: reconciliation"."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    report = await asyncio.to_thread(reconciliations.last, runtime.current().engine, reconciliations.EVERYONE)
    if report is None:
        return _error(404, "no_reconciliation", "No reconciliation has run yet: POST /reconciliation runs one "
                      "(the proxy also runs one every METERLINE_RECONCILE_SECONDS).")
    return JSONResponse(report)


@router.post("/reconciliation")
async def run_reconciliation(authorization: Authorization = None) -> JSONResponse:
    """Reconcile the whole fleet now (master key; the console's "run now") and answer the run."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    try:
        run = await asyncio.to_thread(reconcile, meterline, meterline.clock())
    except ConfigError as problem:
        return _error(409, "stripe_not_configured", str(problem).splitlines()[0])
    except stripe.StripeError as problem:
        return _error(502, "stripe_unavailable", f"Stripe did not answer the reconciliation: "
                      f"{one_line(problem.user_message or str(problem))}")
    return JSONResponse(run.report)


@router.get("/invoices")
async def list_invoices(authorization: Authorization = None,
                        customer_id: Annotated[str | None, Query(max_length=64)] = None,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 500) -> JSONResponse:
    """Invoices meterline saw finalized at Stripe (and drafts its spike guard flagged), newest period first,
    each with `ledger_cents`, the ledger's figure for its period (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    found = await asyncio.to_thread(invoice_service.invoice_rows, runtime.current(), customer_id, limit)
    return JSONResponse({"invoices": found})


class CreditBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd: Annotated[str, Field(pattern=r"^\d{1,9}(\.\d{1,2})?$")]
    why: Annotated[str | None, Field(max_length=500)] = None


@router.post("/invoices/{invoice_id}/approve")
async def approve_invoice(invoice_id: Annotated[str, Path(pattern=r"^in_[A-Za-z0-9_]{1,250}$")],
                          authorization: Authorization = None) -> JSONResponse:
    """Release a draft the spike guard held (master key)."""
    return await _invoice_action(authorization, lambda meterline: invoice_service.approve(meterline, invoice_id))


@router.post("/invoices/{invoice_id}/credit")
async def credit_invoice(invoice_id: Annotated[str, Path(pattern=r"^in_[A-Za-z0-9_]{1,250}$")], body: CreditBody,
                         authorization: Authorization = None) -> JSONResponse:
    """A credit on that draft invoice only (master key): a negative invoice item."""
    return await _invoice_action(authorization, lambda meterline: invoice_service.credit(
        meterline, invoice_id, Fraction(body.usd), body.why))


async def _invoice_action(authorization: str | None, action) -> JSONResponse:
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    try:
        return JSONResponse(await asyncio.to_thread(action, runtime.current()))
    except invoice_service.InvoiceRefused as refused:
        return _error(409, "invoice_refused", str(refused))
    except ConfigError as problem:
        return _error(409, "stripe_not_configured", str(problem).splitlines()[0])
    except stripe.StripeError as problem:
        return _error(502, "stripe_unavailable", f"Stripe refused: {one_line(problem.user_message or str(problem))}")

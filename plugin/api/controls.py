"""Limits, previews, breakers, the global overage block and alerts, under /meterline/v1.

Customer routes take the customer's key (or the master key with X-Meterline-Customer, like the
proxy); operator routes take the master key. A customer key reaches only its own customer.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any, Literal

from fastapi import Header, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from plugin import breaker, runtime
from plugin.admission import breaker_message
from plugin.api.routes import Authorization, _error, operator_refusal, router
from plugin.breaker import BreakerStatus
from plugin.counters.base import Account
from plugin.identity import CUSTOMER_HEADER, AuthFailure, identify
from plugin.ledger import accounts
from plugin.ledger import store as ledger_store
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK, Profile
from plugin.ledger.store import StoreError, as_utc
from plugin.limits import next_threshold, soft_limit_base_ucr, threshold_ucr, usd_limit_as_ucr
from plugin.plans import credits_to_ucr
from plugin.policy import Refusal, decide, refusal_message, usd_text
from plugin.settings import ThresholdPct, decimal_text

MAX_LIMIT_UCR = 10**15
"""A billion credits: past this a limit is a typo, not a limit."""

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


def limits_json(meterline: runtime.Meterline, profile: Profile) -> dict[str, Any]:
    limits = profile.limits
    limit = meterline.ceiling_of(profile)
    return {
        "customer_id": profile.customer_id,
        "soft_thresholds_pct": None if limits.soft_thresholds_pct is None else list(limits.soft_thresholds_pct),
        "effective_soft_thresholds_pct": list(limits.thresholds(meterline.config.policies.soft_thresholds_pct)),
        "hard_limit_ucr": limits.hard_limit_ucr,
        "hard_limit_usd": None if limits.hard_limit_usd is None else decimal_text(limits.hard_limit_usd),
        "block_overage": limits.block_overage,
        "notify_email": limits.notify_email,
        "notify_webhook_url": limits.notify_webhook_url,
        "cap_ucr": None if limit is None else limit.ucr,
        "cap_reason": None if limit is None else limit.reason.value,
    }


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_MONEY = re.compile(r"\d{1,9}(\.\d{1,6})?")


class LimitsBody(BaseModel):
    """DESIGN "Limits body": omitted fields stay as they are, `null` clears one."""

    model_config = ConfigDict(extra="forbid")

    soft_thresholds_pct: list[ThresholdPct] | None = Field(default=None, max_length=10)
    hard_limit_ucr: Annotated[StrictInt, Field(ge=1, le=MAX_LIMIT_UCR)] | None = None
    hard_limit_usd: str | None = Field(default=None, description='Dollars as a string, e.g. "25" or "25.50".')
    block_overage: StrictBool | None = None
    notify_email: str | None = Field(default=None, max_length=254)
    notify_webhook_url: str | None = Field(default=None, max_length=2000)

    @field_validator("hard_limit_usd")
    @classmethod
    def _money(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _MONEY.fullmatch(value.strip()) or Decimal(value) <= 0:
            raise ValueError('write dollars as a positive decimal string, e.g. "25" or "25.50"')
        return value.strip()

    @field_validator("notify_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError("not an email address")
        return value

    @field_validator("notify_webhook_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError("must be an http(s) URL")
        return value

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class LimitsRefused(ValueError):
    """Limits that cannot be stored; the message says which field and why."""

    def __init__(self, message: str, param: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def validated_limits(meterline: runtime.Meterline, customer_id: str, body: LimitsBody | dict) -> dict[str, Any]:
    """The changes to store, after every check (shared by the API and the CLI); or LimitsRefused."""
    if isinstance(body, dict):
        try:
            body = LimitsBody.model_validate(body)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ())) or "body"
            raise LimitsRefused(f"{where}: {first.get('msg', 'invalid value')}", param=where) from None
    changes = body.changes()
    if changes.get("hard_limit_ucr") is not None and changes.get("hard_limit_usd") is not None:
        raise LimitsRefused("Set hard_limit_ucr or hard_limit_usd, not both.", param="hard_limit_usd")
    profile = accounts.load_profile(meterline.engine, customer_id)
    if profile is None:
        raise LimitsRefused(f"No customer {customer_id!r}.", status=404)
    if changes.get("hard_limit_usd") is not None:
        if usd_limit_as_ucr(Fraction(changes["hard_limit_usd"]), meterline.plan_of(profile)) is None:
            raise LimitsRefused(f"The {profile.plan} plan charges nothing for usage, so a limit in dollars cannot be "
                                "reached; set hard_limit_ucr instead.", param="hard_limit_usd")
    if "block_overage" in changes and changes["block_overage"] is None:
        changes["block_overage"] = False  # null clears: back to the default, overage allowed
    return changes


async def _put_limits(customer_id: str, body: LimitsBody, by: str) -> JSONResponse:
    meterline = runtime.current()

    def store_them() -> dict[str, Any]:
        changes = validated_limits(meterline, customer_id, body)
        accounts.put_limits(meterline.engine, customer_id, changes, by=by)
        meterline.directory.forget(customer_id)
        return limits_json(meterline, accounts.load_profile(meterline.engine, customer_id))

    try:
        return JSONResponse(await asyncio.to_thread(store_them))
    except LimitsRefused as refused:
        reason = "unknown_customer" if refused.status == 404 else "invalid_request"
        return _error(refused.status, reason, str(refused), param=refused.param)


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
    meterline = runtime.current()
    profile = await asyncio.to_thread(accounts.load_profile, meterline.engine, customer_id)
    return JSONResponse(limits_json(meterline, profile))


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


def breaker_json(customer_id: str, state: breaker.BreakerState, events) -> dict[str, Any]:
    return {
        "customer_id": customer_id, "status": state.status.value,
        "since": None if state.since is None else as_utc(state.since).isoformat(),
        "by": state.by, "reason": state.reason,
        "events": [{"at": as_utc(event.at).isoformat(), "before": event.before, "after": event.after,
                    "by": event.by, "why": event.why} for event in events],
    }


def move_breaker(meterline: runtime.Meterline, customer_id: str, action: str, by: str, why: str) -> dict[str, Any]:
    """Trip or reset a customer's breaker by hand, audited (shared by the API and the CLI)."""
    if ledger_store.get_customer(meterline.engine, customer_id) is None:
        raise StoreError(f"unknown customer {customer_id!r}")
    current = accounts.get_breaker(meterline.engine, customer_id)
    now = meterline.clock()
    why = why or f"{action} by {by}"
    move = breaker.trip if action == "trip" else breaker.reset
    state, transition = move(current, now=now, by=by, why=why)
    accounts.save_breaker(meterline.engine, customer_id, state, transition)
    meterline.directory.forget(customer_id)
    return breaker_json(customer_id, state, accounts.breaker_events(meterline.engine, customer_id, limit=20))


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
    engine = runtime.current().engine

    def read():
        return accounts.get_breaker(engine, customer_id), accounts.breaker_events(engine, customer_id, limit=100)

    state, events = await asyncio.to_thread(read)
    return JSONResponse(breaker_json(customer_id, state, events))


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
         "message": item.message, "created_at": as_utc(item.created_at).isoformat()} for item in found
    ]})


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


def preview_answer(meterline: runtime.Meterline, profile: Profile, model: str, prompt_tokens: int,
                   max_tokens: int | None) -> dict[str, Any]:
    """The preview, over the customer's current counters (read, not reserved)."""
    now = meterline.clock()
    policies = meterline.config.policies
    plan = meterline.plan_of(profile)
    period = meterline.period(profile, now)
    limit = meterline.ceiling_of(profile)
    estimate = meterline.estimate(model, prompt_tokens, max_tokens)
    credits = estimate.cost(estimate.max_tokens)
    snapshot = meterline.counters.snapshot(Account(profile.customer_id, period.start), now)
    decision = decide(estimate, used_ucr=snapshot.used_ucr, reserved_ucr=snapshot.reserved_ucr, limit=limit,
                      min_output_tokens=policies.min_output_tokens)
    answer: dict[str, Any] = {"credits_ucr": credits, "cost_usd": _overage_usd(plan, snapshot.used_ucr, credits),
                              "verdict": "allowed", "reason": None, "message": None, "max_tokens": None,
                              "remaining_ucr_after": None}
    if limit is not None:
        answer["remaining_ucr_after"] = max(0, limit.ucr - snapshot.used_ucr - snapshot.reserved_ucr - credits)
    if profile.breaker.status is BreakerStatus.OPEN:
        return answer | {"verdict": "refused", "reason": Refusal.CIRCUIT_OPEN.value,
                         "message": breaker_message(profile.breaker)}
    if not decision.admit:
        return answer | {"verdict": "refused", "reason": decision.reason.value,
                         "message": refusal_message(decision.reason, limit, profile.plan, period.end,
                                                    detail=policies.refusal_detail)}
    if decision.max_tokens is not None:
        answer |= {"reason": "max_tokens_lowered", "max_tokens": decision.max_tokens,
                   "credits_ucr": decision.reserve_ucr,
                   "cost_usd": _overage_usd(plan, snapshot.used_ucr, decision.reserve_ucr)}
    base = soft_limit_base_ucr(plan, limit, 0)
    upcoming = next_threshold(profile.limits.thresholds(policies.soft_thresholds_pct), base, snapshot.used_ucr)
    if upcoming is not None and snapshot.used_ucr + answer["credits_ucr"] >= threshold_ucr(base, upcoming):
        answer |= {"verdict": "soft_limit", "reason": answer["reason"] or f"soft_limit_{upcoming}pct"}
    return answer


def _overage_usd(plan, used_ucr: int, credits_ucr: int) -> str:
    """What a charge of `credits_ucr` adds to the invoice: only the part past the included quota costs."""
    if not plan.has_overage or not plan.overage_usd_per_credit:
        return "0.00"
    included = credits_to_ucr(plan.included_credits)
    charged = max(0, used_ucr + credits_ucr - max(included, used_ucr))
    return usd_text(Fraction(charged, 1_000_000) * plan.overage_usd_per_credit).removeprefix("$")


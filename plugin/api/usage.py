"""Usage and the fleet, under /meterline/v1 (DESIGN "Contract: usage API").

`GET /usage` and `GET /usage/daily` answer a customer key (or the master key with
X-Meterline-Customer) about its own customer only; the `/customers` routes take the master key.
Every answer comes from plugin/services; this module only turns HTTP into a call and back.
"""

from __future__ import annotations

import asyncio
import gzip
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import Header, Path, Query
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from plugin import __version__, runtime
from plugin.api.controls import CustomerHeader, _customer
from plugin.api.routes import PREFIX, Authorization, _error, operator_refusal, router
from plugin.ledger.store import StoreError
from plugin.services.customers import UnknownPlan
from plugin.services.fleet import MAX_PAGE, create_customer, customer_detail, fleet_json
from plugin.services.usage import UnknownCustomer, usage_daily, usage_report
from plugin.settings import valid_customer_id

CustomerId = Annotated[str, Path(max_length=64)]
Period = Annotated[Literal["current", "previous"] | None, Query()]
At = Annotated[datetime | None, Query(description="An instant (ISO 8601): the period holding it.")]


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)
"""The instants `at` may name: a billing period of any of them can be computed (and is empty, mostly)."""


async def _report(customer_id: str, period: str | None, at: datetime | None) -> JSONResponse:
    if period is not None and at is not None:
        return _error(422, "invalid_request", "Give `period` or `at`, not both.", param="at")
    at = _utc(at)
    if at is not None and not EARLIEST <= at < LATEST:
        return _error(422, "invalid_request", "at: must be between 1970 and 9000.", param="at")
    meterline = runtime.current()
    try:
        report = await asyncio.to_thread(usage_report, meterline, customer_id, meterline.clock(), period or "current",
                                         at)
    except UnknownCustomer:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")
    return JSONResponse(report)


@router.get("/usage")
async def own_usage(authorization: Authorization = None, customer: CustomerHeader = None, period: Period = None,
                    at: At = None) -> JSONResponse:
    """The caller's own usage this period (or `period=previous`, or the period holding `at`)."""
    customer_id, refusal = await _customer(authorization, customer)
    if refusal is not None:
        return refusal
    return await _report(customer_id, period, at)


@router.get("/usage/daily")
async def own_daily_usage(authorization: Authorization = None, customer: CustomerHeader = None,
                          days: Annotated[int, Query(ge=1, le=366)] = 30) -> JSONResponse:
    """The caller's usage per UTC day, the last `days` days, oldest first, zeros included."""
    customer_id, refusal = await _customer(authorization, customer)
    if refusal is not None:
        return refusal
    meterline = runtime.current()
    return JSONResponse(await asyncio.to_thread(usage_daily, meterline, customer_id, meterline.clock(), days))


@router.get("/customers/{customer_id}/usage")
async def customer_usage(customer_id: CustomerId, authorization: Authorization = None, period: Period = None,
                         at: At = None) -> JSONResponse:
    """A customer's usage, for the operator (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    return await _report(customer_id, period, at)


FLEET_GZIP_LEVEL = 1
"""The fleet's answer is megabytes of repetitive JSON for a console that may be remote: level 1
shrinks 10,000 customers' 4 MB ~6x in ~25 ms, where LiteLLM's own gzip (level 6, which it skips
for an answer already encoded) takes ~80 ms for ~7x."""


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip`, `x-gzip` or `*`, with a q-value above 0)."""
    weights = {}
    for part in (accept_encoding or "").lower().split(","):
        coding, *parameters = (piece.strip() for piece in part.split(";"))
        quality = next((parameter[2:] for parameter in parameters if parameter.startswith("q=")), "1")
        try:
            weights[coding] = float(quality)
        except ValueError:
            weights[coding] = 0.0
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


@router.get("/customers")
async def customers(authorization: Authorization = None,
                    q: Annotated[str | None, Query(max_length=64, description="Customer id contains this.")] = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
                    cursor: Annotated[str | None, Query(max_length=64)] = None,
                    accept_encoding: Annotated[str | None, Header(include_in_schema=False)] = None) -> Response:
    """The fleet in one call: every customer's period, hour, today, burn and limits (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    answer = await asyncio.to_thread(fleet_json, meterline, meterline.clock(), contains=q, after=cursor, limit=limit)
    if not accepts_gzip(accept_encoding):
        return Response(answer, media_type="application/json", headers={"Vary": "Accept-Encoding"})
    return Response(await asyncio.to_thread(gzip.compress, answer, FLEET_GZIP_LEVEL), media_type="application/json",
                    headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})


@router.get("/customers/{customer_id}")
async def customer(customer_id: CustomerId, authorization: Authorization = None) -> JSONResponse:
    """One customer's fleet row, its members, its last 50 ledger rows and its breaker's history (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    try:
        return JSONResponse(await asyncio.to_thread(customer_detail, meterline, customer_id, meterline.clock()))
    except UnknownCustomer:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")


class NewCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=64)
    plan: str = Field(min_length=1, max_length=64)
    stripe_customer_id: str | None = Field(default=None, pattern=r"^cus_[A-Za-z0-9]{1,250}$")


@router.post("/customers")
async def add(body: NewCustomer, authorization: Authorization = None) -> JSONResponse:
    """Add a customer (master key): 201 with its fleet row; 409 when it exists; 422 for an unknown plan."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    if not valid_customer_id(body.customer_id):
        return _error(422, "invalid_request", "customer_id: letters, digits and _.@:- only, at most 64 characters.",
                      param="customer_id")
    meterline = runtime.current()
    try:
        row = await asyncio.to_thread(create_customer, meterline, body.customer_id, body.plan,
                                      body.stripe_customer_id, meterline.clock())
    except UnknownPlan as unknown:
        return _error(422, "unknown_plan", str(unknown), param="plan")
    except StoreError:
        return _error(409, "customer_exists", f"Customer {body.customer_id!r} already exists.")
    return JSONResponse(row, status_code=201)


@router.get("/openapi.json")
async def openapi() -> JSONResponse:
    """The OpenAPI description of meterline's own routes (open, like LiteLLM's)."""
    return JSONResponse(get_openapi(title="meterline", version=__version__, routes=router.routes,
                                    description=f"meterline's HTTP API, under {PREFIX}."))

"""The customer's usage page, under /meterline/v1 (DESIGN "Contract: usage API", `GET /usage/page`).

The page is reached with a signed link (`?token=`, minted by the operator with the master key for one
customer) or with the customer's own key, and only ever shows that one customer. Its limits form posts
back here, so it works without JavaScript: stored, then redirected to the page (303), or shown again with
the refusal (422). Rendering is plugin/api/page_html.py; the figures are plugin/services/usage.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from datetime import UTC
from fractions import Fraction
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from plugin import runtime
from plugin.api.controls import CustomerHeader, _customer
from plugin.api.page_html import FORM_FIELDS, render_page
from plugin.api.routes import PREFIX, Authorization, _error, operator_refusal, router
from plugin.ledger import store as ledger_store
from plugin.rules import page_tokens
from plugin.rules.page_tokens import InvalidPageToken
from plugin.rules.pricing import UCR_PER_CREDIT
from plugin.services.limits import MAX_LIMIT_UCR, LimitsRefused, set_limits
from plugin.services.usage import UnknownCustomer, usage_report

PAGE_PATH = "/usage/page"
LIMITS_PATH = "/usage/page/limits"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors *",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
"""Nothing loads from elsewhere, anyone may embed the page, and the token in its URL is never passed on."""

CustomerId = Annotated[str, Path(max_length=64)]
Token = Annotated[str | None, Query(max_length=1024, description="A page token from POST /customers/{id}/page-token.")]
_FORM_TYPE = "application/x-www-form-urlencoded"  # what a browser posts for the page's form
_CREDITS = re.compile(r"\d{1,15}(\.\d+)?", re.ASCII)  # what a person types; bounds the arithmetic
_LABELS = {"soft_thresholds_pct": "Warn me at", "hard_limit_ucr": "Hard limit", "block_overage": "Block overage"}
_TYPED_MAX = 200  # characters of a posted field shown back to the customer


@router.post("/customers/{customer_id}/page-token")
async def mint_page_token(customer_id: CustomerId, authorization: Authorization = None,
                          ttl_seconds: Annotated[int, Query(ge=60, le=2_592_000)] = 3600) -> JSONResponse:
    """A signed link to one customer's usage page, for the operator to hand out (master key)."""
    if (refusal := operator_refusal(authorization)) is not None:
        return refusal
    meterline = runtime.current()
    secret = meterline.page_secret
    if secret is None:
        return _error(503, "page_tokens_unavailable", "Set METERLINE_PAGE_SECRET (or LITELLM_MASTER_KEY) to mint "
                                                      "usage page links.")
    if await asyncio.to_thread(ledger_store.get_customer, meterline.engine, customer_id) is None:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")
    token, expires_at = page_tokens.mint(secret, customer_id, meterline.clock(), ttl_seconds)
    return JSONResponse({"token": token, "url": f"{PREFIX}{PAGE_PATH}?{urlencode({'token': token})}",
                         "expires_at": expires_at.astimezone(UTC).isoformat()}, status_code=201)


async def _page_customer(token: str | None, authorization: str | None,
                         named: str | None) -> tuple[str | None, JSONResponse | None]:
    """The one customer the caller may see: the token's when one is given (nothing else can switch it),
    else the key's, as on every customer route."""
    if token is None:
        return await _customer(authorization, named)
    meterline = runtime.current()
    secret = meterline.page_secret
    if secret is None:
        return None, _error(503, "page_tokens_unavailable", "Usage page links are not configured on this proxy.")
    try:
        return page_tokens.verify(secret, token, meterline.clock()), None
    except InvalidPageToken as invalid:
        return None, _error(401, "invalid_page_token", str(invalid))


def _url(request: Request, path: str, token: str | None, **query: str) -> str:
    """A path on this proxy (under any root path it is served at), carrying the token the page came with."""
    params = ({"token": token} if token is not None else {}) | query
    return request.scope.get("root_path", "") + PREFIX + path + (f"?{urlencode(params)}" if params else "")


def _page_html(customer_id: str, form_action: str, notice: str | None, error: str | None,
               typed: Mapping[str, str] | None) -> str:
    meterline = runtime.current()
    report = usage_report(meterline, customer_id, meterline.clock())
    return render_page(report, form_action=form_action, notice=notice, error=error, typed=typed)


async def _page(request: Request, customer_id: str, token: str | None, *, notice: str | None = None,
                error: str | None = None, typed: Mapping[str, str] | None = None, status: int = 200) -> Response:
    try:
        html = await asyncio.to_thread(_page_html, customer_id, _url(request, LIMITS_PATH, token), notice, error, typed)
    except UnknownCustomer:
        return _error(404, "unknown_customer", f"No customer {customer_id!r}.")
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


@router.get(PAGE_PATH)
async def usage_page(request: Request, token: Token = None, saved: Annotated[bool, Query()] = False,
                     authorization: Authorization = None, customer: CustomerHeader = None) -> Response:
    """The caller's usage this period as a page: numbers first, a daily chart, and its limits form."""
    customer_id, refusal = await _page_customer(token, authorization, customer)
    if refusal is not None:
        return refusal
    return await _page(request, customer_id, token, notice="Your limits are saved." if saved else None)


def limits_from_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The limits body (`set_limits`) of the page's form: empty fields mean "default" and "no limit",
    the checkbox is on when posted. LimitsRefused, with a message for the customer, when a field is not
    a number."""
    soft_text = form.get("soft_thresholds_pct", "").replace("%", " ").strip()
    soft = None
    if soft_text:
        parts = [part.strip() for part in soft_text.split(",")]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise LimitsRefused("Warn me at: write whole percentages separated by commas, e.g. 50, 80, 100.",
                                param="soft_thresholds_pct")
        soft = [int(part) for part in parts]
    hard_text = form.get("hard_limit_credits", "").replace(",", "").replace(" ", "")
    hard = None
    if hard_text:
        if not _CREDITS.fullmatch(hard_text) or (ucr := Fraction(hard_text) * UCR_PER_CREDIT) <= 0:
            raise LimitsRefused("Hard limit: write a positive number of credits, e.g. 500 or 2.5, or leave it empty.",
                                param="hard_limit_ucr")
        if ucr.denominator != 1:
            raise LimitsRefused("Hard limit: credits have at most 6 decimal places.", param="hard_limit_ucr")
        if ucr > MAX_LIMIT_UCR:
            raise LimitsRefused(f"Hard limit: at most {MAX_LIMIT_UCR // UCR_PER_CREDIT:,} credits.",
                                param="hard_limit_ucr")
        hard = int(ucr)
    return {"soft_thresholds_pct": soft, "hard_limit_ucr": hard, "block_overage": bool(form.get("block_overage"))}


def _in_form_words(refused: LimitsRefused) -> str:
    """The refusal with the form's label for the field instead of the API's name ("Warn me at: ...")."""
    message, field = str(refused), refused.param or ""
    label = _LABELS.get(field.split(".")[0])
    if label is None or not message.startswith(f"{field}: "):
        return message
    reason = message.removeprefix(f"{field}: ")
    return f"{label}: {reason}" + ("" if reason.endswith(".") else ".")


@router.post(LIMITS_PATH)
async def usage_page_limits(request: Request, token: Token = None, authorization: Authorization = None,
                            customer: CustomerHeader = None) -> Response:
    """The page's limits form: stored, then back to the page (303); or the page again with why not (422)."""
    customer_id, refusal = await _page_customer(token, authorization, customer)
    if refusal is not None:
        return refusal
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != _FORM_TYPE:
        return _error(415, "invalid_request", f"Post the page's form ({_FORM_TYPE}); programs set limits with "
                                              "PUT /limits.")
    posted = await request.form()  # url-encoded: every value is text, never a file
    fields = {name: str(posted.get(name, "")) for name in FORM_FIELDS}
    typed = {name: value[:_TYPED_MAX] for name, value in fields.items()}
    try:
        body = limits_from_form(fields)
        await asyncio.to_thread(set_limits, runtime.current(), customer_id, body, by=f"customer:{customer_id}")
    except LimitsRefused as refused:
        if refused.status == 404:
            return _error(404, "unknown_customer", str(refused))
        return await _page(request, customer_id, token, error=_in_form_words(refused), typed=typed, status=422)
    return RedirectResponse(_url(request, PAGE_PATH, token, saved="1"), status_code=303)

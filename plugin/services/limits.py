"""A customer's limits: validate, store, show. One place for the API (`PUT /limits`,
`PUT /customers/{id}/limits`) and the CLI (`meterline limits`)."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from plugin.ledger import accounts
from plugin.ledger.accounts import Profile
from plugin.rules.limits import usd_limit_as_ucr
from plugin.runtime import Meterline
from plugin.settings import ThresholdPct, decimal_text

MAX_LIMIT_UCR = 10**15
"""A billion credits: past this a limit is a typo, not a limit."""


def limits_json(meterline: Meterline, profile: Profile) -> dict[str, Any]:
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


def validated_limits(meterline: Meterline, customer_id: str, body: LimitsBody | dict) -> dict[str, Any]:
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


def set_limits(meterline: Meterline, customer_id: str, body: LimitsBody | dict, *, by: str) -> dict[str, Any]:
    """Validate and store a customer's limits; returns them as stored (`limits_json`), or LimitsRefused.
    This process forgets what it remembered of the customer, so its next request sees them at once."""
    changes = validated_limits(meterline, customer_id, body)
    accounts.put_limits(meterline.engine, customer_id, changes, by=by)
    meterline.directory.forget(customer_id)
    return limits_json(meterline, accounts.load_profile(meterline.engine, customer_id))


def show_limits(meterline: Meterline, customer_id: str) -> dict[str, Any]:
    """A customer's limits as stored (`limits_json`); LimitsRefused (404) for an unknown customer."""
    profile = accounts.load_profile(meterline.engine, customer_id)
    if profile is None:
        raise LimitsRefused(f"No customer {customer_id!r}.", status=404)
    return limits_json(meterline, profile)

"""Deployment settings (environment) and business configuration (meterline.yaml).

Two sources on purpose: the environment says *where* things run (database, Redis, keys), the
YAML file says *what* is sold (pricing, plans, policies) and is reviewed like code.
Money values in the YAML are written as strings ("0.15") and parsed as exact decimals: a float
never enters the money path.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """meterline.yaml or the environment is invalid; the message says where."""


def _exact(value: object) -> Fraction:
    """Parse a YAML scalar into an exact rational. Floats are refused: write "0.15", not 0.15."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        raise ValueError(f"write money and ratios as quoted strings, e.g. \"{value}\" (floats are inexact)")
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        if not parsed.is_finite():
            raise ValueError(f"not a finite number: {value!r}")
        return Fraction(parsed)
    raise ValueError(f"expected a number, got {type(value).__name__}")


def _non_negative(value: Fraction) -> Fraction:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive(value: Fraction) -> Fraction:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


NonNegative = Annotated[Fraction, BeforeValidator(lambda v: _non_negative(_exact(v)))]
Positive = Annotated[Fraction, BeforeValidator(lambda v: _positive(_exact(v)))]


ThresholdPct = Annotated[int, Field(ge=1, le=1000, strict=True)]
"""A soft-limit threshold in percent: 1 to 1000 (ten times the base is as far as a warning makes sense)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class WeightsConfig(_Strict):
    """Weight of each token class in the posted ratio (tokens basis).

    An omitted class inherits: a model's weights from `pricing.weights`, and those from
    DEFAULT_WEIGHTS. So `weights: {output: "3"}` changes the output weight and nothing else.
    """

    input: NonNegative | None = None
    cached_input: NonNegative | None = None
    output: NonNegative | None = None
    audio_input: NonNegative | None = None
    audio_output: NonNegative | None = None
    image_input: NonNegative | None = None


class ModelPricingConfig(_Strict):
    basis: Literal["tokens", "cost"] | None = None
    tokens_per_credit: Positive | None = None
    weights: WeightsConfig = WeightsConfig()
    markup: NonNegative | None = None
    credits_per_usd: Positive | None = None


DEFAULT_WEIGHTS = WeightsConfig(
    input=Fraction(1), cached_input=Fraction(1, 10), output=Fraction(4),
    audio_input=Fraction(8), audio_output=Fraction(16), image_input=Fraction(1),
)


class PricingConfig(_Strict):
    """How usage becomes credits. See README "Pricing" for the formula."""

    basis: Literal["tokens", "cost"] = "tokens"
    tokens_per_credit: Positive = Fraction(1000)
    weights: WeightsConfig = WeightsConfig()
    markup: NonNegative = Fraction(3, 10)
    credits_per_usd: Positive = Fraction(1000)
    models: dict[str, ModelPricingConfig] = {}


class PriceConfig(_Strict):
    """Provider price in USD per million tokens (overrides LiteLLM's model_cost)."""

    input: NonNegative
    output: NonNegative
    cached_input: NonNegative | None = None
    audio_input: NonNegative | None = None
    audio_output: NonNegative | None = None
    image_input: NonNegative | None = None


class OverageTier(_Strict):
    """One step of graduated overage: credits past the included quota up to `up_to_credits` (cumulative,
    counted from the quota) cost `usd_per_credit` each; the last tier has no bound."""

    up_to_credits: Positive | None = None
    usd_per_credit: NonNegative

    @field_validator("up_to_credits")
    @classmethod
    def _whole_micro_credits(cls, value: Fraction | None) -> Fraction | None:
        if value is not None and (value * 1_000_000).denominator != 1:
            raise ValueError("at most 6 decimal places (whole micro-credits)")
        return value


class PlanConfig(_Strict):
    """A plan: what is included, what is capped, and what Stripe charges (`meterline stripe setup`)."""

    included_credits: NonNegative = Fraction(0)
    cap_credits: NonNegative | None = None
    base_fee_usd: NonNegative | None = None
    """Flat monthly fee; None = no base price at Stripe."""
    overage_usd_per_credit: NonNegative | None = None
    """Price of each credit past `included_credits`; None = no metered price at Stripe."""
    overage_tiers: tuple[OverageTier, ...] | None = Field(default=None, min_length=1, max_length=20)
    """Graduated overage instead of one rate (volume discounts): each tier prices the credits that fall in
    it. Exclusive with `overage_usd_per_credit`."""
    max_output_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    """Most output tokens one request may ask for: a larger max_tokens is lowered to it and a request without
    one is given it, so no runaway output eats the margin. None = no ceiling."""
    metered: bool = True
    """False for legacy flat-rate plans: calls are still in the ledger (margin review) but never
    reported to the sink, so they are never billed for overage."""
    requests_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)
    """Sliding-window rate limit per customer; None = none."""

    @field_validator("overage_tiers")
    @classmethod
    def _graduated(cls, tiers: tuple[OverageTier, ...] | None) -> tuple[OverageTier, ...] | None:
        """Bounds strictly ascending, every tier bounded but the last, which is not: each credit past the
        quota falls in exactly one tier."""
        if tiers is None:
            return None
        if tiers[-1].up_to_credits is not None:
            raise ValueError("the last tier must have no up_to_credits (it prices every credit beyond)")
        for index, tier in enumerate(tiers[:-1]):
            if tier.up_to_credits is None:
                raise ValueError(f"tier {index + 1} needs up_to_credits: only the last tier is unbounded")
            if index and tier.up_to_credits <= tiers[index - 1].up_to_credits:
                raise ValueError(f"tier {index + 1}: up_to_credits must be above the previous tier's "
                                 f"({decimal_text(tiers[index - 1].up_to_credits)}); bounds are cumulative")
        return tiers

    @model_validator(mode="after")
    def _one_overage_price(self) -> PlanConfig:
        if self.overage_tiers is not None and self.overage_usd_per_credit is not None:
            raise ValueError("set overage_usd_per_credit or overage_tiers, not both")
        return self

    @property
    def has_overage(self) -> bool:
        """Whether credits past the included quota are charged (what an overage block can stop)."""
        return self.metered and (self.overage_usd_per_credit is not None or self.overage_tiers is not None)


class TermsOverride(_Strict):
    """A customer's own terms over its plan's (enterprise deals): each field set here wins."""

    included_credits: NonNegative | None = None
    cap_credits: NonNegative | None = None
    base_fee_usd: NonNegative | None = None
    overage_usd_per_credit: NonNegative | None = None
    requests_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)

    def given(self) -> dict[str, object]:
        """The fields set, as values (model_dump would turn the Fractions into strings)."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}

    def apply(self, plan: PlanConfig) -> PlanConfig:
        """The plan under these terms; an agreed flat overage rate replaces the plan's overage tiers."""
        given = self.given()
        if "overage_usd_per_credit" in given:
            given["overage_tiers"] = None
        return plan.model_copy(update=given)

    def merged(self, newer: TermsOverride) -> TermsOverride:
        """These terms with the fields `newer` sets replaced."""
        return self.model_copy(update=newer.given())

    def to_json(self) -> str:
        """Exact decimals as strings (what `model_validate_json` reads back), unset fields left out."""
        values = {name: decimal_text(value) if isinstance(value, Fraction) else value
                  for name, value in self.given().items()}
        return json.dumps(values, sort_keys=True)


def decimal_text(value: Fraction) -> str:
    """An exact decimal as text ("0.0015"); config values are decimals, so this never rounds."""
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


class CacheHitFee(_Strict):
    """A flat fee per cache hit, in credits (e.g. "0.01"), instead of free cache hits."""

    flat_fee_credits: NonNegative


class BreakerConfigModel(_Strict):
    """The spend-velocity circuit breaker (plugin/rules/breaker.py)."""

    enabled: bool = True
    multiplier: Positive = Fraction(10)
    """Trip when the last hour's spend exceeds this many times the typical hourly spend."""
    floor_credits_per_hour: NonNegative = Fraction(100)
    """The typical hourly spend is never taken as less than this: a new customer is frozen only past
    K x this in an hour (1,000 credits by default, a tenth of the pro plan's month)."""
    baseline_days: int = Field(default=7, ge=1, le=90)
    cool_down_minutes: int | None = Field(default=None, ge=1, le=10_080)
    """None: an open breaker waits for an operator. Else a trickle is let through after this long."""
    trickle_requests: int = Field(default=3, ge=1, le=1000)


class PoliciesConfig(_Strict):
    cache_hits: Literal["free"] | CacheHitFee = "free"
    stream_disconnect: Literal["delivered"] = "delivered"
    reservation_output_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    """Output tokens reserved for a request that sets no max_tokens: a sane default, not the model's
    maximum, so a capped customer is not refused for phantom output."""
    min_output_tokens: int = Field(default=16, ge=1, le=100_000)
    """Below this many affordable output tokens a capped request is refused rather than clamped."""
    reservation_seconds: int = Field(default=900, ge=10, le=86_400)
    """How long a reservation holds if its request never settles (a crashed proxy)."""
    slice_requests: int = Field(default=32, ge=1, le=10_000)
    """A proxy process reserves budget for this many of a capped customer's requests at once and
    admits them from memory (plugin/rules/slices.py); 1 reserves per request. Never more than a quarter
    of what the customer has left, so near the ceiling every request reserves for itself."""
    slice_seconds: float = Field(default=2.0, gt=0, le=60)
    """How long a budget slice admits requests before what is left of it is given back."""
    refusal_detail: Literal["full", "minimal"] = "full"
    """Whether a 402 message may show amounts (`minimal` for apps that pass it to end users)."""
    soft_thresholds_pct: tuple[ThresholdPct, ...] = Field(default=(80,), max_length=10)
    """Soft-limit thresholds (percent of the included quota, else of the hard limit, else of the
    typical period spend) for customers who set none."""
    breaker: BreakerConfigModel = BreakerConfigModel()
    reconcile_threshold_pct: float = Field(default=1.0, ge=0, le=100)
    """A customer whose ledger and Stripe differ by more than this share of its ledger has diverged."""
    invoice_spike_pct: float = Field(default=50.0, ge=0, le=100_000)
    """A draft invoice more than this many percent above the customer's previous finalized one is a spike."""
    invoice_spike_action: Literal["alert", "hold"] = "alert"
    """`hold` also stops the draft from finalizing (auto_advance off) until `meterline invoices approve`."""
    safety_credit_pct: Positive = Fraction(110)
    """A customer moved to metered billing (`meterline migrate schedule`) pays at most this percent of its old
    flat price on its first metered invoice: a draft above it gets a credit for the difference. Exact ("112.5")."""


class StripeBillingConfig(_Strict):
    """What `meterline stripe setup` creates at Stripe, and the meter the relay reports to.

    Meter values are micro-credits (µcr), so prices are per µcr at Stripe and billing stays exact.
    """

    meter_event_name: str = Field(default="meterline_credits", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    meter_display_name: str = "meterline credits"
    product_name: str = "meterline credits"
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    lookup_key_prefix: str = Field(default="meterline", pattern=r"^[A-Za-z0-9_.-]{1,40}$")


class MeterlineConfig(_Strict):
    """The whole of meterline.yaml."""

    pricing: PricingConfig = PricingConfig()
    prices: dict[str, PriceConfig] = {}
    plans: dict[str, PlanConfig] = {"free": PlanConfig(cap_credits=Fraction(100)), "pro": PlanConfig()}
    policies: PoliciesConfig = PoliciesConfig()
    stripe: StripeBillingConfig = StripeBillingConfig()
    allow_anonymous: bool = False
    anonymous_customer: str = "anonymous"
    # When LiteLLM runs with its own database and custom_auth_settings.mode=auto, keys that are
    # not meterline keys are handed to LiteLLM's virtual-key auth instead of being refused here.
    defer_unknown_keys_to_litellm: bool = False


class Settings(BaseSettings):
    """Deployment settings from the environment (prefix METERLINE_)."""

    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore", frozen=True)

    database_url: str = "sqlite:///./meterline.db"
    redis_url: str | None = None
    config: Path = Path("meterline.yaml")
    fail_mode: Literal["closed", "open"] = "closed"
    key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    """How long a resolved key is remembered: a revoked key stops working within this time."""
    master_key: str | None = Field(
        default=None, validation_alias=AliasChoices("LITELLM_MASTER_KEY", "METERLINE_MASTER_KEY")
    )
    page_secret: str | None = None
    """Signs usage-page tokens (`POST /customers/{id}/page-token`); unset: derived from the master key,
    so rotating the master key also invalidates every page token."""

    # --- delivery of meter events (plugin/outbox, plugin/sinks)
    sink: Literal["stripe", "openmeter", "none"] | None = None
    """None = `stripe` when STRIPE_API_KEY is set, else `none`."""
    stripe_api_key: str | None = Field(default=None, validation_alias=AliasChoices("STRIPE_API_KEY"))
    stripe_api_base: str | None = None
    """A Stripe-compatible server instead of api.stripe.com (e.g. `meterline stripe-emulator`)."""
    stripe_meter_events_base: str | None = None
    """Base of the v2 meter event stream; defaults to METERLINE_STRIPE_API_BASE when that is set."""
    stripe_stream: bool = False
    """Send through the v2 meter event stream (batches of 100) instead of v1 meter events."""
    stripe_webhook_secret: str | None = Field(default=None, validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET"))
    openmeter_url: str | None = None
    openmeter_token: str | None = None
    relay: bool = True
    """Run a relay inside the proxy (workers started with `meterline relay` run either way)."""
    relay_batch: int = Field(default=500, ge=1, le=10_000)
    relay_concurrency: int = Field(default=16, ge=1, le=256)
    relay_lease_seconds: float = Field(default=60.0, ge=1, le=3600)
    relay_poll_seconds: float = Field(default=1.0, gt=0, le=300)
    relay_retry_base_seconds: float = Field(default=1.0, gt=0, le=3600)
    """First retry delay; doubles per attempt (with jitter) up to relay_retry_cap_seconds."""
    relay_retry_cap_seconds: float = Field(default=300.0, gt=0, le=86_400)
    outbox_alert_age_seconds: float = Field(default=900.0, gt=0)
    """Alert when the oldest undelivered meter event is older than this."""

    # --- reconciliation against Stripe (plugin/services/reconcile.py)
    reconcile_seconds: float = Field(default=3600.0, ge=0, le=7 * 86_400)
    """How often the proxy reconciles the ledger against Stripe's meter summaries; 0: never (the CLI still can)."""
    reconcile_lag_seconds: int = Field(default=120, ge=0, le=86_400)
    """The last minutes left out of a comparison: Stripe's summaries are eventually consistent."""

    # --- telling people (plugin/notify.py)
    smtp_host: str | None = None
    """Email is sent only when this is set."""
    smtp_port: int = Field(default=25, ge=1, le=65_535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_from: str = "meterline@localhost"
    smtp_starttls: bool = False
    alert_email: str | None = None
    """The operator's address for breaker trips and other alerts (comma-separated for several)."""
    alert_webhook_url: str | None = None
    """A Slack-compatible incoming webhook for operator alerts."""

    @property
    def sink_name(self) -> str:
        if self.sink is not None:
            return self.sink
        return "stripe" if self.stripe_api_key else "none"


def load_settings() -> Settings:
    """Settings from the environment; a bad value is a ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "*"
        name = field if field.isupper() else "METERLINE_" + field.upper()  # aliases are already full names
        raise ConfigError(f"environment: {name}: {first['msg']}") from None


def load_config(path: Path) -> MeterlineConfig:
    """Read meterline.yaml; a missing file means all defaults. Errors name the offending field."""
    if not path.exists():
        return MeterlineConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return MeterlineConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def config_path(settings: Settings) -> Path:
    """meterline.yaml path: METERLINE_CONFIG if set, else next to the working directory."""
    return settings.config if settings.config.is_absolute() else Path(os.getcwd()) / settings.config


_CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")


def valid_customer_id(value: str) -> bool:
    """Customer ids appear in Stripe payloads and file names: keep them short and plain."""
    return bool(_CUSTOMER_ID.fullmatch(value))

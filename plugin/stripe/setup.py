"""`meterline stripe setup` and `meterline stripe subscribe`: the Stripe catalog meterline bills through.

What is wanted is computed from meterline.yaml by pure functions (`catalog`); `StripeSetup` then
finds or creates each object, so a second run changes nothing. Objects are found by stable names:
the meter by its event name, the product by a fixed id, prices by lookup key. Stripe prices are
immutable, so a price whose amounts changed in meterline.yaml is replaced by a new one that takes
over the lookup key (`transfer_lookup_key`); existing subscriptions keep the old price until moved.

Meter values are micro-credits, so a metered price is in cents per µcr; Stripe takes up to 12
decimal places there, which keeps every rate a YAML file can reasonably say exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal

import stripe

from plugin.rules.plans import price_bands
from plugin.rules.pricing import UCR_PER_CREDIT
from plugin.settings import ConfigError, MeterlineConfig
from plugin.stripe.summaries import find_meter_id

_MAX_DECIMALS = 12


def exact_decimal(value: Fraction, what: str) -> Decimal:
    """`value` as a Decimal with at most 12 places (Stripe's limit), or a ConfigError saying why not."""
    scaled = value * 10**_MAX_DECIMALS
    if scaled.denominator != 1:
        raise ConfigError(f"{what}: {value} needs more than {_MAX_DECIMALS} decimal places at Stripe")
    return (Decimal(scaled.numerator) / Decimal(10**_MAX_DECIMALS)).normalize()


def _plain(value: Decimal) -> str:
    return format(value, "f")


@dataclass(frozen=True)
class Tier:
    up_to: int | None
    """Upper bound in µcr; None = infinity."""
    unit_amount_decimal: Decimal
    """Cents per µcr."""


@dataclass(frozen=True)
class PriceSpec:
    """A price meterline wants at Stripe for one plan."""

    plan: str
    kind: Literal["usage", "base"]
    lookup_key: str
    currency: str
    unit_amount: int | None = None
    """Base prices: whole cents per month."""
    tiers: tuple[Tier, ...] = ()
    """Usage prices: graduated tiers over the period's µcr."""

    def create_params(self, product_id: str, meter_id: str) -> dict:
        params: dict = {
            "product": product_id, "currency": self.currency, "lookup_key": self.lookup_key,
            "transfer_lookup_key": True, "nickname": f"meterline {self.plan} {self.kind}",
            "metadata": {"meterline_plan": self.plan, "meterline_kind": self.kind},
        }
        if self.kind == "base":
            return params | {"unit_amount": self.unit_amount, "recurring": {"interval": "month"}}
        return params | {
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
            "billing_scheme": "tiered", "tiers_mode": "graduated",
            "tiers": [{"up_to": "inf" if tier.up_to is None else tier.up_to,
                       "unit_amount_decimal": _plain(tier.unit_amount_decimal)} for tier in self.tiers],
        }

    def matches(self, price: stripe.Price, meter_id: str) -> bool:
        """Whether an existing Stripe price charges exactly what this spec says."""
        if price.currency != self.currency or not price.active:
            return False
        recurring = price.recurring
        if self.kind == "base":
            return price.unit_amount == self.unit_amount and recurring is not None and recurring.usage_type == "licensed"
        if recurring is None or recurring.usage_type != "metered" or recurring.meter != meter_id:
            return False
        existing = tuple(
            Tier(tier.up_to, Decimal(tier.unit_amount_decimal or tier.unit_amount or 0).normalize())
            for tier in (price.tiers or [])
        )
        return price.tiers_mode == "graduated" and existing == self.tiers


def catalog(config: MeterlineConfig) -> list[PriceSpec]:
    """The prices meterline.yaml asks for: per plan, a metered price (included credits at 0, then the
    overage rate, or each of its `overage_tiers` in turn) when it sets an overage price, and a flat price
    when it sets `base_fee_usd`."""
    stripe_config = config.stripe
    specs = []
    for name, plan in sorted(config.plans.items()):
        prefix = f"{stripe_config.lookup_key_prefix}_{name}"
        if bands := price_bands(plan):
            included = plan.included_credits * UCR_PER_CREDIT
            if included.denominator != 1:
                raise ConfigError(f"plans.{name}.included_credits: must be a whole number of micro-credits")
            rates = [f"plans.{name}.overage_usd_per_credit"] if plan.overage_tiers is None else \
                [f"plans.{name}.overage_tiers.{index}.usd_per_credit" for index in range(len(bands))]
            tiers = (Tier(int(included), Decimal(0)),) if included else ()
            tiers += tuple(Tier(band.to_ucr, exact_decimal(band.usd_per_credit * 100 / UCR_PER_CREDIT, what))
                           for band, what in zip(bands, rates, strict=True))
            specs.append(PriceSpec(name, "usage", f"{prefix}_usage", stripe_config.currency, tiers=tiers))
        if plan.base_fee_usd is not None:
            cents = plan.base_fee_usd * 100
            if cents.denominator != 1:
                raise ConfigError(f"plans.{name}.base_fee_usd: must be whole cents")
            specs.append(PriceSpec(name, "base", f"{prefix}_base", stripe_config.currency, unit_amount=int(cents)))
    return specs


@dataclass(frozen=True)
class Change:
    what: str
    name: str
    id: str
    action: Literal["exists", "created", "replaced"]

    def line(self) -> str:
        return f"{self.what:<8} {self.name:<32} {self.action:<9} {self.id}"


class StripeSetup:
    """Finds or creates meterline's meter, product and prices (sync SDK: this is a one-off CLI command)."""

    def __init__(self, client: stripe.StripeClient, config: MeterlineConfig,
                 report: Callable[[Change], None] = lambda change: None) -> None:
        self.client = client
        self.config = config
        self.report = report

    @property
    def product_id(self) -> str:
        return f"{self.config.stripe.lookup_key_prefix}_credits"

    def run(self) -> list[Change]:
        specs = catalog(self.config)  # validate the YAML before touching Stripe
        changes = [self._meter(), self._product()]
        meter_id = changes[0].id
        existing = {price.lookup_key: price for price in self._prices([spec.lookup_key for spec in specs])}
        for spec in specs:
            changes.append(self._price(spec, existing.get(spec.lookup_key), meter_id))
        return changes

    def _emit(self, change: Change) -> Change:
        self.report(change)
        return change

    def _meter(self) -> Change:
        event_name = self.config.stripe.meter_event_name
        if (meter_id := find_meter_id(self.client, event_name)) is not None:
            return self._emit(Change("meter", event_name, meter_id, "exists"))
        meter = self.client.v1.billing.meters.create({
            "display_name": self.config.stripe.meter_display_name, "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        })
        return self._emit(Change("meter", event_name, meter.id, "created"))

    def _product(self) -> Change:
        try:
            product = self.client.v1.products.retrieve(self.product_id)
            return self._emit(Change("product", self.product_id, product.id, "exists"))
        except stripe.InvalidRequestError as error:
            if error.http_status != 404:
                raise
        product = self.client.v1.products.create({
            "id": self.product_id, "name": self.config.stripe.product_name,
            "metadata": {"meterline": "credits"},
        })
        return self._emit(Change("product", self.product_id, product.id, "created"))

    def _prices(self, lookup_keys: list[str]) -> list[stripe.Price]:
        if not lookup_keys:
            return []
        listing = self.client.v1.prices.list({"lookup_keys": lookup_keys, "active": True, "limit": 100,
                                              "expand": ["data.tiers"]})
        return list(listing.auto_paging_iter())

    def _price(self, spec: PriceSpec, existing: stripe.Price | None, meter_id: str) -> Change:
        if existing is not None and spec.matches(existing, meter_id):
            return self._emit(Change("price", spec.lookup_key, existing.id, "exists"))
        price = self.client.v1.prices.create(spec.create_params(self.product_id, meter_id))
        return self._emit(Change("price", spec.lookup_key, price.id, "created" if existing is None else "replaced"))

    def plan_prices(self, plan: str) -> list[tuple[PriceSpec, stripe.Price]]:
        """The plan's prices at Stripe; a ConfigError when the plan has none or setup has not run."""
        specs = [spec for spec in catalog(self.config) if spec.plan == plan]
        if not specs:
            raise ConfigError(f"plan {plan!r} has no Stripe prices: set overage_usd_per_credit (or overage_tiers) "
                              "or base_fee_usd in meterline.yaml, then run `meterline stripe setup`")
        prices = {price.lookup_key: price for price in self._prices([spec.lookup_key for spec in specs])}
        missing = [spec.lookup_key for spec in specs if spec.lookup_key not in prices]
        if missing:
            raise ConfigError(f"Stripe has no price {', '.join(missing)}: run `meterline stripe setup` first")
        return [(spec, prices[spec.lookup_key]) for spec in specs]

    def subscribe(self, plan: str, stripe_customer_id: str, plan_prices: list[tuple[PriceSpec, stripe.Price]] | None = None,
                  ) -> tuple[str, Literal["exists", "attached", "created"]]:
        """Make sure the customer's subscription carries its plan's prices: attach the missing ones to its
        live subscription if it has one (it may already pay for other things), else create one.
        Returns (subscription id, what was done)."""
        plan_prices = plan_prices or self.plan_prices(plan)
        live = [
            subscription for subscription in self.client.v1.subscriptions.list(
                {"customer": stripe_customer_id, "limit": 100}).auto_paging_iter()
            if subscription.status in ("active", "trialing", "past_due")
        ]
        if live:
            subscription = live[0]
            present = {item.price.id for item in subscription["items"].data}
            missing = [(spec, price) for spec, price in plan_prices if price.id not in present]
            for spec, price in missing:
                self.client.v1.subscription_items.create(
                    {"subscription": subscription.id, "price": price.id} | _quantity(spec))
            return subscription.id, "attached" if missing else "exists"
        items = [{"price": price.id} | _quantity(spec) for spec, price in plan_prices]
        subscription = self.client.v1.subscriptions.create({
            "customer": stripe_customer_id, "items": items, "metadata": {"meterline_plan": plan},
        })
        return subscription.id, "created"


def _quantity(spec: PriceSpec) -> dict[str, int]:
    """Metered prices take no quantity; the flat base price is one per month."""
    return {"quantity": 1} if spec.kind == "base" else {}

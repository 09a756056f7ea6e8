"""Amounts and quantities: tier maths on exact Fractions, rounding to cents, and numbers as Stripe writes them.

Fractions, not floats: sub-cent unit prices (``0.0001``) times millions of units must add up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class Tier:
    up_to: int | None
    """Last unit of the tier (inclusive); None is ``inf``."""
    unit_amount: Fraction
    """Cents per unit."""
    flat_amount: Fraction
    """Cents for the tier as a whole."""


def graduated_parts(tiers: Sequence[Tier], quantity: Fraction) -> list[Fraction]:
    """Each tier prices the units that fall into it, plus its flat fee once entered: one part each, as
    Stripe bills a graduated price as separate invoice lines ("N × product (Tier 2 at $X / month)", and the
    flat fee on a line of its own), each rounded to a cent by itself.

    The first tier is always entered (its flat fee is charged even for zero usage), as Stripe does.
    """
    parts, lower = [], 0
    for index, tier in enumerate(tiers):
        upper = quantity if tier.up_to is None else min(quantity, Fraction(tier.up_to))
        units = max(upper - lower, Fraction(0))
        if units > 0 or index == 0:
            parts += [units * tier.unit_amount, tier.flat_amount]
        if tier.up_to is None or quantity <= tier.up_to:
            break
        lower = tier.up_to
    return parts


def graduated_amount(tiers: Sequence[Tier], quantity: Fraction) -> Fraction:
    """The graduated price of `quantity`, exactly (before any rounding)."""
    return sum(graduated_parts(tiers, quantity), Fraction(0))


def volume_amount(tiers: Sequence[Tier], quantity: Fraction) -> Fraction:
    """All units at the price of the tier the total quantity lands in."""
    tier = next(tier for tier in tiers if tier.up_to is None or quantity <= tier.up_to)
    return quantity * tier.unit_amount + tier.flat_amount


def round_half_up(amount: Fraction) -> int:
    """Whole cents, halves away from zero (amounts here are never negative)."""
    return math.floor(amount + Fraction(1, 2))


def _fraction(decimal_string: str | None) -> Fraction:
    return Fraction(Decimal(decimal_string)) if decimal_string is not None else Fraction(0)


def price_tiers(price: Mapping[str, Any]) -> list[Tier]:
    return [
        Tier(tier["up_to"], _fraction(tier["unit_amount_decimal"]), _fraction(tier["flat_amount_decimal"]))
        for tier in price.get("tiers") or []
    ]


def price_amount(price: Mapping[str, Any], quantity: Fraction) -> Fraction:
    """What `quantity` units of `price` cost, in (fractional) cents."""
    if price["billing_scheme"] == "tiered":
        tiers = price_tiers(price)
        tiered = graduated_amount if price["tiers_mode"] == "graduated" else volume_amount
        return tiered(tiers, quantity)
    return quantity * _fraction(price["unit_amount_decimal"])


def price_cents(price: Mapping[str, Any], quantity: Fraction) -> int:
    """What `quantity` units of `price` put on an invoice, in whole cents: each line rounded half up on its
    own, so a graduated price's tiers are rounded one by one before they are added up."""
    if price["billing_scheme"] == "tiered" and price["tiers_mode"] == "graduated":
        return sum(round_half_up(part) for part in graduated_parts(price_tiers(price), quantity))
    return round_half_up(price_amount(price, quantity))


def decimal_text(number: Decimal) -> str:
    """Plain notation, never an exponent (Stripe writes ``"0.0001"``, not ``"1E-4"``)."""
    return format(number, "f")


def whole_or_none(number: Decimal | None) -> int | None:
    """A price's integer amount beside its ``*_decimal`` one: set only when the amount is whole."""
    return int(number) if number is not None and number == number.to_integral_value() else None


def truncated(number: Decimal | None) -> int | None:
    """The integer field beside a ``*_decimal`` one: the number with its decimals cut off (Stripe: 12.5 -> 12)."""
    return None if number is None else int(number)


def json_number(number: Decimal) -> int | float:
    """An aggregated value for JSON: exact when whole (micro-credit sums exceed a float's 2**53 soon)."""
    return int(number) if number == number.to_integral_value() else float(number)

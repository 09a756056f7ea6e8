"""The pricing changelog's maths (`meterline pricing change`): what is sold as a canonical snapshot,
what changed between two snapshots, and which customers a change touches. Pure: plain values in and out.

A snapshot is meterline.yaml's `pricing`, `prices` and `plans` with every field (defaults included: a
default that changes with an upgrade changes what customers pay too), money as exact decimal strings.
Snapshots are compared leaf by leaf on flattened dotted paths (`plans.pro.overage_usd_per_credit`,
`pricing.models.gpt-4o.markup`, list items by index: `plans.pro.overage_tiers.0.up_to`), so a field
added to the configuration tomorrow is diffed without a line of code here. A leaf absent on one side
and null on the other is no change: a new optional field does not make every old snapshot differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pydantic import BaseModel

from plugin.rules.pricing import LinearPrice, PriceBook
from plugin.settings import MeterlineConfig, decimal_text

SNAPSHOT_SECTIONS = ("pricing", "prices", "plans")
"""The parts of meterline.yaml that decide what a customer pays for a call and per period."""

Path = tuple[str, ...]


def canonical(value: Any) -> Any:
    """A configuration value as plain JSON: models and mappings as objects (every field), sequences as
    lists, exact numbers as decimal strings."""
    if isinstance(value, BaseModel):
        return {name: canonical(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(item) for item in value]
    if isinstance(value, Fraction):
        return decimal_text(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


def snapshot_of(config: MeterlineConfig) -> dict[str, Any]:
    """What `config` sells, as the changelog stores it."""
    return {section: canonical(getattr(config, section)) for section in SNAPSHOT_SECTIONS}


def snapshot_json(snapshot: Mapping[str, Any]) -> str:
    """The stored text of a snapshot: sorted keys, no spaces, so equal snapshots are equal text."""
    return json.dumps(snapshot, sort_keys=True, separators=(",", ":"))


def config_of(snapshot: Mapping[str, Any]) -> MeterlineConfig:
    """The configuration a snapshot was taken of (its other sections at their defaults): what a reprice
    rebuilds a version's price book from. ValueError when today's meterline cannot read it (a field
    since removed)."""
    return MeterlineConfig.model_validate({section: snapshot[section] for section in SNAPSHOT_SECTIONS
                                          if section in snapshot})


def leaf_text(value: Any) -> str | None:
    """How a changelog shows one value: decimal strings as they are, booleans as true/false, null as None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def flatten(value: Any, path: Path = ()) -> dict[Path, str | None]:
    """Every leaf of a snapshot by its path; empty objects and lists have none."""
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = ((str(key), item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {path: leaf_text(value)}
    found: dict[Path, str | None] = {}
    for key, item in items:
        found.update(flatten(item, (*path, key)))
    return found


@dataclass(frozen=True)
class Change:
    """One leaf that differs: old or new is None when the leaf was added, removed or unset."""

    path: Path
    old: str | None
    new: str | None

    @property
    def field(self) -> str:
        return ".".join(self.path)

    def as_json(self) -> dict[str, str | None]:
        return {"field": self.field, "old": self.old, "new": self.new}


def diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Change]:
    """What changed from snapshot `old` to `new`, in path order (nothing to compare with: no change)."""
    if old is None:
        return []
    before, after = flatten(old), flatten(new)
    return [Change(path, before.get(path), after.get(path)) for path in sorted(before.keys() | after.keys())
            if before.get(path) != after.get(path)]


@dataclass(frozen=True)
class CustomerPlan:
    """What a change to a plan can touch of one customer: its plan, and the plan fields its own terms
    set (a change to one of those does not reach it)."""

    plan: str
    own_terms: frozenset[str] = frozenset()


def credit_rates(book: PriceBook, model: str) -> tuple[int, ...]:
    """What one token of each class of a call of `model` costs in credits under `book`, exactly (as
    integers over a common denominator): the whole of its price that a customer pays."""
    linear = LinearPrice.of(book.rule_for(model), book.price_for(model))
    return (*linear.ucr_rates, linear.ucr_denominator)


def repriced_models(models: Iterable[str], old: PriceBook, new: PriceBook) -> set[str]:
    """The models whose calls cost a different number of credits under `new` than under `old` (a provider
    price matters only on the cost basis; a tokens-basis setting only on the tokens basis)."""
    return {model for model in models if credit_rates(old, model) != credit_rates(new, model)}


def affected_customers(changes: Iterable[Change], customers: Mapping[str, CustomerPlan],
                       models_used: Mapping[str, Iterable[str]], repriced: set[str]) -> set[str]:
    """Who a set of changes touches:
    - a change under `plans.X` touches every customer on plan X, unless its own terms set that field;
    - a change under `pricing` or `prices` touches every customer that used (recently: the caller
      decides the window) a model whose calls it reprices (`repriced_models`)."""
    found: set[str] = set()
    plan_fields = {(change.path[1], change.path[2] if len(change.path) > 2 else "")
                   for change in changes if change.path[0] == "plans" and len(change.path) > 1}
    for customer, on in customers.items():
        if any(plan == on.plan and field not in on.own_terms for plan, field in plan_fields):
            found.add(customer)
    if repriced:
        found.update(customer for customer, models in models_used.items() if repriced.intersection(models))
    return found

"""The invoice spike guard's maths (DESIGN "Contract: Stripe webhooks and invoices"), pure.

A draft invoice whose `total` (integer cents; not `amount_due`, which is net of customer credit)
is more than `spike_pct` percent above the previous finalized invoice's `total` is a spike: the
runaway agent's invoice, caught while it is still a draft.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from plugin.rules.plans import overage_by_band
from plugin.rules.pricing import round_half_up
from plugin.settings import PlanConfig


def is_spike(previous_total_cents: int, draft_total_cents: int, spike_pct: float) -> bool:
    """draft > previous × (1 + spike_pct / 100), in exact integer arithmetic (a first paid invoice
    after a free one is a spike: any amount is above 150% of nothing)."""
    return draft_total_cents * 10_000 > previous_total_cents * (10_000 + round(spike_pct * 100))


def dollars(cents: int) -> str:
    """"$20.00", "-$1.50": how the guard's alerts write an amount."""
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100:,}.{abs(cents) % 100:02d}"


def rise_pct(previous_total_cents: int, draft_total_cents: int) -> str:
    """"+150%", or "new" when there was nothing to compare with."""
    if previous_total_cents <= 0:
        return "new"
    return f"+{(draft_total_cents - previous_total_cents) * 100 // previous_total_cents}%"


def plan_of_lookup_key(lookup_key: str | None, prefix: str) -> str | None:
    """The plan a meterline price's lookup key names (`{prefix}_{plan}_usage|base`), else None."""
    if not lookup_key or not lookup_key.startswith(prefix + "_"):
        return None
    for kind in ("_usage", "_base"):
        if lookup_key.endswith(kind):
            return lookup_key[len(prefix) + 1:-len(kind)] or None
    return None


def top_names(totals: Mapping[str, int], count: int = 3) -> list[str]:
    """The `count` largest names, largest first (ties by name): the actions and models a spike names."""
    return [name for name, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count]]


def expected_cents(plan: PlanConfig, used_ucr: int) -> int:
    """What the ledger says a period's invoice should total, in cents: the base fee plus the overage at
    the plan's rate, each line rounded half up to a cent as Stripe rounds invoice lines. A graduated price
    is billed as one line per tier, so each tier's part is rounded on its own."""
    base = round_half_up(Fraction(plan.base_fee_usd or 0) * 100)
    return base + sum(round_half_up(part * 100) for part in overage_by_band(plan, used_ucr))

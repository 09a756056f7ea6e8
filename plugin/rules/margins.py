"""The margin review's maths (`meterline pricing review`): provider cost against revenue per model and
per plan over a window, and how far each margin moved since the window before. Pure and exact.

Revenue is what the credits are worth at each customer's own overage rate (its plan with its terms):
a marginal view of what a credit earns, not an invoice (included credits and base fees are left out,
so a model on a plan that charges no overage shows no revenue and no margin).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from plugin.rules.plans import overage_bands
from plugin.rules.pricing import UCR_PER_CREDIT, UUSD_PER_USD, round_half_up
from plugin.rules.usage import dollars
from plugin.settings import PlanConfig


def credit_rate_usd(plan: PlanConfig) -> Fraction:
    """What one credit earns on `plan` (with the customer's terms): its overage price, the first tier's on a
    graduated plan; 0 on a plan that charges nothing per credit (or is not metered)."""
    bands = overage_bands(plan)
    return bands[0].usd_per_credit if bands else Fraction(0)


@dataclass(frozen=True)
class Usage:
    """One customer's use of one model over a window, as the ledger sums it."""

    customer_id: str
    model: str
    credits_ucr: int
    cost_uusd: int


@dataclass(frozen=True)
class Totals:
    cost_uusd: int = 0
    revenue_usd: Fraction = Fraction(0)

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.cost_uusd + other.cost_uusd, self.revenue_usd + other.revenue_usd)

    @property
    def cost_usd(self) -> Fraction:
        return Fraction(self.cost_uusd, UUSD_PER_USD)

    @property
    def margin(self) -> Fraction | None:
        """(revenue − cost) / revenue × 100, exactly; None without revenue (no share of nothing)."""
        if self.revenue_usd == 0:
            return None
        return (self.revenue_usd - self.cost_usd) / self.revenue_usd * 100


def tally(usage: Iterable[Usage], plan_of: Mapping[str, str],
          rate_of: Mapping[str, Fraction]) -> tuple[dict[str, Totals], dict[str, Totals]]:
    """(per model, per plan) totals of a window. A customer missing from `plan_of` (deleted) counts under
    plan "-" and earns nothing."""
    by_model: dict[str, Totals] = {}
    by_plan: dict[str, Totals] = {}
    for row in usage:
        totals = Totals(row.cost_uusd, Fraction(row.credits_ucr, UCR_PER_CREDIT) * rate_of.get(row.customer_id, 0))
        plan = plan_of.get(row.customer_id, "-")
        by_model[row.model] = by_model.get(row.model, Totals()) + totals
        by_plan[plan] = by_plan.get(plan, Totals()) + totals
    return by_model, by_plan


def one_decimal(value: Fraction | None) -> float | None:
    """A percentage (or points) for display: one decimal, halves away from zero."""
    return None if value is None else round_half_up(value * 10) / 10


def review_lines(current: Mapping[str, Totals], previous: Mapping[str, Totals], key: str,
                 drift_threshold_pct: Fraction) -> list[dict]:
    """One line per name with usage in the current window, highest revenue first: its cost, revenue,
    margin, and its drift = this margin − the previous window's in percentage points (None when either
    has no margin); `flagged` when the drift is beyond the threshold either way."""
    lines = []
    for name, now in current.items():
        margin, before = now.margin, previous.get(name, Totals()).margin
        drift = None if margin is None or before is None else margin - before
        lines.append((now.revenue_usd, name, {
            key: name, "provider_cost_usd": dollars(now.cost_usd), "revenue_usd": dollars(now.revenue_usd),
            "margin_pct": one_decimal(margin), "drift_pct": one_decimal(drift),
            "flagged": drift is not None and abs(drift) > drift_threshold_pct,
        }))
    lines.sort(key=lambda line: (-line[0], line[1]))
    return [line for _, _, line in lines]

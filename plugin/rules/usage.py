"""The figures of a usage report, from plain totals: % of included, overage, the projection in
dollars, top actions. Pure: the API, the CLI and the page all show what these compute."""

from __future__ import annotations

from fractions import Fraction

from plugin.rules.plans import current_band, overage_bands, overage_usd
from plugin.rules.policy import usd_text
from plugin.rules.pricing import divide_half_up
from plugin.settings import PlanConfig, decimal_text

TOP_ACTIONS = 10
OTHER = "(other)"


def pct(part: int, whole: int) -> float | None:
    """part / whole x 100 with one decimal, rounded half up; None when whole is 0 (nothing to compare with)."""
    if whole <= 0:
        return None
    return divide_half_up(part * 1000, whole) / 10


def dollars(amount: Fraction) -> str:
    """A decimal string in dollars, cents always shown ("12.50", "0.125")."""
    return usd_text(amount).removeprefix("$")


def overage_ucr(used_ucr: int, included_ucr: int) -> int:
    return max(0, used_ucr - included_ucr)


def _overage_amount(plan: PlanConfig, projected_ucr: int, cap_ucr: int | None) -> Fraction:
    """The projected overage at the plan's rate (or tiers), never past the ceiling (nothing is billed beyond it)."""
    return overage_usd(plan, projected_ucr if cap_ucr is None else min(projected_ucr, cap_ucr))


def projected_overage_usd(plan: PlanConfig, projected_ucr: int, cap_ucr: int | None) -> str:
    """The projected overage alone, in dollars: the "$Y over included" of the projection sentence."""
    return dollars(_overage_amount(plan, projected_ucr, cap_ucr))


def projected_usd(plan: PlanConfig, projected_ucr: int, cap_ucr: int | None) -> str:
    """What the period's invoice is on track for: the base fee plus the projected overage."""
    return dollars(Fraction(plan.base_fee_usd or 0) + _overage_amount(plan, projected_ucr, cap_ucr))


def overage_rates(plan: PlanConfig, used_ucr: int) -> list[dict]:
    """The plan's overage price as the usage report shows it: one row per tier (one for a flat rate),
    `from_ucr` exclusive and `up_to_ucr` inclusive (null: no bound) in µcr of the period's usage, the rate a
    decimal string in dollars per credit, and `current` on the tier the next credit is priced in; empty
    when the plan charges no overage."""
    now = current_band(plan, used_ucr)
    return [{"from_ucr": band.from_ucr, "up_to_ucr": band.to_ucr, "usd_per_credit": decimal_text(band.usd_per_credit),
             "current": index == now} for index, band in enumerate(overage_bands(plan))]


def top_actions(by_action: dict[str, int], limit: int = TOP_ACTIONS) -> list[dict]:
    """The largest actions first (ties by name), at most `limit`, the rest summed as "(other)"."""
    total = sum(by_action.values())
    ranked = sorted(by_action.items(), key=lambda item: (-item[1], item[0]))
    shown, rest = ranked[:limit], ranked[limit:]
    if rest:
        shown.append((OTHER, sum(used for _, used in rest)))
    return [{"action": action, "used_ucr": used, "share_pct": pct(used, total) if total else 0.0}
            for action, used in shown]

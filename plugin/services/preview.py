"""Cost preview: what a request would cost at most, and whether it would run, over the customer's
current counters (read, never reserved)."""

from __future__ import annotations

from typing import Any

from plugin.admission import breaker_message
from plugin.counters.base import Account
from plugin.ledger.accounts import Profile
from plugin.rules.breaker import BreakerStatus
from plugin.rules.limits import next_threshold, soft_limit_base_ucr, threshold_ucr
from plugin.rules.plans import overage_usd
from plugin.rules.policy import (
    Refusal,
    decide,
    plan_max_tokens,
    refusal_message,
    usd_text,
)
from plugin.runtime import Meterline
from plugin.settings import PlanConfig


def preview_answer(meterline: Meterline, profile: Profile, model: str, prompt_tokens: int,
                   max_tokens: int | None) -> dict[str, Any]:
    """The preview, over the customer's current counters (read, not reserved)."""
    now = meterline.clock()
    policies = meterline.config.policies
    plan = meterline.plan_of(profile)
    period = meterline.period(profile, now)
    limit = meterline.ceiling_of(profile)
    allowed_max_tokens = plan_max_tokens(max_tokens, plan.max_output_tokens)
    estimate = meterline.estimate(model, prompt_tokens, allowed_max_tokens)
    credits = estimate.cost(estimate.max_tokens)
    snapshot = meterline.counters.snapshot(Account(profile.customer_id, period.start), now)
    decision = decide(estimate, used_ucr=snapshot.used_ucr, reserved_ucr=snapshot.reserved_ucr, limit=limit,
                      min_output_tokens=policies.min_output_tokens)
    answer: dict[str, Any] = {"credits_ucr": credits, "cost_usd": _overage_usd(plan, snapshot.used_ucr, credits),
                              "verdict": "allowed", "reason": None, "message": None, "max_tokens": None,
                              "remaining_ucr_after": None}
    if limit is not None:
        answer["remaining_ucr_after"] = max(0, limit.ucr - snapshot.used_ucr - snapshot.reserved_ucr - credits)
    if profile.breaker.status is BreakerStatus.OPEN:
        return answer | {"verdict": "refused", "reason": Refusal.CIRCUIT_OPEN.value,
                         "message": breaker_message(profile.breaker)}
    if not decision.admit:
        return answer | {"verdict": "refused", "reason": decision.reason.value,
                         "message": refusal_message(decision.reason, limit, profile.plan, period.end,
                                                    detail=policies.refusal_detail)}
    if decision.max_tokens is not None:
        answer |= {"reason": "max_tokens_lowered", "max_tokens": decision.max_tokens,
                   "credits_ucr": decision.reserve_ucr,
                   "cost_usd": _overage_usd(plan, snapshot.used_ucr, decision.reserve_ucr)}
    elif allowed_max_tokens != max_tokens:  # the plan's output ceiling, lower than asked (or nothing asked)
        answer |= {"reason": "plan_max_output_tokens", "max_tokens": allowed_max_tokens}
    base = soft_limit_base_ucr(plan, limit, 0)
    upcoming = next_threshold(profile.limits.thresholds(policies.soft_thresholds_pct), base, snapshot.used_ucr)
    if upcoming is not None and snapshot.used_ucr + answer["credits_ucr"] >= threshold_ucr(base, upcoming):
        answer |= {"verdict": "soft_limit", "reason": answer["reason"] or f"soft_limit_{upcoming}pct"}
    return answer


def _overage_usd(plan: PlanConfig, used_ucr: int, credits_ucr: int) -> str:
    """What a charge of `credits_ucr` adds to the invoice: only the part past the included quota costs,
    at the rates of the tiers it falls in."""
    return usd_text(overage_usd(plan, used_ucr + credits_ucr) - overage_usd(plan, used_ucr)).removeprefix("$")

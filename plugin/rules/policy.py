"""Admission policy: may this request run, how much may it spend, and if not, why (pure).

Reserve-then-settle: before the provider call a request reserves its worst-case credits (its
prompt as counted plus `max_tokens` of output, or a configured default). It is admitted only if
what is used, what others have reserved and its own reservation fit under the customer's
ceiling; when the full reservation does not fit, `max_tokens` is clamped to what still fits, or
the request is refused when that is below a useful minimum. On success the reservation settles
to the real usage, never billing past the ceiling; on failure it is released.

The ceiling is the smallest of the plan's cap (free plans), the customer's hard limit, and the
included quota when overage is blocked; each comes with the reason a refusal names.

Counters live elsewhere (plugin/counters): this module only does the arithmetic, so every rule
is a test over plain integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from math import ceil, floor

UCR = Decimal(1_000_000)


class Refusal(StrEnum):
    """Why a request is refused: the `error.type` (and `x-meterline-error`) the client sees."""

    FREE_CAP = "free_cap_reached"
    HARD_LIMIT = "hard_limit_reached"
    OVERAGE_BLOCKED = "overage_blocked"
    CIRCUIT_OPEN = "circuit_open"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class Ceiling:
    """The most a customer can be billed this period, and what they hit when they reach it."""

    ucr: int
    reason: Refusal
    usd: Fraction | None = None
    """Set when the customer wrote the limit in currency: the refusal then names that amount."""


def ceiling(*, plan_cap_ucr: int | None, hard_limit_ucr: int | None, included_ucr: int,
            block_overage: bool, hard_limit_usd: Fraction | None = None) -> Ceiling | None:
    """The effective ceiling (DESIGN: `cap_ucr`), or None when the customer is unlimited.

    The smallest wins; on a tie the plan cap is named first, then the hard limit, then the
    overage block, so the message points at the rule the customer can least change.
    """
    candidates = [
        Ceiling(cap, reason, usd) for cap, reason, usd in (
            (plan_cap_ucr, Refusal.FREE_CAP, None),
            (hard_limit_ucr, Refusal.HARD_LIMIT, hard_limit_usd),
            (included_ucr if block_overage else None, Refusal.OVERAGE_BLOCKED, None),
        ) if cap is not None
    ]
    return min(candidates, key=lambda candidate: candidate.ucr, default=None)


@dataclass(frozen=True)
class Estimate:
    """What a request may cost before it runs."""

    prompt_ucr: Fraction
    """The prompt as counted, priced as fresh input (the worst case: no cache discount)."""
    ucr_per_output_token: Fraction
    max_tokens: int
    """The client's `max_tokens`, or the configured reservation default when it set none."""

    def cost(self, output_tokens: int) -> int:
        """Worst-case µcr with `output_tokens` of output, rounded up: a reservation never falls short
        by rounding."""
        return ceil(self.prompt_ucr + output_tokens * self.ucr_per_output_token)


def plan_max_tokens(asked_max_tokens: int | None, plan_max_output_tokens: int | None) -> int | None:
    """The output limit a request runs with under its plan's `max_output_tokens`: what it asked, lowered to
    the ceiling, or the ceiling when it asked none (margin protection against runaway outputs). None: the
    plan has no ceiling and the request set no limit. The affordability clamp (`interpret`) works from
    this value, so the lower of the two wins."""
    if plan_max_output_tokens is None:
        return asked_max_tokens
    if asked_max_tokens is None:
        return plan_max_output_tokens
    return min(asked_max_tokens, plan_max_output_tokens)


SPARE_SHARE = 4
"""A spare (budget held for a process's next requests) never takes more than 1/SPARE_SHARE of what
is left under the ceiling: near the ceiling processes stop holding budget for later and reserve
per request, so no process hoards what another one needs."""


@dataclass(frozen=True)
class Ask:
    """What a request asks a customer's counters for: its full worst case, or at least `minimum_ucr`
    (the worst case with the useful minimum of output) if the full amount no longer fits.
    `spare_ucr`: budget to hold besides, for the next requests of the same process (plugin.rules.slices),
    given only while plenty is left."""

    full_ucr: int
    minimum_ucr: int
    spare_ucr: int = 0


def ask(estimate: Estimate, min_output_tokens: int = 16) -> Ask:
    return Ask(estimate.cost(estimate.max_tokens), estimate.cost(min(min_output_tokens, estimate.max_tokens)))


def grant(request: Ask, *, used_ucr: int, reserved_ucr: int, limit: Ceiling | None) -> int | None:
    """The reference of the one atomic step a counter store performs (SQL transaction, Redis Lua):
    how many µcr to reserve, or None to refuse. The full ask if it fits under the ceiling, plus as
    much of the spare as keeps the whole grant within 1/SPARE_SHARE of what is left (none if that is
    less than one more full ask); else everything that is left if that covers the minimum.

    Only additions, comparisons and one floor division of integers, so both backends compute
    exactly this; the backend test-suite checks them against it.
    """
    if limit is None:
        return request.full_ucr + request.spare_ucr
    available = limit.ucr - used_ucr - reserved_ucr
    if request.full_ucr <= available:
        spare = min(request.spare_ucr, available // SPARE_SHARE - request.full_ucr)
        return request.full_ucr + (spare if spare >= request.full_ucr else 0)
    if request.minimum_ucr <= available and available > 0:
        return available
    return None


@dataclass(frozen=True)
class Decision:
    """The one output of the admission policy."""

    admit: bool
    reason: Refusal | None = None
    """Refused requests: which ceiling (or guard) refused them."""
    reserve_ucr: int = 0
    """µcr reserved for this request (0 when refused)."""
    max_tokens: int | None = None
    """The `max_tokens` to send when it had to be lowered (clamped); None when the request runs as asked."""
    remaining_ucr: int | None = None
    """µcr left under the ceiling once this reservation is made (None: no ceiling). For headers and previews."""
    ceiling_ucr: int | None = None


def interpret(estimate: Estimate, granted_ucr: int | None, *, available_ucr: int | None,
              limit: Ceiling | None) -> Decision:
    """The decision that follows from what the counters granted (`available_ucr`: what was left before)."""
    ceiling_ucr = None if limit is None else limit.ucr
    if granted_ucr is None:
        assert limit is not None, "an unlimited customer is always granted"
        return Decision(False, limit.reason, remaining_ucr=max(0, available_ucr or 0), ceiling_ucr=ceiling_ucr)
    remaining = None if available_ucr is None else available_ucr - granted_ucr
    full = estimate.cost(estimate.max_tokens)
    if granted_ucr >= full:
        return Decision(True, reserve_ucr=granted_ucr, remaining_ucr=remaining, ceiling_ucr=ceiling_ucr)
    return Decision(True, reserve_ucr=granted_ucr, max_tokens=_affordable_output_tokens(estimate, granted_ucr),
                    remaining_ucr=remaining, ceiling_ucr=ceiling_ucr)


def decide(estimate: Estimate, *, used_ucr: int, reserved_ucr: int, limit: Ceiling | None,
           min_output_tokens: int = 16) -> Decision:
    """Ask, grant and interpret in one go, over plain numbers (what previews and tests use; live
    requests do the grant inside a counter store, atomically)."""
    granted = grant(ask(estimate, min_output_tokens), used_ucr=used_ucr, reserved_ucr=reserved_ucr, limit=limit)
    available = None if limit is None else limit.ucr - used_ucr - reserved_ucr
    return interpret(estimate, granted, available_ucr=available, limit=limit)


def _affordable_output_tokens(estimate: Estimate, budget_ucr: int) -> int:
    """The most output tokens whose worst-case cost still fits in `budget_ucr`."""
    room = budget_ucr - estimate.prompt_ucr
    if room < 0:
        return 0
    if estimate.ucr_per_output_token == 0:
        return estimate.max_tokens
    return min(estimate.max_tokens, floor(room / estimate.ucr_per_output_token))


@dataclass(frozen=True)
class Settlement:
    bill_ucr: int
    """What goes in the ledger."""
    forgone_ucr: int
    """Real usage not billed because it would have crossed the ceiling (an estimate fell short)."""


def settle(actual_ucr: int, *, reserved_for_this_ucr: int, used_ucr: int, reserved_ucr: int,
           limit: Ceiling | None) -> Settlement:
    """Turn a reservation into the bill once real usage is known.

    Normally the bill is the real usage, and it fits: the reservation was the worst case. If the
    real usage came out higher (a provider overshooting `max_tokens`, a prompt counted low), it is
    billed only as far as the ceiling allows after everyone else's reservations: the customer is
    never billed past what they allowed, and the shortfall is reported, not hidden.
    `reserved_ucr` is the customer's whole reserved counter, this request's reservation included.
    """
    if limit is None:
        return Settlement(actual_ucr, 0)
    others_reserved = reserved_ucr - reserved_for_this_ucr
    room = max(0, limit.ucr - used_ucr - others_reserved)
    bill = min(actual_ucr, room)
    return Settlement(bill, actual_ucr - bill)


def credits_text(ucr: int) -> str:
    """µcr as credits for people: exact, no trailing zeros ("100", "2.5"); what a form takes back."""
    return format((Decimal(ucr) / UCR).normalize(), "f")


def credits_grouped(ucr: int) -> str:
    """`credits_text` with thousands separators ("1,234.5"), for reading."""
    return format((Decimal(ucr) / UCR).normalize(), ",f")


def usd_text(amount: Fraction) -> str:
    """Dollars for people: cents always shown, more places only when the amount has them ("$25.00", "$0.125")."""
    exact = Decimal(amount.numerator) / Decimal(amount.denominator)
    places = max(2, -exact.normalize().as_tuple().exponent)
    return f"${exact:.{places}f}"


def refusal_message(reason: Refusal, limit: Ceiling, plan: str, period_end: datetime, *,
                    detail: str = "full") -> str:
    """What a refused customer reads: what happened, and what to do next. With `detail="minimal"`
    (policy `refusal_detail`) no amount is shown, for apps that relay the message to end users."""
    until = period_end.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    amount = usd_text(limit.usd) if limit.usd is not None else f"{credits_text(limit.ucr)} credits"
    full = detail == "full"
    match reason:
        case Refusal.FREE_CAP:
            used = f"the {amount} of your {plan} plan" if full else f"the credits of your {plan} plan"
            return f"You've used {used} for this period. Upgrade your plan to continue, or wait until {until}."
        case Refusal.HARD_LIMIT:
            limit_text = f"your limit of {amount}" if full else "your spending limit"
            return f"You've hit {limit_text}. Raise it in settings to continue, or wait until {until}."
        case Refusal.OVERAGE_BLOCKED:
            included = f"the {amount} your plan includes" if full else "the credits your plan includes"
            return (f"You've used {included} and overage is blocked. Allow overage in settings to continue, "
                    f"or wait until {until}.")
    return f"This request was refused ({reason})."

"""What happens to a meter event after a send: the relay's whole retry policy, as pure functions.

No clock, no randomness, no I/O: `now` and `jitter` are arguments, so every rule is a row in a
table test. The relay only persists the `Step` it gets back.

The one subtle rule is the dedupe window. A sink such as Stripe forgets identifiers after a
while (Stripe: at least 24 hours). Resending an event whose earlier send *may* have landed is
safe only while the sink still remembers the identifier; after that a resend could bill twice.
Such an event stops at `unknown` and is settled by reconciliation, never resent blindly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from plugin.sinks.base import Outcome, OutcomeKind


class Status(StrEnum):
    PENDING = "pending"
    """Due at `next_attempt_at`."""
    SENDING = "sending"
    """Claimed by a relay worker until its lease ends; an expired lease means the worker died mid-send."""
    DELIVERED = "delivered"
    HELD = "held"
    """The customer has no id at the sink yet; re-checked every `hold_seconds`, or at once on `outbox retry`."""
    DEAD = "dead"
    """Can never land as it is; waits for an operator (`meterline outbox retry`)."""
    UNKNOWN = "unknown"
    """May or may not have landed, and the sink no longer dedupes it: settle by reconciliation."""


WAITING = (Status.PENDING, Status.SENDING, Status.HELD)
"""Statuses of events that have not reached the sink (or not yet been confirmed)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter and a cap; seconds throughout."""

    base_seconds: float = 1.0
    factor: float = 2.0
    cap_seconds: float = 300.0
    hold_seconds: float = 300.0
    """How often an event held for a missing sink customer id is looked at again."""
    dedupe_margin: timedelta = timedelta(hours=1)
    """Stop resending uncertain events this long before the sink's dedupe window closes (clock skew, slow sends)."""

    def backoff(self, attempts: int, jitter: float) -> float:
        """Delay before attempt `attempts + 1`. `jitter` in [0, 1) spreads the upper half of the delay
        ("equal jitter"): never less than half the exponential step, so a flood of retries cannot
        all land at once, and never 0."""
        step = min(self.cap_seconds, self.base_seconds * self.factor ** max(0, attempts - 1))
        return step / 2 + step / 2 * jitter


@dataclass(frozen=True)
class Step:
    """What to store for one event after an outcome."""

    status: Status
    next_attempt_at: datetime | None = None
    """PENDING and HELD: when to try again."""
    reason: str = ""
    uncertain: bool = False


def may_resend(uncertain: bool, first_attempt_at: datetime | None, at: datetime,
               dedupe_window: timedelta | None, policy: RetryPolicy) -> bool:
    """Whether sending at `at` is safe: always, unless an earlier send may have landed and the sink
    will have forgotten the identifier by then."""
    if not uncertain or dedupe_window is None or first_attempt_at is None:
        return True
    return at < first_attempt_at + dedupe_window - policy.dedupe_margin


UNKNOWN_REASON = "an earlier send may have landed and the sink's dedupe window is closing: settle by reconciliation"


def decide(outcome: Outcome, *, attempts: int, first_attempt_at: datetime, uncertain: bool, now: datetime,
           jitter: float, dedupe_window: timedelta | None, policy: RetryPolicy = RetryPolicy()) -> Step:
    """The next state of an event whose `attempts`-th send just returned `outcome`.

    `uncertain` says whether an earlier send may have landed; it only ever becomes more true.
    """
    match outcome.kind:
        case OutcomeKind.DELIVERED | OutcomeKind.DUPLICATE:
            return Step(Status.DELIVERED, reason=outcome.reason)
        case OutcomeKind.REJECTED:
            return Step(Status.DEAD, reason=outcome.reason, uncertain=uncertain)
        case OutcomeKind.NO_CUSTOMER:
            return Step(Status.HELD, now + timedelta(seconds=policy.hold_seconds), outcome.reason, uncertain)
    uncertain = uncertain or outcome.uncertain
    delay = max(policy.backoff(attempts, jitter), outcome.retry_after or 0.0)
    retry_at = now + timedelta(seconds=delay)
    if not may_resend(uncertain, first_attempt_at, retry_at, dedupe_window, policy):
        return Step(Status.UNKNOWN, reason=f"{outcome.reason}; {UNKNOWN_REASON}", uncertain=True)
    return Step(Status.PENDING, retry_at, outcome.reason, uncertain)

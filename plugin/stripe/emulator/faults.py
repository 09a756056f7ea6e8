"""Fault switches a test flips through the control API: fail the next N calls, add latency.

Kept apart from the account so the switches can be tested as plain values (`take` only matches rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plugin.stripe.emulator.errors import ApiError, rate_limited


@dataclass
class FaultRule:
    remaining: int
    status: int
    path_prefix: str | None
    after_record: bool
    """False: fail before the request does anything. True: do the work, then answer the error anyway
    (an "ambiguous" failure: the caller cannot know the event was recorded)."""


@dataclass
class Faults:
    """The switches: rules for failing calls, and a delay every call waits."""

    rules: list[FaultRule] = field(default_factory=list)
    delay_ms: int = 0

    def add(self, count: int, status: int = 500, path_prefix: str | None = None, after_record: bool = False) -> None:
        if count < 0 or not 400 <= status <= 599:
            raise ValueError("count must be >= 0 and status a 4xx/5xx code")
        self.rules.append(FaultRule(count, status, path_prefix, after_record))

    def take(self, path: str, *, after_record: bool) -> int | None:
        """The status to fail this call with (consuming one use of the first matching rule), or None."""
        for rule in self.rules:
            if rule.after_record == after_record and rule.remaining > 0 and path.startswith(rule.path_prefix or ""):
                rule.remaining -= 1
                return rule.status
        return None

    def set_delay(self, milliseconds: int) -> None:
        if milliseconds < 0:
            raise ValueError("the delay cannot be negative")
        self.delay_ms = milliseconds

    def settings(self) -> dict[str, Any]:
        """What the control API shows."""
        return {"delay_ms": self.delay_ms, "rules": [vars(rule).copy() for rule in self.rules]}


def injected_error(status: int) -> ApiError:
    """The answer of a fault switch: Stripe's shape for that status (so 429 -> RateLimitError, 5xx -> APIError)."""
    if status == 429:
        return rate_limited("Request rate limit exceeded (injected by the emulator's fault switch).")
    if status >= 500:
        return ApiError(status, "An unexpected error occurred (injected by the emulator's fault switch).",
                        type="api_error")
    return ApiError(status, "Request refused (injected by the emulator's fault switch).")

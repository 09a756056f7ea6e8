"""Stripe's Idempotency-Key rule: same key and same params replay the first answer, for 24 h.

The store only decides; the app runs the request between `begin` and `finish` (or `abandon`).
"""

from __future__ import annotations

from dataclasses import dataclass

from plugin.stripe.emulator.clock import DAY, Expiring
from plugin.stripe.emulator.errors import ApiError

IDEMPOTENCY_WINDOW_SECONDS = DAY


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str
    """The JSON text as first sent: a replay repeats it even if the object changed since."""
    should_retry: bool | None = None
    """Stripe's `Stripe-Should-Retry` header, when the answer carries one."""


@dataclass
class _Remembered:
    fingerprint: str
    response: StoredResponse | None = None
    """None while the first request with this key is still running."""


class IdempotencyStore:
    """Keys seen in the last `window_seconds`, with the request they came with and its answer."""

    def __init__(self, window_seconds: float = IDEMPOTENCY_WINDOW_SECONDS):
        self._entries: Expiring[_Remembered] = Expiring(window_seconds)

    @property
    def window_seconds(self) -> float:
        return self._entries.seconds

    def begin(self, key: str, fingerprint: str, now: float) -> StoredResponse | None:
        """The response to replay, or None when this request must run (and is now marked in progress)."""
        self._entries.expire(now)
        entry = self._entries.get(key)
        if entry is None:
            self._entries.put(key, _Remembered(fingerprint), now)
            return None
        if entry.fingerprint != fingerprint:
            raise ApiError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first used with. "
                f"Try using a key other than '{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
        if entry.response is None:
            raise ApiError(
                409,
                "There is currently another in-progress request using this Idempotent Key (that probably means you "
                f"submitted twice, and the other request is still going through): {key}. Please try again later.",
                code="idempotency_key_in_use",
            )
        return entry.response

    def finish(self, key: str, response: StoredResponse) -> None:
        entry = self._entries.get(key)
        if entry is not None:  # None: a reset forgot the key while its request ran; nothing to replay then
            entry.response = response

    def abandon(self, key: str) -> None:
        """The request never ran to an answer (crashed): the key may be used afresh."""
        self._entries.pop(key)

"""What the delivery tests share: the priced meterline.yaml, the proxy's environment for the Stripe
emulator, and polling for an asynchronous outcome (a relay delivering, a webhook arriving)."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.proxy import METERLINE_YAML
from tests.support.stripe_emulator import DEFAULT_API_KEY, StripeEmulator

PRICED_YAML = METERLINE_YAML | {
    "plans": {"pro": {"included_credits": 1000, "base_fee_usd": "20", "overage_usd_per_credit": "0.002"},
              "free": {"cap_credits": 100}},
}


def ask(text_: str) -> list[dict]:
    return [{"role": "user", "content": text_}]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stripe_env(emulator: StripeEmulator, **extra: str) -> dict[str, str]:
    return {
        "STRIPE_API_KEY": DEFAULT_API_KEY, "METERLINE_STRIPE_API_BASE": emulator.base_url,
        "METERLINE_RELAY_POLL_SECONDS": "0.1", "METERLINE_RELAY_RETRY_BASE_SECONDS": "0.1",
        "METERLINE_RELAY_RETRY_CAP_SECONDS": "0.5", "METERLINE_RELAY_LEASE_SECONDS": "2",
    } | extra

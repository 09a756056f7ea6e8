"""Run the Stripe emulator (`plugin.stripe.emulator`) as a subprocess and drive its control API.

``with run_stripe_emulator() as emulator:`` gives a `StripeEmulator` whose `client()` is a real
`stripe.StripeClient` pointed at it; the other methods wrap ``/_emulator/`` (faults, delay, clock,
summary lag, recorded and forgotten meter events, webhook deliveries, call counts).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import stripe

from tests.support.processes import free_port, serving

DEFAULT_API_KEY = "sk_test_meterline"


@dataclass
class StripeEmulator:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = DEFAULT_API_KEY) -> stripe.StripeClient:
        """The unmodified SDK aimed at the emulator, without retries (tests see every answer)."""
        return stripe.StripeClient(
            api_key, base_addresses={"api": self.base_url, "meter_events": self.base_url}, max_network_retries=0,
        )

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, f"{self.base_url}/_emulator/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def fail_next(self, count: int, status: int = 500, path_prefix: str | None = None,
                  after_record: bool = False) -> None:
        """The next `count` Stripe calls (under `path_prefix`) answer `status`; before any work, or after it."""
        self._control("POST", "faults", {"count": count, "status": status, "path_prefix": path_prefix,
                                         "after_record": after_record})

    def delay(self, milliseconds: int) -> None:
        self._control("POST", "delay", {"ms": milliseconds})

    def advance_clock(self, seconds: int) -> float:
        return self._control("POST", "clock", {"advance_seconds": seconds})["now"]

    def set_summary_lag(self, seconds: int) -> None:
        """Meter event summaries leave out events the emulator received less than `seconds` ago (until reset)."""
        self._control("POST", "summary_lag", {"seconds": seconds})

    def forget_meter_event(self, identifier: str) -> dict[str, Any]:
        """Make Stripe lose a recorded event (its identifier is free again); its log entry, flagged forgotten."""
        return self._control("POST", "meter_events/forget", {"identifier": identifier})

    def reset(self) -> None:
        self._control("POST", "reset")

    def meter_event_log(self, offset: int = 0) -> dict[str, Any]:
        """``count``, ``events`` (from `offset`), ``forgotten``, ``rejected``, ``duplicates`` and ``rejections``.

        Forgotten events stay in ``events`` (and ``count``), flagged ``"forgotten": true``.
        """
        return self._control("GET", f"meter_events?offset={offset}")

    def meter_events(self) -> list[dict[str, Any]]:
        return self.meter_event_log()["events"]

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        return self._control("GET", "webhook_deliveries")["deliveries"]

    def calls(self) -> dict[str, int]:
        """Stripe calls per ``"METHOD /path"``."""
        return self._control("GET", "calls")["calls"]

    def finalize_invoice(self, subscription: str, at: int | None = None) -> dict[str, Any]:
        """Close the period into a draft invoice (and its ``invoice.created`` webhook)."""
        return self._control("POST", "invoices", {"subscription": subscription, "at": at})


@contextmanager
def run_stripe_emulator(*, webhook_url: str | None = None, webhook_secret: str | None = None,
                        timeout: float = 15.0) -> Iterator[StripeEmulator]:
    """Start ``python -m plugin.stripe.emulator`` on a free port, wait until it answers, stop it on exit."""
    port = free_port()
    command = [sys.executable, "-m", "plugin.stripe.emulator", "--port", str(port)]
    if webhook_url:
        command += ["--webhook-url", webhook_url, "--webhook-secret", webhook_secret or ""]
    with serving(command, f"http://127.0.0.1:{port}/_emulator/health", "stripe emulator", timeout) as process:
        yield StripeEmulator(port=port, process=process)

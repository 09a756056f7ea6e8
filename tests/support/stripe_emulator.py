"""Run the Stripe emulator (`plugin.stripe.emulator`) as a subprocess and drive its control API.

``with run_stripe_emulator() as emulator:`` gives a `StripeEmulator` whose `client()` is a real
`stripe.StripeClient` pointed at it; the other methods wrap ``/_emulator/`` (faults, delay, clock,
summary lag, recorded and forgotten meter events, webhook deliveries and their mode, invoice grace,
call counts). Moving the clock runs the billing cycle: periods that ended become draft invoices, and
drafts past their grace are finalized.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import stripe
from stripe.v2.core import EventNotification

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
        """Move the emulator's clock `seconds` forward (what fell due happens); its new time."""
        return self._control("POST", "clock", {"advance_seconds": seconds})["now"]

    def advance_clock_to(self, timestamp: int) -> float:
        """Move the emulator's clock to `timestamp` (epoch seconds, not in its past); its new time."""
        return self._control("POST", "clock", {"advance_to": timestamp})["now"]

    def now(self) -> float:
        """The emulator's time (reading it also runs what fell due)."""
        return self._control("GET", "clock")["now"]

    def set_webhook_mode(self, mode: str) -> None:
        """``"snapshot"`` (v1 events) or ``"thin"`` (v2 notifications to fetch with ``fetch_event()``); until reset."""
        self._control("POST", "webhook_mode", {"mode": mode})

    def set_invoice_grace(self, seconds: int) -> None:
        """How long a new cycle draft waits before it finalizes itself (default 3600 s); until reset."""
        self._control("POST", "invoice_grace", {"seconds": seconds})

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
        """A draft invoice for the period containing `at` (default now) now, outside the cycle, and its
        ``invoice.created`` webhook; it finalizes itself after the grace unless held."""
        return self._control("POST", "invoices", {"subscription": subscription, "at": at})


@contextmanager
def run_stripe_emulator(*, webhook_url: str | None = None, webhook_secret: str | None = None,
                        webhook_mode: str | None = None, invoice_grace_seconds: int | None = None,
                        timeout: float = 15.0) -> Iterator[StripeEmulator]:
    """Start ``python -m plugin.stripe.emulator`` on a free port, wait until it answers, stop it on exit.

    `webhook_mode` and `invoice_grace_seconds` are the start-up values a reset returns to.
    """
    port = free_port()
    command = [sys.executable, "-m", "plugin.stripe.emulator", "--port", str(port)]
    if webhook_url:
        command += ["--webhook-url", webhook_url, "--webhook-secret", webhook_secret or ""]
    if webhook_mode is not None:
        command += ["--webhook-mode", webhook_mode]
    if invoice_grace_seconds is not None:
        command += ["--invoice-grace-seconds", str(invoice_grace_seconds)]
    with serving(command, f"http://127.0.0.1:{port}/_emulator/health", "stripe emulator", timeout) as process:
        yield StripeEmulator(port=port, process=process)


class WebhookReceiver:
    """A local HTTP endpoint that keeps every POST (body bytes and Stripe-Signature header).

    `events` reads the v1 snapshot events among them (``stripe.Webhook.construct_event``), `notifications`
    the thin ones (``StripeClient.parse_event_notification``); both verify the signature under `secret`.
    """

    def __init__(self, secret: str, failures: int = 0) -> None:
        """The first `failures` POSTs are answered 500 (to exercise the sender's retries)."""
        self.secret = secret
        received = self.received = []
        failures_left = [failures]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((body, self.headers.get("Stripe-Signature")))
                self.send_response(500 if failures_left[0] > 0 else 200)
                failures_left[0] -= 1
                self.end_headers()

            def log_message(self, *args) -> None:
                """Quiet: the test output is for assertions."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self, object_name: str) -> list[tuple[bytes, str | None]]:
        """What arrived whose JSON ``object`` is `object_name` (``event`` or ``v2.core.event``)."""
        return [(body, signature) for body, signature in list(self.received)
                if json.loads(body).get("object") == object_name]

    def events(self, event_type: str, count: int = 1, timeout: float = 5.0) -> list[stripe.Event]:
        """Verified snapshot events of `event_type`, once `count` of them arrived."""
        return self._wait(lambda: [stripe.Webhook.construct_event(body, signature, self.secret)
                                   for body, signature in self.bodies("event")], event_type, count, timeout)

    def notifications(self, client: stripe.StripeClient, event_type: str, count: int = 1,
                      timeout: float = 5.0) -> list[EventNotification]:
        """Verified thin notifications of `event_type` (bound to `client` for ``fetch_event()``), once `count`
        of them arrived."""
        return self._wait(lambda: [client.parse_event_notification(body, signature, self.secret)
                                   for body, signature in self.bodies("v2.core.event")], event_type, count, timeout)

    def _wait(self, read, event_type: str, count: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matching = [event for event in read() if event.type == event_type]
            if len(matching) >= count:
                return matching
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} {event_type} webhooks after {timeout} s")


@contextmanager
def receiving(receiver: WebhookReceiver) -> Iterator[WebhookReceiver]:
    """Serve `receiver` on its port for the block."""
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()

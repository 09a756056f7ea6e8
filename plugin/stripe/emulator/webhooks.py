"""Webhook delivery as Stripe does it: a signed POST of the `event` object, retried in the background.

The signature is ``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the
endpoint secret>``, byte for byte what `stripe.Webhook.construct_event` verifies. The signing time is
the wall clock even when the emulator's own clock was moved forward: the receiver checks the
signature's age against its real clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

logger = logging.getLogger(__name__)

RETRY_DELAYS_SECONDS = (0.2, 1.0, 3.0)
"""Pause before each retry; one first attempt plus len(...) retries."""


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    signed = hmac.new(secret.encode("utf-8"), f"{timestamp}.{payload}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={signed.hexdigest()}"


class WebhookSender:
    """Delivers every published event to one endpoint, each in its own background task, and logs attempts."""

    def __init__(self, url: str, secret: str, *, retry_delays: Sequence[float] = RETRY_DELAYS_SECONDS,
                 timeout_seconds: float = 5.0, wall_clock: Callable[[], float] = time.time):
        self.url = url
        self.secret = secret
        self.retry_delays = tuple(retry_delays)
        self.timeout_seconds = timeout_seconds
        self.wall_clock = wall_clock
        self.attempts: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def publish(self, event: dict[str, Any]) -> None:
        """Schedule delivery; must be called from the running event loop (the app's request handlers)."""
        task = asyncio.get_running_loop().create_task(self._deliver(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event, indent=2)
        for attempt, pause in enumerate((0.0, *self.retry_delays), start=1):
            await asyncio.sleep(pause)
            status, error = await self._post(payload)
            self.attempts.append({
                "event_id": event["id"], "type": event["type"], "attempt": attempt, "url": self.url,
                "status": status, "error": error, "at": self.wall_clock(),
            })
            if status is not None and 200 <= status < 300:
                return
        logger.warning("webhook %s (%s) not delivered after %d attempts", event["id"], event["type"], attempt)

    async def _post(self, payload: str) -> tuple[int | None, str | None]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_seconds)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": signature_header(payload, self.secret, int(self.wall_clock())),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) meterline-emulator",
        }
        try:
            response = await self._client.post(self.url, content=payload.encode("utf-8"), headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, None

    def deliveries(self) -> list[dict[str, Any]]:
        return list(self.attempts)

    def reset(self) -> None:
        """Forget the attempt log and stop deliveries still waiting for a retry."""
        for task in list(self._tasks):
            task.cancel()
        self.attempts.clear()

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

"""Stripe's side of reconciliation: a customer's meter event summaries, read through the SDK
(`client.v1.billing.meters.event_summaries.list`), summed per clock hour.

A customer's total over the window is one call (`total`); its hours (`hourly`: the calls of
`plugin.rules.reconcile.summary_requests`, minute bounds, whole hours when grouped by hour, pages
of 100 with `starting_after`) are asked only for a customer whose total diverged or whose `unknown`
events are to be settled. `calls` counts them: Stripe's read rate limit is what reconciling a
large fleet costs (bench/reconcile.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import stripe

from plugin.rules.reconcile import SummaryRequest, Window, hour_of

PAGE = 100


def find_meter_id(client: stripe.StripeClient, event_name: str) -> str | None:
    """The active meter that counts `event_name` (what `meterline stripe setup` made), or None."""
    for meter in client.v1.billing.meters.list({"status": "active", "limit": PAGE}).auto_paging_iter():
        if meter.event_name == event_name:
            return meter.id
    return None


class SummaryReader:
    def __init__(self, client: stripe.StripeClient, meter_id: str) -> None:
        self.client = client
        self.meter_id = meter_id
        self.calls = 0

    def total(self, stripe_customer_id: str, compared: Window) -> int:
        """µcr Stripe has counted for the customer in the window (one ungrouped summary)."""
        if compared.start >= compared.end:
            return 0
        return sum(self.hourly(stripe_customer_id, [SummaryRequest(compared.start, compared.end, False)]).values())

    def hourly(self, stripe_customer_id: str, requests: Sequence[SummaryRequest]) -> dict[int, int]:
        """hour -> µcr Stripe has counted for the customer in each requested window."""
        hours: dict[int, int] = defaultdict(int)
        for request in requests:
            params = {"customer": stripe_customer_id, "start_time": int(request.start.timestamp()),
                      "end_time": int(request.end.timestamp()), "limit": PAGE}
            if request.hourly:
                params["value_grouping_window"] = "hour"
            while True:
                page = self.client.v1.billing.meters.event_summaries.list(self.meter_id, params)
                self.calls += 1
                for summary in page.data:
                    hours[hour_of(datetime.fromtimestamp(summary.start_time, UTC))] += round(summary.aggregated_value)
                if not page.has_more or not page.data:
                    break
                params["starting_after"] = page.data[-1].id
        return dict(hours)

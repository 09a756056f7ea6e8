"""Stripe webhooks: meter error reports turn v2-stream events Stripe rejected later into dead letters.

The parsing is pure (first half). The second half is end to end: the emulator validates v2
events after accepting them and posts a signed webhook to the real proxy's route.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import httpx
import openai
import pytest
import stripe

from plugin.ledger import store
from plugin.ledger.store import make_engine
from plugin.outbox import store as outbox
from plugin.settings import MeterlineConfig
from plugin.stripe.setup import StripeSetup
from plugin.stripe.webhooks import meter_error_report
from tests.support.delivery import PRICED_YAML, ask, stripe_env, wait_for
from tests.support.processes import free_port
from tests.support.proxy import run_proxy
from tests.support.stripe_emulator import DEFAULT_API_KEY, run_stripe_emulator

SECRET = "whsec_meterline_test"

# The shape Stripe documents for event destinations (v2 event, data inline).
V2_REPORT = {
    "id": "evt_test_65RCjj4E", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
    "data": {
        "developer_message_summary": "There is 1 invalid event",
        "reason": {"error_count": 3, "error_types": [{
            "code": "meter_event_no_customer_defined", "error_count": 3,
            "sample_errors": [{"error_message": "Customer mapping key stripe_customer_id not found in payload.",
                               "request": {"identifier": "mtr_a"}}],
        }]},
        "validation_end": "2024-09-26T17:46:20.000Z", "validation_start": "2024-09-26T17:46:10.000Z",
    },
    "related_object": {"id": "mtr_test_61RC", "type": "billing.meter"},
}


def test_reads_the_documented_v2_event_shape():
    report = meter_error_report(V2_REPORT)
    assert (report.event_id, report.meter, report.error_count) == ("evt_test_65RCjj4E", "mtr_test_61RC", 3)
    [sample] = report.samples
    assert (sample.identifier, sample.code) == ("mtr_a", "meter_event_no_customer_defined")
    assert "meter_event_no_customer_defined" in sample.reason()
    assert "3 invalid meter event(s)" in report.alert_message() and "reconcile" in report.alert_message()


def test_reads_the_snapshot_event_shape_and_ignores_other_events():
    snapshot = {"id": "evt_1", "type": "billing.meter.error_report_triggered",
                "data": {"object": {"meter": "mtr_1", "reason": V2_REPORT["data"]["reason"]}}}
    report = meter_error_report(snapshot)
    assert report.meter == "mtr_1" and [s.identifier for s in report.samples] == ["mtr_a"]
    assert meter_error_report({"id": "evt_2", "type": "invoice.created", "data": {"object": {}}}) is None


def signed(payload: str, secret: str = SECRET) -> dict[str, str]:
    timestamp = int(datetime.now(UTC).timestamp())
    signature = stripe.WebhookSignature._compute_signature(f"{timestamp}.{payload}", secret)
    return {"Stripe-Signature": f"t={timestamp},v1={signature}", "Content-Type": "application/json"}


@pytest.mark.proxy
async def test_v2_events_stripe_rejects_later_become_dead_letters(tmp_path, upstream):
    port = free_port()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    with run_stripe_emulator(webhook_url=f"http://127.0.0.1:{port}/meterline/v1/stripe/webhook",
                             webhook_secret=SECRET) as emulator:
        StripeSetup(emulator.client(), MeterlineConfig.model_validate(PRICED_YAML)).run()
        store.add_customer(engine, "good", "pro", emulator.client().v1.customers.create({"name": "good"}).id)
        store.add_customer(engine, "gone", "pro", "cus_deleted_at_stripe")  # accepted by the stream, rejected later
        keys = {name: store.create_key(engine, name)[1] for name in ("good", "gone")}
        env = stripe_env(emulator, METERLINE_STRIPE_STREAM="1", STRIPE_WEBHOOK_SECRET=SECRET)
        with run_proxy(tmp_path / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML, env=env,
                       port=port) as proxy:
            for name, key in keys.items():
                client = openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", api_key=key, max_retries=0)
                await asyncio.gather(*(client.chat.completions.create(model="test-model", messages=ask(f"[[p={n}]]"))
                                       for n in range(10, 13)))
            wait_for(lambda: len(outbox.list_events(engine, status="dead")) == 3, what="the error report")
            dead = outbox.list_events(engine, status="dead")
            assert {event.customer_id for event in dead} == {"gone"}
            assert all("meter_event_customer_not_found" in event.last_error for event in dead)
            # One report per stream batch that held rejected events: the relay may have sent the three in
            # one batch or in several. Each report leaves one alert, and together they count all three.
            def reports() -> list[str]:  # the emulator logs a delivery once the proxy has answered it
                return sorted({d["event_id"] for d in emulator.webhook_deliveries()
                               if d["type"] == "v1.billing.meter.error_report_triggered" and d["status"] == 200})

            alerts = store.list_alerts(engine, "meter_error_report")
            wait_for(lambda: len(reports()) == len(alerts) >= 1, what="the reports' deliveries")
            counted = [re.search(r"(\d+) invalid meter event\(s\)", alert.message) for alert in alerts]
            assert sum(int(match.group(1)) for match in counted) == 3
            assert {e.customer_id for e in outbox.list_events(engine, status="delivered", limit=100)} == {"good"}

            # the same report again (Stripe retries webhooks) changes nothing; a forged one is refused
            # (Stripe sends these reports as thin notifications: the body names the event, the proxy fetches it)
            stored = httpx.get(f"{emulator.base_url}/v2/core/events/{reports()[0]}",
                               headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}).json()
            body = json.dumps({name: stored[name] for name in ("id", "object", "type", "livemode", "created",
                                                                "related_object")})
            hook = proxy.base_url + "/meterline/v1/stripe/webhook"
            again = httpx.post(hook, content=body, headers=signed(body))
            assert again.json() == {"received": True, "handled": False, "duplicate": True}  # acted on once
            assert len(store.list_alerts(engine, "meter_error_report")) == len(alerts)
            forged = httpx.post(hook, content=body, headers=signed(body, "whsec_wrong"))
            assert forged.status_code == 400 and forged.json()["error"]["type"] == "invalid_signature"
            other = '{"id": "evt_x", "object": "event", "type": "customer.created", "data": {"object": {}}}'
            assert httpx.post(hook, content=other, headers=signed(other)).json() == {"received": True, "handled": False}
    engine.dispose()

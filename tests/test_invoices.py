"""A whole billing cycle on the Stripe emulator with the real proxy: the relay delivers the ledger's
events, the emulator's clock ends the period, Stripe's draft and finalization come back as signed
webhooks (snapshot, then thin), and the spike guard holds a runaway month's draft until an operator
credits and releases it. The proofs: the invoices' totals against the ledger, to the cent; the
alert, once; the draft's state at Stripe."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from plugin import runtime
from plugin.cli import main as cli_main
from plugin.ledger import store
from plugin.ledger.store import as_utc, make_engine
from plugin.rules.invoices import expected_cents
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.settings import MeterlineConfig
from plugin.stripe.emulator.webhooks import signature_header
from plugin.stripe.setup import StripeSetup
from tests.support.delivery import PRICED_YAML, stripe_env, wait_for
from tests.support.processes import free_port
from tests.support.proxy import MASTER_KEY, run_proxy
from tests.support.stripe_emulator import run_stripe_emulator

pytestmark = pytest.mark.proxy

SECRET = "whsec_meterline_invoices"
HOLDING_YAML = PRICED_YAML | {"policies": {**PRICED_YAML.get("policies", {}), "invoice_spike_action": "hold"}}
CREDIT = 1_000_000


def next_month(moment: datetime) -> datetime:
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def signed(body: str, secret: str = SECRET) -> dict[str, str]:
    stamp = int(datetime.now(UTC).timestamp())
    return {"Stripe-Signature": signature_header(body, secret, stamp), "Content-Type": "application/json"}


def test_a_billing_cycle_the_spike_guard_holds_credit_and_approve(tmp_path, upstream, monkeypatch, capsys):
    port = free_port()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    plan = MeterlineConfig.model_validate(HOLDING_YAML).plans["pro"]
    with run_stripe_emulator(webhook_url=f"http://127.0.0.1:{port}/meterline/v1/stripe/webhook",
                             webhook_secret=SECRET, invoice_grace_seconds=600) as emulator:
        setup = StripeSetup(emulator.client(), MeterlineConfig.model_validate(HOLDING_YAML))
        setup.run()
        stripe_id = emulator.client().v1.customers.create({"name": "inv-a"}).id
        subscription_id, _ = setup.subscribe("pro", stripe_id)
        store.add_customer(engine, "inv-a", "pro", stripe_id)
        env = stripe_env(emulator, STRIPE_WEBHOOK_SECRET=SECRET, METERLINE_RECONCILE_SECONDS="0")
        with run_proxy(tmp_path / "proxy", upstream.base_url, url, meterline_yaml=HOLDING_YAML, env=env,
                       port=port) as proxy, httpx.Client(base_url=proxy.base_url + "/meterline/v1", timeout=60,
                                                         headers={"Authorization": f"Bearer {MASTER_KEY}"}) as api:
            # month 1: 1,600 credits billed through the ledger (600 over the 1,000 included), delivered by the relay
            now = datetime.fromtimestamp(emulator.now(), UTC)
            used_1 = [700 * CREDIT, 900 * CREDIT]
            store.write_records(engine, [BillingRecord(LedgerRow(
                id=f"mtr_inv_a_{index}", customer_id="inv-a", model="gpt-x", action="summarise", credits_ucr=ucr,
                created_at=now - timedelta(seconds=10 - index))) for index, ucr in enumerate(used_1)])
            wait_for(lambda: len([e for e in emulator.meter_events() if e["identifier"].startswith("mtr_inv_a")]) == 2,
                     what="month 1 delivered")
            month_2 = next_month(now)
            emulator.advance_clock_to(int(month_2.timestamp()) + 1)  # the period ends: a draft
            emulator.advance_clock(601)  # past the grace: finalized
            wait_for(lambda: [i["status"] for i in api.get("/invoices").json()["invoices"]] == ["open"],
                     what="month 1's invoice.finalized recorded")
            [first] = api.get("/invoices").json()["invoices"]
            # Stripe's invoice, to the cent: the $20 base fee + 600 × $0.002 from the ledger = $21.20
            assert first["total_cents"] == expected_cents(plan, sum(used_1)) == 2120 == first["ledger_cents"]
            assert store.list_alerts(engine, "invoice_spike") == []  # a first invoice has nothing to rise above
            # customer.subscription.updated (the items' new period): meterline's period follows Stripe's
            wait_for(lambda: as_utc(store.get_customer(engine, "inv-a").period_anchor or now) == month_2,
                     what="the period anchor moved to Stripe's")

            # month 2: a runaway agent, 16,000 credits straight to Stripe (15,000 over included: $30)
            emulator.client().v1.billing.meter_events.create({
                "event_name": "meterline_credits", "identifier": "runaway-1", "timestamp": int(month_2.timestamp()) + 60,
                "payload": {"stripe_customer_id": stripe_id, "value": str(16_000 * CREDIT)}})
            emulator.advance_clock_to(int(next_month(month_2).timestamp()) + 1)
            wait_for(lambda: len(store.list_alerts(engine, "invoice_spike")) == 1, what="the spike alert")
            [alert] = store.list_alerts(engine, "invoice_spike")
            draft_id = alert.subject_id
            assert "$21.20 → $50.00" in alert.message and "+135%" in alert.message and alert.customer_id == "inv-a"
            draft = emulator.client().v1.invoices.retrieve(draft_id)
            assert (draft.status, draft.total, draft.auto_advance) == ("draft", 5000, False)  # held
            assert draft.total == expected_cents(plan, 16_000 * CREDIT)

            # Stripe delivers the same event again: nothing more; a forged one: 400, nothing
            [delivery] = [d for d in emulator.webhook_deliveries()
                          if d["type"] == "invoice.created" and d.get("object_id", draft_id) == draft_id][-1:]
            event = emulator.client().v1.events.retrieve(delivery["event_id"])
            body = str(event)
            hook = proxy.base_url + "/meterline/v1/stripe/webhook"
            assert httpx.post(hook, content=body, headers=signed(body)).json()["duplicate"] is True
            forged = httpx.post(hook, content=body, headers=signed(body, "whsec_wrong"))
            assert forged.status_code == 400 and forged.json()["error"]["type"] == "invalid_signature"
            assert len(store.list_alerts(engine, "invoice_spike")) == 1

            emulator.advance_clock(3600)  # long past the grace: a held draft waits
            assert emulator.client().v1.invoices.retrieve(draft_id).status == "draft"
            held = [i for i in api.get("/invoices").json()["invoices"] if i["id"] == draft_id]
            assert [(i["status"], i["held"]) for i in held] == [("draft", True)]

            # a credit lands on that draft only; on a finalized invoice it is refused
            credited = api.post(f"/invoices/{draft_id}/credit", json={"usd": "5", "why": "runaway agent"})
            assert credited.status_code == 200 and credited.json()["amount"] == -500
            refused = api.post(f"/invoices/{first['id']}/credit", json={"usd": "5"})
            assert refused.status_code == 409 and "not a draft" in refused.json()["error"]["message"]
            assert emulator.client().v1.invoices.retrieve(first["id"]).total == 2120

            assert api.post(f"/invoices/{draft_id}/approve").status_code == 200
            emulator.advance_clock(1)  # released: due, so it finalizes
            wait_for(lambda: {i["id"]: i["status"] for i in api.get("/invoices").json()["invoices"]}.get(draft_id)
                     == "open", what="the released draft finalized")
            [second] = [i for i in api.get("/invoices").json()["invoices"] if i["id"] == draft_id]
            assert (second["total_cents"], second["held"]) == (4500, False)

            # the CLI: the same list; a credit on a finalized invoice is bad input (exit 2), nothing changes
            for name, value in (env | {"METERLINE_DATABASE_URL": url}).items():
                monkeypatch.setenv(name, value)
            runtime.reset_for_tests()
            try:
                assert cli_main(["invoices", "list", "--json"]) == 0
                listed = json.loads(capsys.readouterr().out)["invoices"]
                assert {i["id"]: i["total_cents"] for i in listed} == {first["id"]: 2120, draft_id: 4500}
                assert cli_main(["invoices", "credit", first["id"], "--usd", "1"]) == 2
                assert "not a draft" in capsys.readouterr().err
            finally:
                runtime.reset_for_tests()
            assert emulator.client().v1.invoices.retrieve(first["id"]).total == 2120

            # thin events (event destinations) are read through the SDK just as well
            emulator.set_webhook_mode("thin")
            manual = emulator.finalize_invoice(subscription_id)  # a draft, announced as v1.invoice.created
            emulator.advance_clock(601)
            wait_for(lambda: manual["id"] in {i["id"] for i in api.get("/invoices").json()["invoices"]},
                     what="the thin invoice.finalized recorded")
    engine.dispose()

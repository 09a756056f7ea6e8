"""Reconciliation end to end: a real proxy whose relay delivers to the Stripe emulator (the unmodified
`stripe` SDK on both sides), then the ledger compared with Stripe's meter event summaries through
`POST /reconciliation`, `GET /reconciliation`, the usage API and `meterline reconcile`. The proof is
what Stripe was made to lose or gain: the run names the customer, the amount and the hour."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from plugin import runtime
from plugin.cli import main as cli_main
from plugin.ledger import store
from plugin.ledger.store import make_engine
from plugin.outbox import store as outbox
from plugin.rules.reconcile import hour_of
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.rollups import HOUR, start_of
from plugin.settings import MeterlineConfig
from plugin.stripe.setup import StripeSetup
from tests.support.delivery import PRICED_YAML, stripe_env, wait_for
from tests.support.proxy import MASTER_KEY, run_proxy
from tests.support.stripe_emulator import StripeEmulator, run_stripe_emulator

pytestmark = pytest.mark.proxy

RECONCILE_ENV = {"METERLINE_RECONCILE_SECONDS": "0", "METERLINE_RECONCILE_LAG_SECONDS": "0"}
"""No timer (each test runs its own), and no lag: the emulator's summaries are current unless told."""


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator() as server:
        StripeSetup(server.client(), MeterlineConfig.model_validate(PRICED_YAML)).run()
        yield server


@pytest.fixture(scope="module")
def reconciling(tmp_path_factory, upstream, emulator):
    workdir = tmp_path_factory.mktemp("reconciling")
    url = f"sqlite:///{workdir / 'ledger.db'}"
    engine = make_engine(url)
    with run_proxy(workdir / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML,
                   env=stripe_env(emulator, **RECONCILE_ENV)) as proxy:
        yield proxy, engine, url
    engine.dispose()


def api(proxy) -> httpx.Client:
    return httpx.Client(base_url=proxy.base_url + "/meterline/v1", timeout=60,
                        headers={"Authorization": f"Bearer {MASTER_KEY}"})


def billed(engine, emulator, customer_id: str, credits_ucr: list[int], *, linked: bool = True) -> list[LedgerRow]:
    """A customer with ledger rows (at most 3), each in a clock hour of its own within the last few hours of
    this month (so an hour's totals are the row's), delivered by the relay."""
    stripe_id = emulator.client().v1.customers.create({"name": customer_id}).id if linked else None
    store.add_customer(engine, customer_id, "pro", stripe_id)
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    assert len(credits_ucr) <= 3
    rows = [LedgerRow(id=f"mtr_{customer_id}_{index}", customer_id=customer_id, model="m", credits_ucr=ucr,
                      created_at=max(month_start + timedelta(hours=index, minutes=30),
                                     hour_start - timedelta(hours=3 - index) + timedelta(minutes=30)))
            for index, ucr in enumerate(credits_ucr)]
    store.write_records(engine, [BillingRecord(row) for row in rows])
    if linked:
        wait_for(lambda: {event.id for event in outbox.list_events(engine, status="delivered", customer_id=customer_id,
                                                                  limit=100)} == {row.id for row in rows},
                 what=f"{customer_id}'s events delivered")
    return rows


def entry(report: dict, customer_id: str) -> dict:
    [found] = [item for item in report["customers"] if item["customer_id"] == customer_id]
    return found


def alerts_about(engine, customer_id: str) -> list:
    return [alert for alert in store.list_alerts(engine, "reconciliation_divergence", customer_id=customer_id)]


def test_a_lost_event_is_found_with_its_customer_amount_and_hour_and_alerted_once(reconciling, emulator):
    proxy, engine, _ = reconciling
    rows = billed(engine, emulator, "rec-lost", [1_500_000, 2_250_000, 700_000])
    with api(proxy) as client:
        first = client.post("/reconciliation").json()
        assert entry(first, "rec-lost") == {
            "customer_id": "rec-lost", "stripe_customer_id": store.get_customer(engine, "rec-lost").stripe_customer_id,
            "ledger_ucr": 4_450_000, "in_flight_ucr": 0, "stripe_ucr": 4_450_000, "divergence_ucr": 0,
            "divergence_pct": 0.0, "status": "ok", "hours": []}
        emulator.forget_meter_event(rows[1].id)  # Stripe lost the middle event
        second = client.post("/reconciliation").json()
        lost = entry(second, "rec-lost")
        assert (lost["status"], lost["divergence_ucr"], lost["stripe_ucr"]) == ("diverged", 2_250_000, 2_200_000)
        hour = start_of(hour_of(rows[1].created_at), HOUR).isoformat()
        assert [h for h in lost["hours"] if h["start"] == hour] == [
            {"start": hour, "ledger_ucr": sum(r.credits_ucr for r in rows if hour_of(r.created_at) == hour_of(
                rows[1].created_at)), "stripe_ucr": sum(r.credits_ucr for r in rows if r is not rows[1] and hour_of(
                    r.created_at) == hour_of(rows[1].created_at))}]
        assert client.get("/reconciliation").json() == second  # the last run, as kept
        client.post("/reconciliation")  # a later run sees the same divergence: no second alert
        [alert] = alerts_about(engine, "rec-lost")
        assert "fewer" in alert.message and "2.25" in alert.message and hour[:13].replace("T", " ") in alert.message
        stripe = client.get("/customers/rec-lost/usage").json()["stripe"]
        assert (stripe["status"], stripe["divergence_ucr"], stripe["stripe_ucr"]) == ("diverged", 2_250_000, 2_200_000)


def test_a_foreign_event_at_stripe_is_found_as_stripe_over(reconciling, emulator):
    proxy, engine, _ = reconciling
    [row] = billed(engine, emulator, "rec-foreign", [3_000_000])
    stripe_id = store.get_customer(engine, "rec-foreign").stripe_customer_id
    emulator.client().v1.billing.meter_events.create({  # sent by something that is not meterline
        "event_name": "meterline_credits", "identifier": "someone-else-1", "timestamp": int(row.created_at.timestamp()),
        "payload": {"stripe_customer_id": stripe_id, "value": "400000"}})
    with api(proxy) as client:
        foreign = entry(client.post("/reconciliation").json(), "rec-foreign")
    assert (foreign["status"], foreign["divergence_ucr"], foreign["divergence_pct"]) == ("diverged", -400_000, 13.33)
    assert foreign["hours"] == [{"start": start_of(hour_of(row.created_at), HOUR).isoformat(),
                                 "ledger_ucr": 3_000_000, "stripe_ucr": 3_400_000}]
    [alert] = alerts_about(engine, "rec-foreign")
    assert "more" in alert.message and alert.subject_id.endswith("stripe_over")


def test_in_flight_is_not_divergence_and_a_customer_without_stripe_is_not_linked(reconciling, emulator):
    proxy, engine, _ = reconciling
    billed(engine, emulator, "rec-nolink", [900_000], linked=False)  # held by the relay: no Stripe id
    with api(proxy) as client:
        nolink = entry(client.post("/reconciliation").json(), "rec-nolink")
    assert (nolink["status"], nolink["ledger_ucr"], nolink["in_flight_ucr"], nolink["stripe_ucr"]) == (
        "not_linked", 900_000, 900_000, 0)
    assert nolink["divergence_ucr"] == 0 and alerts_about(engine, "rec-nolink") == []


def test_unknown_events_are_settled_where_the_hour_proves_it(reconciling, emulator):
    proxy, engine, _ = reconciling
    landed, missing = billed(engine, emulator, "rec-unknown", [1_000_000, 2_000_000])
    emulator.forget_meter_event(missing.id)  # Stripe never got the second one
    with engine.begin() as connection:  # both sends timed out long ago: outcome unknown
        connection.exec_driver_sql("UPDATE outbox SET status = 'unknown', uncertain = 1 WHERE customer_id = ?",
                                   ("rec-unknown",))
    with api(proxy) as client:
        settled = entry(client.post("/reconciliation").json(), "rec-unknown")
    assert settled["status"] == "ok"  # the landed one is delivered, the missing one on its way again
    wait_for(lambda: {event.id: event.status for event in outbox.list_events(
        engine, status="delivered", customer_id="rec-unknown")}.keys() == {landed.id, missing.id},
        what="the missing event sent again")
    identifiers = [event["identifier"] for event in emulator.meter_events() if not event["forgotten"]]
    assert identifiers.count(landed.id) == identifiers.count(missing.id) == 1  # each counted once at Stripe
    with api(proxy) as client:
        assert entry(client.post("/reconciliation").json(), "rec-unknown")["stripe_ucr"] == 3_000_000


def test_the_cli_prints_the_run_and_exits_1_on_divergence(reconciling, emulator, monkeypatch, capsys):
    proxy, engine, url = reconciling
    rows = billed(engine, emulator, "rec-cli", [5_000_000])
    for name, value in (stripe_env(emulator, **RECONCILE_ENV) | {"METERLINE_DATABASE_URL": url}).items():
        monkeypatch.setenv(name, value)
    runtime.reset_for_tests()
    try:
        assert cli_main(["reconcile", "--customer", "rec-cli"]) == 0
        out = capsys.readouterr().out
        [line] = [line for line in out.splitlines() if line.startswith("rec-cli ")]
        assert line.split()[1:4] == ["5", "0", "5"] and line.split()[-1] == "ok"
        emulator.forget_meter_event(rows[0].id)
        with pytest.raises(SystemExit) as exited:
            cli_main(["reconcile", "--customer", "rec-cli", "--json"])
        assert exited.value.code == 1
        report = json.loads(capsys.readouterr().out)
        assert [(item["customer_id"], item["status"]) for item in report["customers"]] == [("rec-cli", "diverged")]
        assert cli_main(["reconcile", "--customer", "nobody-here"]) == 2
        assert "unknown customer" in capsys.readouterr().err
    finally:
        runtime.reset_for_tests()


def test_the_proxy_reconciles_on_its_own_timer(tmp_path, upstream, emulator):
    """METERLINE_RECONCILE_SECONDS: nobody asks, and the last run appears at GET /reconciliation."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    env = stripe_env(emulator, METERLINE_RECONCILE_SECONDS="1", METERLINE_RECONCILE_LAG_SECONDS="0")
    with run_proxy(tmp_path / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML, env=env) as proxy, \
            api(proxy) as client:
        billed(engine, emulator, "rec-timer", [1_000_000])

        def reconciled() -> bool:
            answer = client.get("/reconciliation")
            return answer.status_code == 200 and any(
                item["customer_id"] == "rec-timer" and item["status"] == "ok" and item["stripe_ucr"] == 1_000_000
                for item in answer.json()["customers"])

        wait_for(reconciled, timeout=60, what="a timed reconciliation that saw rec-timer")
    engine.dispose()

"""The console's Stripe screens: 4 (reconciliation) and 5 (invoices), under Pilot against a real proxy
whose relay delivers to the Stripe emulator. The proof of each action is what the API (and Stripe)
hold afterwards; the pure parts first, with plain values."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from plugin.ledger import invoices, store
from plugin.ledger.store import make_engine
from plugin.settings import MeterlineConfig
from plugin.stripe.setup import StripeSetup
from tests.support import console_api
from tests.support.delivery import PRICED_YAML, stripe_env
from tests.support.proxy import run_proxy
from tests.support.stripe_emulator import StripeEmulator, run_stripe_emulator
from tests.test_reconcile import RECONCILE_ENV, api, billed, entry
from tests.test_tui import SIZE, _fields, console, dialog, open_screen, settle
from tui import format as fmt
from tui.client import InvoiceRow, ReconciledCustomer
from tui.screens import invoices as invoice_screen
from tui.screens.confirm import ConfirmDialog
from tui.screens.credit import CreditForm, credit_usd
from tui.screens.invoices import InvoicesScreen, usd
from tui.screens.reconciliation import ReconciliationScreen, fitted, hour_text, note
from tui.widgets.record_table import ordered

M = 1_000_000


# ---------------------------------------------------------------------- pure parts


def test_a_credit_is_positive_whole_cents_as_the_api_takes_it():
    assert [credit_usd(text) for text in ("12.5", "$1,250", "0.01", "7.500")] == ["12.50", "1250.00", "0.01", "7.50"]
    for text, problem in (("", "a number"), ("twelve", "a number"), ("0", "more than 0"), ("-3", "more than 0"),
                          ("12.345", "two decimals"), ("1e9", "less than"), ("NaN", "a number")):
        with pytest.raises(ValueError, match=problem):
            credit_usd(text)
    assert (usd(None), usd(0), usd(-150), usd(150, signed=True), usd(12_345_678)) == (
        "—", "$0.00", "-$1.50", "+$1.50", "$123,456")


def test_the_note_fits_as_many_differing_hours_as_two_lines_hold():
    parts = [f"hour {n:02d} ledger 1.00 · Stripe 0.00" for n in range(6)]  # 33 characters each
    assert fitted(parts[:2], 80) == "; ".join(parts[:2])
    shown = fitted(parts, 70).split("\n")
    assert len(shown) == 2 and all(len(line) <= 70 for line in shown)
    assert shown == [parts[0] + "; " + parts[1], parts[2] + "; +3 more"]
    diverged = msgspec.convert({"customer_id": "a", "stripe_customer_id": "cus_a", "ledger_ucr": 3 * M,
                                "in_flight_ucr": 0, "stripe_ucr": 0, "divergence_ucr": 3 * M,
                                "divergence_pct": 100.0, "status": "diverged",
                                "hours": [{"start": "2026-12-03T14:00:00+00:00", "ledger_ucr": 2_250_000,
                                           "stripe_ucr": 0}]}, ReconciledCustomer)
    assert note(diverged, 78) == hour_text(diverged.hours[0]) == "2026-12-03 14:00 ledger 2.25 · Stripe 0.00"


def test_held_drafts_come_first_then_the_newest():
    rows = msgspec.convert(console_api.invoices()["invoices"], list[InvoiceRow])
    draft, november, october = rows
    shown = ordered([october, november, draft], invoice_screen.COLUMNS, "period", True)
    assert shown == [draft, november, october]
    assert [invoice_screen.faulty(row) for row in shown] == [True, False, True]  # held; as billed; $1.50 short


# ---------------------------------------------------------------------- against a proxy and the emulator

CONFIG = MeterlineConfig.model_validate(PRICED_YAML)


@pytest.fixture(scope="module")
def emulator() -> Iterator[StripeEmulator]:
    with run_stripe_emulator() as server:
        StripeSetup(server.client(), CONFIG).run()
        yield server


@pytest.fixture(scope="module")
def reconciling(tmp_path_factory, upstream, emulator):
    """A proxy that delivers to the emulator and reconciles only when asked (no timer, no lag)."""
    workdir = tmp_path_factory.mktemp("tui-stripe")
    url = f"sqlite:///{workdir / 'ledger.db'}"
    engine = make_engine(url)
    with run_proxy(workdir / "proxy", upstream.base_url, url, meterline_yaml=PRICED_YAML,
                   env=stripe_env(emulator, **RECONCILE_ENV)) as proxy:
        yield proxy, engine
    engine.dispose()


def note_text(screen) -> str:
    return str(screen.query_one(".record-note").render())


@pytest.mark.proxy
async def test_screen_4_runs_a_reconciliation_and_shows_the_hour_stripe_lost(reconciling, emulator):
    """First in the module: its proxy has never reconciled."""
    proxy, engine = reconciling
    rows = billed(engine, emulator, "tui-lost", [1_500_000, 2_250_000, 700_000])
    billed(engine, emulator, "tui-nolink", [900_000], linked=False)
    with api(proxy) as client:
        assert client.get("/reconciliation").json()["error"]["type"] == "no_reconciliation"
    app = console(proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "4", ReconciliationScreen)
        assert screen.table.records == [] and screen.status.summary == "no reconciliation yet (r runs one)"
        assert "No reconciliation has run yet" in note_text(screen) and not app.connection.stale
        await pilot.press("r")
        await settle(pilot)
        with api(proxy) as client:
            first = client.get("/reconciliation").json()  # the run `r` made, kept by the proxy
        assert (entry(first, "tui-lost")["status"], entry(first, "tui-nolink")["status"]) == ("ok", "not_linked")
        assert f"Reconciled: {len(first['customers'])} customer(s), 0 diverged" in app.said
        assert {line.customer_id: (line.status, line.stripe_ucr) for line in screen.table.records} == {
            item["customer_id"]: (item["status"], item["stripe_ucr"]) for item in first["customers"]}
        checked = datetime.fromisoformat(first["checked_at"])
        assert screen.status.summary.startswith(f"checked {checked:%H:%M} UTC · period ")
        assert screen.table.move_to("tui-nolink")
        await pilot.pause()
        assert "has no Stripe customer" in note_text(screen)
        assert [column.cell(screen.table.cursor_record) for column in screen.table.columns][1:] == [
            "not linked", "0.90", "0.90", "—", "—", "—"]

        emulator.forget_meter_event(rows[1].id)  # Stripe lost the middle event
        await pilot.press("r")
        await settle(pilot)
        with api(proxy) as client:
            second = client.get("/reconciliation").json()
        lost = entry(second, "tui-lost")
        assert second["checked_at"] != first["checked_at"] and lost["status"] == "diverged"
        assert "1 diverged" in app.said[-1]
        assert screen.table.records[0].customer_id == "tui-lost"  # diverged first
        assert screen.table.move_to("tui-lost")
        await pilot.pause()
        assert [column.cell(screen.table.cursor_record) for column in screen.table.columns][1:6] == [
            "DIVERGED", "4.45", "0.00", "2.20", "+2.25"]
        [hour] = lost["hours"]
        start = datetime.fromisoformat(hour["start"])
        assert f"{start:%Y-%m-%d %H:%M} ledger {fmt.credits(hour['ledger_ucr'])} · Stripe " \
            f"{fmt.credits(hour['stripe_ucr'])}" in note_text(screen)
        await pilot.press("slash")
        screen.filter_input.value = "nolink"
        await pilot.pause()
        assert [line.customer_id for line in screen.table.records] == ["tui-nolink"]


def subscribed(engine, emulator: StripeEmulator, customer_id: str) -> tuple[str, str]:
    """A customer on the pro plan's prices at Stripe, and in meterline: (Stripe id, subscription id)."""
    client = emulator.client()
    stripe_id = client.v1.customers.create({"name": customer_id}).id
    store.add_customer(engine, customer_id, "pro", stripe_id)
    items = [{"price": price.id} for _, price in StripeSetup(client, CONFIG).plan_prices("pro")]
    return stripe_id, client.v1.subscriptions.create({"customer": stripe_id, "items": items}).id


def months_ago(months: int) -> datetime:
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(months):
        start = (start - timedelta(days=1)).replace(day=1)
    return start


def finalized(engine, invoice_id: str, customer_id: str, stripe_id: str, months: int, total_cents: int) -> None:
    """An invoice meterline recorded as finalized (`invoice.finalized`), `months` periods back."""
    start, end = months_ago(months), months_ago(months - 1)
    invoices.record(engine, {"id": invoice_id, "customer_id": customer_id, "stripe_customer_id": stripe_id,
                             "status": "paid", "total_cents": total_cents, "currency": "usd", "period_start": start,
                             "period_end": end, "finalized_at": end + timedelta(hours=1), "held": False})


def held_draft(engine, emulator: StripeEmulator, customer_id: str, stripe_id: str, subscription: str) -> dict:
    """A draft at Stripe the spike guard held (auto_advance off), recorded as meterline's guard does."""
    draft = emulator.finalize_invoice(subscription)
    emulator.client().v1.invoices.update(draft["id"], {"auto_advance": False})
    invoices.record(engine, {"id": draft["id"], "customer_id": customer_id, "stripe_customer_id": stripe_id,
                             "status": "draft", "total_cents": draft["total"], "currency": draft["currency"],
                             "period_start": datetime.fromtimestamp(draft["period_start"], UTC),
                             "period_end": datetime.fromtimestamp(draft["period_end"], UTC), "finalized_at": None,
                             "held": True})
    return draft


@pytest.mark.proxy
async def test_screen_5_approves_a_held_draft_and_credits_it_at_stripe(reconciling, emulator):
    proxy, engine = reconciling
    stripe_id, subscription = subscribed(engine, emulator, "tui-inv")
    draft = held_draft(engine, emulator, "tui-inv", stripe_id, subscription)
    with api(proxy) as client:
        base = client.get("/invoices", params={"customer_id": "tui-inv"}).json()["invoices"][0]["ledger_cents"]
    finalized(engine, "in_tuiAsBilled01", "tui-inv", stripe_id, 1, base)
    finalized(engine, "in_tuiTooMuch002", "tui-inv", stripe_id, 2, base + 150)
    stripe = emulator.client()
    app = console(proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "5", InvoicesScreen)
        screen.filter_input.value = "tui-inv"
        await settle(pilot)
        with api(proxy) as client:
            listed = client.get("/invoices", params={"customer_id": "tui-inv"}).json()["invoices"]
        assert [row.id for row in screen.table.records] == [draft["id"], "in_tuiAsBilled01", "in_tuiTooMuch002"]
        assert {row.id: (row.total_cents, row.ledger_cents, row.held) for row in screen.table.records} == {
            row["id"]: (row["total_cents"], row["ledger_cents"], row["held"]) for row in listed}
        assert [invoice_screen.faulty(row) for row in screen.table.records] == [True, False, True]
        with api(proxy) as client:  # the status line counts every invoice, not only the filtered ones
            everything = client.get("/invoices").json()["invoices"]
        assert f"{sum(row['held'] for row in everything)} held · 1 differ from the ledger" in screen.status.summary
        assert draft["id"] in note_text(screen) and "HELD by the spike guard" in note_text(screen)

        # approve: cancelled first (nothing changes), then released
        assert screen.table.move_to(draft["id"])
        await pilot.press("a")
        await dialog(pilot, ConfirmDialog)
        assert "It finalizes on Stripe's schedule." in str(app.screen.query_one(".question").render())
        await pilot.press("n")
        await settle(pilot)
        assert stripe.v1.invoices.retrieve(draft["id"]).auto_advance is False
        await pilot.press("a")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("y")
        await settle(pilot)
        assert stripe.v1.invoices.retrieve(draft["id"]).auto_advance is True
        with api(proxy) as client:
            [released] = [row for row in client.get("/invoices", params={"customer_id": "tui-inv"}).json()["invoices"]
                          if row["id"] == draft["id"]]
        assert released["held"] is False and not screen.table.cursor_record.held

        # a finalized invoice: approve is not offered; a credit is the API's refusal, shown as such
        assert screen.table.move_to("in_tuiTooMuch002")
        await pilot.press("a")
        await settle(pilot)
        assert app.said[-1] == "Only a draft the spike guard held can be approved."
        await pilot.press("c")
        await dialog(pilot, CreditForm)
        app.screen.query_one("#usd").value = "1.50"
        app.screen.query_one("#why").value = "short"
        await pilot.press("enter")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("y")
        await settle(pilot)
        assert "no invoice in_tuiTooMuch002 at Stripe" in app.said[-1]
        assert stripe.v1.invoice_items.list({"customer": stripe_id}).data == []
        assert screen.table.move_to(draft["id"])

        # credit (released, it is still a draft): the form checks the amount and the reason, then asks;
        # Stripe gets a negative invoice item on that draft
        await pilot.press("c")
        await dialog(pilot, CreditForm)
        form = app.screen
        form.query_one("#usd").value = "12.345"
        await pilot.click("#next")
        assert "two decimals" in str(form.query_one("#problem").render()) and app.screen is form
        form.query_one("#usd").value = "12.50"
        await pilot.press("enter")  # from the dollars to the reason
        await pilot.pause(0.2)
        assert app.focused is form.query_one("#why") and not str(form.query_one("#problem").render())
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert "Reason: required" in str(form.query_one("#problem").render()) and app.screen is form
        form.query_one("#why").value = "goodwill, ticket 4411"
        await pilot.press("enter")
        await dialog(pilot, ConfirmDialog)
        assert "Credit $12.50 on " + draft["id"] in str(app.screen.query_one(".question").render())
        await pilot.press("y")
        await settle(pilot)
        [item] = stripe.v1.invoice_items.list({"invoice": draft["id"]}).data
        assert (item.amount, item.description) == (-1250, "goodwill, ticket 4411")
        assert stripe.v1.invoices.retrieve(draft["id"]).total == draft["total"] - 1250
        assert app.said[-1] == f"Credit of $12.50 added to {draft['id']}."


@pytest.mark.proxy
async def test_readonly_hides_run_approve_and_credit_and_changes_nothing(reconciling, emulator):
    proxy, engine = reconciling
    stripe_id, subscription = subscribed(engine, emulator, "tui-ro")
    draft = held_draft(engine, emulator, "tui-ro", stripe_id, subscription)
    with api(proxy) as client:
        before = client.post("/reconciliation").json()["checked_at"]
    app = console(proxy.base_url, readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "4", ReconciliationScreen)
        await pilot.press("r")
        await settle(pilot)
        shown = {active.binding.description for active in screen.active_bindings.values()
                 if active.binding.show and active.enabled}
        assert "Filter" in shown and "Run now" not in shown
        screen = await open_screen(pilot, "5", InvoicesScreen)
        assert screen.table.move_to(draft["id"])
        for key in ("a", "c"):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen is screen, key
        shown = {active.binding.description for active in screen.active_bindings.values()
                 if active.binding.show and active.enabled}
        assert "Filter" in shown and not shown & {"Approve", "Credit"}
        commands = {command.title for command in app.get_system_commands(app.screen)}
        assert "Filter" in commands and not commands & {"Approve", "Credit", "Run now"}
    assert sum("read-only" in said for said in app.said) == 3
    with api(proxy) as client:
        assert client.get("/reconciliation").json()["checked_at"] == before
        [row] = [row for row in client.get("/invoices", params={"customer_id": "tui-ro"}).json()["invoices"]]
    assert row["held"] is True and emulator.client().v1.invoices.retrieve(draft["id"]).auto_advance is False


@pytest.mark.proxy
def test_the_snapshots_fixed_reconciliation_has_the_real_apis_fields(reconciling, emulator):
    """tests/support/console_api.py draws screen 4's pictures: it must answer what a proxy does (the
    invoices answer is checked in tests/test_tui.py, which needs no Stripe)."""
    proxy, engine = reconciling
    [row] = billed(engine, emulator, "tui-shape", [1_000_000])
    billed(engine, emulator, "tui-shape-nolink", [500_000], linked=False)
    emulator.forget_meter_event(row.id)
    with api(proxy) as client:
        real = client.post("/reconciliation").json()
    fixed = console_api.reconciliation()
    for answer in (real, fixed):  # a diverged customer first: its `hours` stand for every customer's
        answer["customers"].sort(key=lambda customer: customer["status"] != "diverged")
    assert real["customers"][0]["hours"] and _fields(fixed) == _fields(real)

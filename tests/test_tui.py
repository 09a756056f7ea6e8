"""The operator console under Pilot against the real proxy: what it shows is what the API says, and
every action's proof is what the API holds afterwards (DESIGN "Contract: operator console")."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from datetime import UTC, datetime, timedelta

import pytest
from textual.widgets import Input

from plugin.ledger import invoices, store
from plugin.outbox import store as outbox_store
from tests.support import console_api
from tests.support.proxy import MASTER_KEY
from tests.support.tcp_relay import TcpRelay
from tests.test_proxy_metering import ask, unique
from tui.app import MeterlineApp, make_app
from tui.client import ConsoleClient
from tui.screens.alerts import AlertsScreen
from tui.screens.confirm import ConfirmDialog
from tui.screens.customer import CustomerScreen
from tui.screens.customers import CustomersScreen
from tui.screens.help import HelpScreen
from tui.screens.limits import LimitsForm
from tui.screens.queue import QueueScreen
from tui.screens.trip import TripDialog

pytestmark = pytest.mark.proxy

SIZE = (120, 36)


def console(url: str, key: str = MASTER_KEY, **options) -> MeterlineApp:
    """The console as `meterline tui` makes it; `app.said` collects what it told the operator."""
    app = make_app(ConsoleClient(url, key, timeout=5), refresh_seconds=options.pop("refresh", 30),
                   operator="console:test", **options)
    app.said = []
    shown = app.notify

    def notify(message, **kwargs):
        app.said.append(str(message))
        return shown(message, **kwargs)

    app.notify = notify
    return app


async def settle(pilot) -> None:
    """Let the poll worker answer and the screen paint (bounded: a worker waiting on a dialog never ends)."""
    await pilot.pause()
    await asyncio.wait_for(pilot.app.workers.wait_for_complete(), timeout=30)
    await pilot.pause()


async def dialog(pilot, kind: type) -> None:
    """Wait (bounded) until a dialog of `kind` is on top: its worker waits for the answer, so
    `settle` would wait for ever."""
    for _ in range(100):
        await pilot.pause(0.05)
        if isinstance(pilot.app.screen, kind):
            return
    raise AssertionError(f"no {kind.__name__} on screen; {pilot.app.screen!r} is")


async def open_screen(pilot, key: str, kind: type):
    """Press a screen's key (1-5) and wait for its first data."""
    await settle(pilot)
    await pilot.press(key)
    await settle(pilot)
    assert isinstance(pilot.app.screen, kind)
    return pilot.app.screen


async def focus_customer(pilot, customer_id: str) -> CustomersScreen:
    """Filter the fleet down to one customer and put the cursor on it."""
    await settle(pilot)
    await pilot.press("slash")
    screen = pilot.app.screen
    screen.query_one("#filter", Input).value = customer_id
    await pilot.press("enter")
    await pilot.pause()
    assert [line.customer_id for line in screen.table.records] == [customer_id]
    return screen


@pytest.fixture
def customer(metered) -> str:
    tenant = metered.tenant(f"tui-{unique()}")
    tenant.client.chat.completions.create(model="test-model", messages=ask("[[p=2000 c=500]]"))
    return tenant.customer_id


async def test_the_customers_screen_shows_the_fleet_as_the_api_does(metered, customer):
    app = console(metered.proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        screen = await focus_customer(pilot, customer)
        [line] = screen.table.records
        answer = metered.api().get("/customers", params={"q": customer}).json()["customers"][0]
        same = [name for name in answer if name != "projected_ucr"]  # the projection moves with the clock
        assert {name: getattr(line, name) for name in same} == \
            {name: tuple(value) if isinstance(value, list) else value for name, value in answer.items() if name in same}
        assert line.used_ucr > 0 and line.plan == "pro" and not line.faulty
        assert customer in screen.status.summary or "1 of" in screen.status.summary
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, CustomerScreen) and app.screen.customer_id == customer
        await pilot.press("escape")
        assert isinstance(app.screen, CustomersScreen)


async def test_trip_and_reset_reach_the_api_with_the_reason(metered, customer):
    app = console(metered.proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        await focus_customer(pilot, customer)
        await pilot.press("t")
        await dialog(pilot, TripDialog)
        app.screen.query_one("#reason", Input).value = "runaway agent"
        await pilot.press("enter")  # the reason field's enter asks for confirmation, Cancel focused
        await dialog(pilot, ConfirmDialog)
        await pilot.press("enter")
        await settle(pilot)
        assert metered.api().get(f"/customers/{customer}/breaker").json()["status"] == "closed"
        await pilot.press("t")
        await dialog(pilot, TripDialog)
        app.screen.query_one("#reason", Input).value = "runaway agent"
        await pilot.press("enter")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("y")
        await settle(pilot)
        breaker = metered.api().get(f"/customers/{customer}/breaker").json()
        assert breaker["status"] == "open"
        assert (breaker["events"][0]["why"], breaker["events"][0]["by"]) == ("runaway agent", "api:console:test")
        await pilot.press("R")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("n")  # cancelled: nothing changes
        await settle(pilot)
        assert metered.api().get(f"/customers/{customer}/breaker").json()["status"] == "open"
        await pilot.press("R")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("y")
        await settle(pilot)
        assert metered.api().get(f"/customers/{customer}/breaker").json()["status"] == "closed"
        [line] = app.screen.table.records
        assert line.breaker == "closed"


async def test_the_limits_form_stores_what_it_says_and_shows_a_refusal(metered, customer):
    app = console(metered.proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        await focus_customer(pilot, customer)
        await pilot.press("l")
        await dialog(pilot, LimitsForm)
        form = app.screen
        assert isinstance(form, LimitsForm)
        form.query_one("#soft", Input).value = "80, 50"
        form.query_one("#credits", Input).value = "2500.5"
        await pilot.click("#block")
        await pilot.click("#save")
        await settle(pilot)
        stored = metered.api().get("/limits", headers={"X-Meterline-Customer": customer}).json()
        assert (stored["soft_thresholds_pct"], stored["hard_limit_ucr"], stored["block_overage"]) == \
            ([50, 80], 2_500_500_000, True)
        # the form cannot know the pro plan charges nothing for usage: the API's refusal is shown
        await pilot.press("l")
        await dialog(pilot, LimitsForm)
        app.screen.query_one("#credits", Input).value = ""
        app.screen.query_one("#usd", Input).value = "25"
        await pilot.click("#save")
        await settle(pilot)
        assert any("charges nothing for usage" in said for said in app.said)
        assert metered.api().get("/limits", headers={"X-Meterline-Customer": customer}).json()["hard_limit_ucr"] == \
            2_500_500_000
        # a value that can never be right stays in the form
        await pilot.press("l")
        await dialog(pilot, LimitsForm)
        app.screen.query_one("#soft", Input).value = "eighty"
        await pilot.click("#save")
        await pilot.pause()
        assert isinstance(app.screen, LimitsForm)
        assert "whole percentages" in str(app.screen.query_one("#problem").render())
        await pilot.press("escape")


async def test_the_global_overage_block_asks_and_says_how_many_it_affects(metered, customer):
    app = console(metered.proxy.base_url)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("B")
            await dialog(pilot, ConfirmDialog)
            assert "customer(s) past their included credits" in str(app.screen.query_one(".question").render())
            await pilot.press("y")
            await settle(pilot)
            assert metered.api().get("/overage-block").json() == {"enabled": True}
    finally:
        metered.api().put("/overage-block", json={"enabled": False})


async def test_a_readonly_console_changes_nothing_and_says_so(metered, customer):
    app = console(metered.proxy.base_url, readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await focus_customer(pilot, customer)
        for key in ("t", "R", "l", "B"):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, CustomersScreen), key
        assert sum("read-only" in said for said in app.said) == 4
        shown = {active.binding.description for active in app.screen.active_bindings.values()
                 if active.binding.show and active.enabled}
        assert "Pause refresh" in shown
        assert not shown & {"Trip breaker", "Reset breaker", "Edit limits", "Global overage block"}
    assert metered.api().get(f"/customers/{customer}/breaker").json()["status"] == "closed"


async def test_the_console_keeps_its_data_while_the_api_is_gone_and_recovers(metered, customer):
    relay = TcpRelay(metered.proxy.port)
    await relay.start()
    app = console(relay.url, refresh=0.5)
    try:
        async with app.run_test(size=SIZE) as pilot:
            screen = await focus_customer(pilot, customer)
            await relay.stop()
            for _ in range(40):  # bounded: the next polls fail within a few seconds
                await pilot.pause(0.1)
                if app.connection.stale:
                    break
            assert app.connection.stale and "cannot reach" in str(app.connection.error)
            assert [line.customer_id for line in screen.table.records] == [customer]  # the last data stays
            assert "showing the last data" in str(screen.status.render())
            await relay.start()
            for _ in range(60):
                await pilot.pause(0.1)
                if not app.connection.stale:
                    break
            assert not app.connection.stale
    finally:
        with contextlib.suppress(Exception):
            await relay.stop()


async def test_a_wrong_key_is_named_as_such(metered):
    app = console(metered.proxy.base_url, key="sk-wrong")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.connection.error is not None and app.connection.error.unauthorized
        assert any("master key" in said for said in app.said)
        assert "sk-wrong" not in str(app.screen.status.render())


async def test_alerts_are_acknowledged_and_new_ones_counted_until_followed(metered, customer):
    store.add_alert(metered.engine, "soft_limit", f"{customer} used 80%", customer_id=customer)
    app = console(metered.proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "2", AlertsScreen)
        await pilot.press("slash")
        screen.filter_input.value = customer
        await pilot.press("enter")
        [alert] = screen.table.records
        assert not alert.acknowledged
        await pilot.press("a")
        await settle(pilot)
        [stored] = metered.api().get("/alerts", params={"customer_id": customer}).json()["alerts"]
        assert stored["acknowledged"] is True and screen.table.records[0].acknowledged
        store.add_alert(metered.engine, "circuit_open", f"{customer} tripped", customer_id=customer)
        app.action_refresh_now()
        await settle(pilot)
        assert "+1 new" in screen.status.summary and screen.table.cursor_record.id == alert.id  # no jump
        await pilot.press("F")
        await settle(pilot)
        assert "following" in screen.status.summary and screen.table.cursor_record.kind == "circuit_open"


async def test_a_dead_event_is_requeued_from_the_queue_screen(metered, customer):
    [event] = metered.api().get("/outbox", params={"customer": customer}).json()["events"]
    outbox_store.record_sink_rejections(metered.engine, [(event["id"], "customer mapping invalid")],
                                        alert_kind="meter_error_report", alert_subject=f"test-{event['id']}",
                                        alert_message="one event rejected")
    app = console(metered.proxy.base_url)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_screen(pilot, "3", QueueScreen)
        await pilot.press("s")  # dead letters
        await settle(pilot)
        assert screen.table.move_to(event["id"])
        assert screen.table.cursor_record.last_error == "customer mapping invalid"
        assert "dead" in screen.status.summary
        await pilot.press("r")
        await dialog(pilot, ConfirmDialog)
        await pilot.press("y")
        await settle(pilot)
    assert all(event["status"] != "dead"
               for event in metered.api().get("/outbox", params={"customer": customer}).json()["events"])
    assert metered.api().get("/outbox", params={"customer": customer, "status": "dead"}).json()["events"] == []


@pytest.mark.parametrize("readonly", [False, True], ids=["operator", "readonly"])
async def test_help_and_the_palette_list_the_keys_readonly_hides_the_changes(metered, readonly):
    app = console(metered.proxy.base_url, readonly=readonly)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        listed = str(app.screen.query_one("#keys").render())
        assert "Filter" in listed and "Pause refresh" in listed
        assert ("Trip breaker" in listed) is not readonly and ("Global overage block" in listed) is not readonly
        await pilot.press("escape")
        await pilot.pause()
        commands = {command.title: command for command in app.get_system_commands(app.screen)}
        assert {"Filter", "Faults only", "Refresh now"} <= set(commands)
        assert ("Trip breaker" in commands) is not readonly
        await commands["Faults only"].callback()  # a palette entry runs the same action as its key
        assert app.screen.faults_only is True


def _fields(value, path: str = "") -> set[str]:
    """Every field name in a JSON answer, nested as `a.b` and `a[].b` (a list's first item stands for all)."""
    if isinstance(value, list):
        return _fields(value[0], path + "[]") if value else set()
    if not isinstance(value, dict):
        return set()
    found = set()
    for name, inner in value.items():
        found.add(f"{path}.{name}")
        if not name.startswith("by_"):  # by_model, by_action, by_member: data as keys, not fields
            found |= _fields(inner, f"{path}.{name}")
    return found


def test_the_snapshots_fixed_answers_have_the_real_apis_fields(metered, customer):
    """The snapshot pictures are drawn from tests/support/console_api.py: it must answer what a proxy does
    (the reconciliation, which needs Stripe, in tests/test_tui_stripe.py)."""
    api = metered.api()
    api.post(f"/customers/{customer}/breaker", json={"action": "trip", "reason": "shape check", "by": "test"})
    api.post(f"/customers/{customer}/breaker", json={"action": "reset", "reason": "shape check", "by": "test"})
    store.add_alert(metered.engine, "soft_limit", f"{customer} used 80%", customer_id=customer)
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    invoices.record(metered.engine, {  # as the webhook records a finalized invoice (no Stripe needed to list it)
        "id": f"in_shape_{customer}".replace("-", "_"), "customer_id": customer, "stripe_customer_id": "cus_shape",
        "status": "paid", "total_cents": 2_000, "currency": "usd", "period_start": month - timedelta(days=20),
        "period_end": month, "finalized_at": month + timedelta(hours=1), "held": False})
    real = {
        "fleet": api.get("/customers", params={"q": customer}).json(),
        "detail": api.get(f"/customers/{customer}").json(),
        "usage": api.get(f"/customers/{customer}/usage").json(),
        "limits": api.get("/limits", headers={"X-Meterline-Customer": customer}).json(),
        "alerts": api.get("/alerts", params={"customer_id": customer}).json(),
        "outbox": api.get("/outbox", params={"customer": customer}).json(),
        "invoices": api.get("/invoices", params={"customer_id": customer}).json(),
    }
    fixed = {"fleet": console_api.fleet(), "detail": console_api.detail("acme-corp"),
             "usage": console_api.usage("acme-corp"), "limits": console_api.limits("acme-corp"),
             "alerts": console_api.alerts(), "outbox": console_api.outbox(), "invoices": console_api.invoices()}
    for answer in real:
        assert _fields(real[answer]) and _fields(fixed[answer]) == _fields(real[answer]), answer


def test_the_console_ends_cleanly_when_its_terminal_goes_away(metered):
    """`meterline tui` in a real pseudo-terminal it controls (Textual draws on stderr); the terminal
    closes, so the kernel sends SIGHUP: the console ends by itself with status 0 (a crash inside
    Textual would make it 1, the default SIGHUP action a signal death)."""
    main, child = pty.openpty()
    termios.tcsetwinsize(child, (24, 80))
    env = os.environ | {"LITELLM_MASTER_KEY": MASTER_KEY, "TERM": "xterm-256color"}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from plugin.cli import main; sys.exit(main())", "tui", "--url",
         metered.proxy.base_url], stdin=child, stdout=child, stderr=child, env=env, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # the pty becomes its controlling terminal
    os.close(child)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"customers" not in seen and time.monotonic() < deadline:  # its first fleet is on screen
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                seen += os.read(main, 65536)
        assert b"customers" in seen, seen[-500:]
    finally:
        os.close(main)  # the terminal goes away
    try:
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()

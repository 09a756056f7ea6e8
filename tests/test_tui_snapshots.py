"""What the console looks like: every screen at 80×24, in the dark and the light theme, with a frozen
clock and fixed data (tests/support/console_api.py). The pictures live in tests/__snapshots__/; after a
deliberate change, look at them and accept with `pytest tests/test_tui_snapshots.py --snapshot-update`.
A failing run writes a side-by-side report (snapshot_report.html)."""

from __future__ import annotations

import pytest
from textual.widgets import Input

from tests.support.console_api import FixedApi
from tests.test_tui import dialog, settle
from tui.app import MeterlineApp, make_app
from tui.client import ConsoleClient
from tui.screens.customer import CustomerScreen
from tui.screens.limits import LimitsForm

THEMES = ("textual-dark", "textual-light")
FROZEN = 1_000.0


def fixed_console(api: FixedApi, theme: str) -> MeterlineApp:
    app = make_app(ConsoleClient("http://proxy.example:4000", "sk-test", transport=api.transport()),
                   refresh_seconds=30, operator="console:test", clock=lambda: FROZEN)
    app.theme = theme
    return app


def customers_refreshed(api: FixedApi):
    """The fleet twice: the second answer grew three customers, so their numbers carry ↑."""
    async def steps(pilot) -> None:
        await settle(pilot)
        api.refreshed()
        pilot.app.action_refresh_now()
        await settle(pilot)
    return steps


def one_customer(api: FixedApi):
    async def steps(pilot) -> None:
        await settle(pilot)
        await pilot.press("enter")  # the cursor starts on the heaviest spender
        await dialog(pilot, CustomerScreen)
        await settle(pilot)
    return steps


def screen_key(key: str):
    def make(api: FixedApi):
        async def steps(pilot) -> None:
            await settle(pilot)
            await pilot.press(key)
            await settle(pilot)
        return steps
    return make


def limits_form(api: FixedApi):
    """acme-corp's limits (second line: it has soft thresholds of its own), the cursor not blinking."""
    async def steps(pilot) -> None:
        await settle(pilot)
        await pilot.press("down", "l")
        await dialog(pilot, LimitsForm)
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False
        await pilot.pause()
    return steps


SCREENS = {
    "customers": customers_refreshed,
    "customer": one_customer,
    "alerts": screen_key("2"),
    "queue": screen_key("3"),
    "reconciliation": screen_key("4"),
    "invoices": screen_key("5"),
    "help": screen_key("question_mark"),
    "limits": limits_form,
}


@pytest.mark.parametrize("theme", THEMES)
@pytest.mark.parametrize("screen", SCREENS)
def test_each_screen_at_80x24(snap_compare, screen, theme):
    api = FixedApi()
    assert snap_compare(fixed_console(api, theme), terminal_size=(80, 24), run_before=SCREENS[screen](api))

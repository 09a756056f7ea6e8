"""The operator console (`meterline tui`): screens 1-5 as modes, the actions every screen shares
(trip, reset, limits, the global overage block) and the link to the proxy. The screens live in
tui/screens/, one per file; the keys in tui/keys.py; the styles in app.tcss."""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen

from tui import keys
from tui.client import ConsoleClient, ConsoleError
from tui.connection import Connection
from tui.heap import freeze_startup_objects
from tui.screens.alerts import AlertsScreen
from tui.screens.confirm import ConfirmDialog
from tui.screens.customers import CustomersScreen
from tui.screens.help import HelpScreen
from tui.screens.invoices import InvoicesScreen
from tui.screens.limits import LimitsForm
from tui.screens.queue import QueueScreen
from tui.screens.reconciliation import ReconciliationScreen
from tui.screens.trip import TripDialog

DEFAULT_REFRESH = 5.0
HANG_UPS = (signal.SIGHUP, signal.SIGTERM)
HANG_UP_GRACE = 5.0


class MeterlineApp(App):
    """`make_app` is the one factory the CLI and the tests use."""

    CSS_PATH = "app.tcss"
    TITLE = "meterline"
    BINDINGS = keys.bindings(keys.APP_KEYS)
    MODES = {"customers": CustomersScreen, "alerts": AlertsScreen, "queue": QueueScreen,
             "reconciliation": ReconciliationScreen, "invoices": InvoicesScreen}
    DEFAULT_MODE = "customers"

    def __init__(self, client: ConsoleClient, *, refresh_seconds: float = DEFAULT_REFRESH, readonly: bool = False,
                 operator: str | None = None, clock: Callable[[], float] = time.monotonic,
                 freeze_heap: bool = False) -> None:
        super().__init__()
        self.client = client
        self.clock = clock
        """Monotonic seconds for the data's age and the retry countdown (frozen in snapshot tests)."""
        self.freeze_heap = freeze_heap
        """Freeze what start-up built out of the garbage collector's passes once on screen (tui/heap.py);
        `meterline tui` does, tests (many apps in one process) do not."""
        self.connection = Connection()
        self.refresh_seconds = refresh_seconds
        self.readonly = readonly
        self.paused = False
        self.fleet_lines: list = []
        """The customers screen's last lines (the overage block says how many it affects)."""
        self.operator = operator or _operator()
        self.sub_title = client.url + (" · read-only" if readonly else "")

    def on_mount(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._before_hang_ups = {number: signal.signal(number, self._hang_up) for number in HANG_UPS}

    def _hang_up(self, signal_number: int, frame: object) -> None:
        """The terminal went away (SIGHUP) or a polite kill (SIGTERM): leave as `q` does.

        A plain signal handler, not the event loop's: it runs even while the loop is blocked, which a
        gone terminal can cause (Textual's output thread dies on the first write that fails, and the
        app then waits on its full queue for good). So a watchdog also ends the process if the orderly
        exit has not within HANG_UP_GRACE seconds; there is nothing of the console's to save."""
        watchdog = threading.Timer(HANG_UP_GRACE, os._exit, (0,))
        watchdog.daemon = True
        watchdog.start()
        self._event_loop.call_soon_threadsafe(self.exit)

    def on_ready(self) -> None:
        if self.freeze_heap:
            freeze_startup_objects()

    async def on_unmount(self) -> None:
        for number, handler in self._before_hang_ups.items():
            signal.signal(number, handler)
        await self.client.aclose()

    # ------------------------------------------------------------------ keys every screen has

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return keys.allowed(action, readonly=self.readonly)

    def action_readonly_notice(self) -> None:
        self.readonly_notice()

    def readonly_notice(self) -> None:
        self.notify("This console is read-only (--readonly): nothing can be changed from it.", severity="warning")

    def action_show(self, mode: str) -> None:
        """Keys 1-5: Customers, Alerts, Queue, Reconciliation, Invoices."""
        self.switch_mode(mode)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.notify("Refresh paused: p resumes." if self.paused else "Refresh resumed.")
        if not self.paused:
            self.action_refresh_now()

    def action_refresh_now(self) -> None:
        screen = self.screen
        if hasattr(screen, "poll_now"):
            screen.poll_now()

    def action_help(self) -> None:
        screen_keys = getattr(type(self.screen), "HELP_KEYS", ())
        self.push_screen(HelpScreen(self.screen.__class__.__name__.removesuffix("Screen"),
                                    keys.visible((*screen_keys, *keys.APP_KEYS), readonly=self.readonly)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette lists every key's action too (keys.py), but what --readonly hides."""
        yield from super().get_system_commands(screen)
        screen_keys = getattr(type(screen), "HELP_KEYS", ())
        for key in keys.visible((*screen_keys, *keys.APP_KEYS), readonly=self.readonly):
            target = self if key in keys.APP_KEYS else screen
            yield SystemCommand(key.description, f"{key.description} (key {keys.shown(key.key)})",
                                partial(self.run_action, key.action, target))

    # ------------------------------------------------------------------ actions on a customer

    @work(group="action", exit_on_error=False)
    async def trip(self, customer_id: str) -> None:
        reason = await self.push_screen_wait(TripDialog(customer_id))
        if reason is None:
            return
        question = f"Trip {customer_id}'s circuit breaker? Its requests are refused until reset.\nReason: {reason}"
        if await self.push_screen_wait(ConfirmDialog(question, confirm="Trip breaker")):
            await self._change(f"Breaker of {customer_id} tripped.",
                               self.client.move_breaker(customer_id, "trip", reason, self.operator))

    @work(group="action", exit_on_error=False)
    async def reset(self, customer_id: str) -> None:
        if await self.push_screen_wait(ConfirmDialog(f"Reset {customer_id}'s circuit breaker? Its requests are "
                                                     "admitted again.", confirm="Reset breaker")):
            await self._change(f"Breaker of {customer_id} reset.",
                               self.client.move_breaker(customer_id, "reset", "reset from the console", self.operator))

    @work(group="action", exit_on_error=False)
    async def edit_limits(self, customer_id: str) -> None:
        try:
            current = await self.client.limits(customer_id)
        except ConsoleError as error:
            self.notify(str(error), severity="error")
            return
        changes = await self.push_screen_wait(LimitsForm(current))
        if changes:
            await self._change(f"Limits of {customer_id} saved.", self.client.set_limits(customer_id, changes))

    @work(group="action", exit_on_error=False)
    async def action_overage_block(self) -> None:
        try:
            enabled = await self.client.overage_block()
        except ConsoleError as error:
            self.notify(str(error), severity="error")
            return
        if enabled:
            question = "Lift the global overage block? Every customer may be billed past its included credits again."
        else:
            over = sum(1 for line in self.fleet_lines if line.over_quota and not line.block_overage)
            question = (f"Block overage for every customer? {over:,} customer(s) past their included credits "
                        "would be refused at once; the others when they reach theirs.")
        if await self.push_screen_wait(ConfirmDialog(question, confirm="Lift block" if enabled else "Block overage")):
            await self._change("Global overage block " + ("lifted." if enabled else "on."),
                               self.client.set_overage_block(not enabled))

    async def _change(self, done: str, call) -> None:
        """Run a change; say what happened (or the API's refusal); refresh what is shown."""
        try:
            await call
        except ConsoleError as error:
            self.notify(str(error), title="Refused", severity="error", timeout=8)
            return
        self.notify(done)
        self.action_refresh_now()


def _operator() -> str:
    """Who the audit log names for the console's moves."""
    try:
        return f"console:{getpass.getuser()}"
    except (KeyError, OSError):
        return "console"


def make_app(client: ConsoleClient, **options) -> MeterlineApp:
    return MeterlineApp(client, **options)

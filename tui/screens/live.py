"""A screen that shows one piece of the API and keeps it fresh: one poll worker at a time
(exclusive), re-armed after each answer so polls never overlap; no poll while the screen is hidden,
a dialog covers it or refresh is paused; on failure the last data stays, the status line says so
and the next try backs off (plugin of the app's `Connection`)."""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Input
from textual.worker import Worker, WorkerState

from tui import keys
from tui.client import ConsoleError
from tui.widgets.record_table import RecordTable
from tui.widgets.status_line import StatusLine


class LiveScreen(Screen):
    _timer: Timer | None = None

    async def fetch(self) -> Any:
        """Read this screen's data from the API (in the poll worker)."""
        raise NotImplementedError

    def paint(self, data: Any) -> None:
        """Show fresh data (on the UI thread)."""
        raise NotImplementedError

    @property
    def status(self) -> StatusLine:
        return self.query_one(StatusLine)

    def on_mount(self) -> None:
        self.poll_now()

    def on_screen_resume(self) -> None:
        self.poll_now()

    def poll_now(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._poll()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return keys.allowed(action, readonly=self.app.readonly)

    def action_readonly_notice(self) -> None:
        self.app.readonly_notice()

    @work(exclusive=True, group="poll", exit_on_error=False)
    async def _poll(self) -> None:
        app = self.app
        if app.paused or not self.is_current:  # hidden, or a dialog is open: nothing to paint
            self._arm(app.refresh_seconds)
            return
        try:
            data = await self.fetch()
        except ConsoleError as error:
            first = not app.connection.stale or app.connection.error.status != error.status
            wait = app.connection.failed(error, app.clock())
            if first:
                app.notify(str(error), title="meterline", severity="error", timeout=6)
            self.status.redraw()
            self._arm(wait)
            return
        app.connection.succeeded(app.clock())
        self.paint(data)
        self.status.redraw()
        self._arm(app.refresh_seconds)

    def _arm(self, seconds: float) -> None:
        self._timer = self.set_timer(seconds, self._poll)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A fault of the console itself (not of the API): said once, and polling goes on."""
        if event.worker.group == "poll" and event.state is WorkerState.ERROR:
            self.app.notify(f"The console failed to refresh: {event.worker.error!r}", severity="error")
            self._arm(self.app.refresh_seconds)


class FilteredScreen(LiveScreen):
    """A live screen of one RecordTable with a filter field (`#filter`) over it: `/` opens the field,
    typing filters (`_show`), `enter` goes to the table, `escape` clears and hides the field."""

    BINDINGS = [("escape", "clear_filter", "")]

    def _show(self) -> None:
        """Filter the screen's records again and show them."""
        raise NotImplementedError

    @property
    def table(self) -> RecordTable:
        return self.query_one(RecordTable)

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    def action_filter(self) -> None:
        self.filter_input.display = True
        self.filter_input.focus()

    def action_clear_filter(self) -> None:
        self.filter_input.value = ""
        self.filter_input.display = False
        self.table.focus()

    @on(Input.Changed, "#filter")
    def filtered(self) -> None:
        self._show()

    @on(Input.Submitted, "#filter")
    def to_table(self) -> None:
        self.table.focus()

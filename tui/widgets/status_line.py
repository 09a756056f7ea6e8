"""The line above every screen's table: the link to the proxy, the data's age, paused or not.
Redrawn every second (the age moves) from the app's `Connection`."""

from __future__ import annotations

from textual.widgets import Static


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; padding: 0 1; background: $boost; }
    StatusLine.-stale { background: $error 30%; color: $text; }
    """

    def __init__(self, summary: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)  # error texts and customer ids are shown as they are
        self.summary = summary
        self._shown: str | None = None
        """What the screen adds on the right (e.g. "10,000 customers · 3 faults")."""

    def on_mount(self) -> None:
        self.set_interval(1.0, self.redraw)
        self.redraw()

    def redraw(self) -> None:
        app = self.app
        connection = app.connection
        line = connection.describe(app.clock(), paused=app.paused, refresh=app.refresh_seconds)
        self.set_class(connection.stale, "-stale")
        text = f"{line}   {self.summary}" if self.summary else line
        if text != self._shown:  # most ticks change nothing; a redraw is a render of the line (not a layout: height 1)
            self._shown = text
            self.update(text, layout=False)

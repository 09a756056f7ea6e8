"""The operator console. The screens (burn, breakers, limits, alerts, queue) arrive with later issues."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, Static


class MeterlineApp(App):
    """Shell of the console; `make_app` is the one factory the CLI and tests use."""

    CSS_PATH = "app.tcss"
    TITLE = "meterline"
    BINDINGS = [("q", "quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("meterline operator console: screens arrive with the plans and delivery issues.", id="placeholder")
        yield Footer()


def make_app() -> MeterlineApp:
    return MeterlineApp()

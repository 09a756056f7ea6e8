"""`?`: every key of the screen underneath and of the app, from the one table in tui/keys.py."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.keys import Key, shown


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, title: str, keys: tuple[Key, ...]) -> None:
        super().__init__()
        self.title_text = title
        self.keys = keys

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"{shown(key.key):>8}  {key.description}" for key in self.keys)
        with Vertical(classes="dialog"):
            yield Label(f"Keys: {self.title_text}", classes="question")
            yield Static(lines, id="keys")
            yield Label("escape closes · readonly consoles do not list what changes state")

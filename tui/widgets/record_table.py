"""A table of thousands of records that draws only the lines on screen (Textual's Line API).

Textual's DataTable measures every cell it is given on the UI thread: 10,000 customers × 12 columns
freeze it for seconds, and its row removal is O(n). Here the records stay plain Python objects; a
refresh hands over the new list (`show`), which is sorted once, and only the visible lines are
rendered, each from its record. The cursor follows its record's key across refreshes and sorts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

R = TypeVar("R")


@dataclass(frozen=True)
class Column(Generic[R]):
    """One column: what its cells show and what it sorts by."""

    key: str
    label: str
    width: int
    cell: Callable[[R], str | Text]
    sort_key: Callable[[R], Any]
    align_right: bool = True


class RecordTable(ScrollView, Generic[R], can_focus=True):
    """Records as lines under a fixed header line; `enter` selects, a click on the header sorts."""

    DEFAULT_CSS = """
    RecordTable { height: 1fr; }
    RecordTable > .record-table--header { text-style: bold; background: $panel; }
    RecordTable > .record-table--cursor { background: $accent 40%; }
    RecordTable:focus > .record-table--cursor { background: $accent; color: $text; }
    RecordTable > .record-table--fault { color: $error; }
    """
    COMPONENT_CLASSES = {"record-table--header", "record-table--cursor", "record-table--fault"}
    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "move(-1_000_000_000)", "First", show=False),
        Binding("end", "move(1_000_000_000)", "Last", show=False),
        Binding("enter", "select", "Open", show=False),
    ]

    class Selected(Message):
        """`enter` (or a double click) on a record."""

        def __init__(self, table: RecordTable, record: Any) -> None:
            super().__init__()
            self.table = table
            self.record = record

        @property
        def control(self) -> RecordTable:
            return self.table

    def __init__(self, columns: Sequence[Column[R]], key_of: Callable[[R], str], *,
                 fault: Callable[[R], bool] = lambda record: False, sort: str | None = None,
                 descending: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = list(columns)
        self._key_of = key_of
        self._fault = fault
        self._records: list[R] = []
        self._shown: list[R] = []
        self.cursor = 0
        self.sort_column = sort
        self.descending = descending
        self._width = sum(column.width + 1 for column in self.columns)

    # ------------------------------------------------------------------ data

    @property
    def records(self) -> list[R]:
        """What the table shows, in its order."""
        return self._shown

    @property
    def cursor_record(self) -> R | None:
        return self._shown[self.cursor] if 0 <= self.cursor < len(self._shown) else None

    def show(self, records: Sequence[R]) -> None:
        """Show these records (already filtered), sorted as the table is; the cursor stays on its record."""
        keep = self.cursor_record
        self._records = list(records)
        self._order()
        if keep is not None:
            self.move_to(self._key_of(keep))
        self.cursor = min(self.cursor, max(0, len(self._shown) - 1))
        self.virtual_size = Size(self._width, len(self._shown) + 1)
        self._follow()
        self.refresh()

    def sort_by(self, key: str) -> None:
        """Sort by a column; the same column again flips the direction."""
        keep = self.cursor_record
        self.descending = not self.descending if key == self.sort_column else True
        self.sort_column = key
        self._order()
        if keep is not None:
            self.move_to(self._key_of(keep))
        self.refresh()

    def move_to(self, key: str) -> bool:
        """Put the cursor on the record with this key, if it is shown."""
        for index, record in enumerate(self._shown):
            if self._key_of(record) == key:
                self.cursor = index
                self._follow()
                return True
        return False

    def _order(self) -> None:
        column = next((column for column in self.columns if column.key == self.sort_column), None)
        if column is None:
            self._shown = self._records
            return
        key = column.sort_key
        # None sorts last either way: (is None, value)
        present = [record for record in self._records if key(record) is not None]
        absent = [record for record in self._records if key(record) is None]
        self._shown = sorted(present, key=key, reverse=self.descending) + absent

    # ------------------------------------------------------------------ keys and mouse

    def action_move(self, rows: int) -> None:
        if self._shown:
            self.cursor = max(0, min(len(self._shown) - 1, self.cursor + rows))
            self._follow()
            self.refresh()

    def action_page(self, pages: int) -> None:
        self.action_move(pages * max(1, self.size.height - 2))

    def action_select(self) -> None:
        if (record := self.cursor_record) is not None:
            self.post_message(self.Selected(self, record))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x = event.x + self.scroll_offset.x
            for column in self.columns:
                if x < column.width + 1:
                    self.sort_by(column.key)
                    return
                x -= column.width + 1
            return
        index = self.scroll_offset.y + event.y - 1
        if 0 <= index < len(self._shown):
            self.cursor = index
            self.refresh()
            if event.chain == 2:
                self.action_select()

    def _follow(self) -> None:
        """Scroll so that the cursor's line is on screen (below the header)."""
        visible = max(1, self.size.height - 1)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    # ------------------------------------------------------------------ drawing

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        base = self.rich_style
        if y == 0:
            line = self._header()
            style = base + self.get_component_rich_style("record-table--header")
        else:
            index = scroll_y + y - 1
            if index >= len(self._shown):
                return Strip.blank(width, base)
            record = self._shown[index]
            line = self._line(record)
            style = base
            if self._fault(record):
                style += self.get_component_rich_style("record-table--fault")
            if index == self.cursor:
                style += self.get_component_rich_style("record-table--cursor")
        line.style = style  # under the cells' own colours
        return Strip(list(line.render(self.app.console)), line.cell_len).crop_extend(scroll_x, scroll_x + width, style)

    def _header(self) -> Text:
        text = Text()
        for column in self.columns:
            label = column.label
            if column.key == self.sort_column:
                label += " ▼" if self.descending else " ▲"
            text.append(_fit(label, column.width, column.align_right) + " ")
        return text

    def _line(self, record: R) -> Text:
        text = Text()
        for column in self.columns:
            value = column.cell(record)
            if isinstance(value, Text):
                plain = _fit(value.plain, column.width, column.align_right)
                cell = Text(plain, style=value.style)
                for span in value.spans:
                    offset = len(plain) - len(value.plain) if column.align_right else 0
                    cell.stylize(span.style, span.start + offset, span.end + offset)
                text.append_text(cell)
                text.append(" ")
            else:
                text.append(_fit(value, column.width, column.align_right) + " ")
        return text


def _fit(value: str, width: int, right: bool) -> str:
    """`value` in exactly `width` cells: cut with an ellipsis, padded on the left (numbers) or the right."""
    if len(value) > width:
        value = value[: max(0, width - 1)] + "…"
    return value.rjust(width) if right else value.ljust(width)


"""A table of thousands of records that draws only the lines on screen (Textual's Line API).

Textual's DataTable measures every cell it is given on the UI thread: 10,000 customers × 12 columns
freeze it for seconds, and its row removal is O(n). Here the records stay plain Python objects; a
refresh hands over the new list (`show`), which is sorted once, and only the visible lines are
rendered, each from its record. The cursor follows its record's key across refreshes and sorts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Generic, TypeVar

from rich.segment import Segment
from rich.style import Style
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
    cell: Callable[[R], str]
    sort_key: Callable[[R], Any]
    align_right: bool = True
    mark: Callable[[R], int] | None = None
    """+1 / -1 draws ↑ / ↓ after the value (it moved since the last refresh); 0 a space."""


class RecordTable(ScrollView, Generic[R], can_focus=True):
    """Records as lines under a fixed header line; `enter` selects, a click on the header sorts."""

    DEFAULT_CSS = """
    RecordTable { height: 1fr; scrollbar-size-vertical: 1; }
    RecordTable > .record-table--header { text-style: bold; background: $panel; }
    RecordTable > .record-table--cursor { background: $accent 40%; }
    RecordTable:focus > .record-table--cursor { background: $accent; color: $text; }
    RecordTable > .record-table--fault { color: $error; }
    RecordTable > .record-table--up { color: $success; }
    RecordTable > .record-table--down { color: $warning; }
    """
    COMPONENT_CLASSES = {"record-table--header", "record-table--cursor", "record-table--fault", "record-table--up",
                         "record-table--down"}
    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "move(-1_000_000_000)", "First", show=False),
        Binding("end", "move(1_000_000_000)", "Last", show=False),
        Binding("enter", "select", "Open", show=False),
    ]

    class _About(Message):
        """A message about one record of the table."""

        def __init__(self, table: RecordTable, record: Any) -> None:
            super().__init__()
            self.table = table
            self.record = record

        @property
        def control(self) -> RecordTable:
            return self.table

    class Highlighted(_About):
        """The cursor is on another record (or on none: `record` is None)."""

    class Selected(_About):
        """`enter` (or a double click) on a record."""

    def __init__(self, columns: Sequence[Column[R]], key_of: Callable[[R], str], *,
                 fault: Callable[[R], bool] = lambda record: False, sort: str | None = None,
                 descending: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = list(columns)
        self._key_of = key_of
        self._fault = fault
        self._records: list[R] = []
        self._shown: list[R] = []
        self._cursor = 0
        self._highlighted: str | None = None
        self.sort_column = sort
        self.descending = descending
        self._width = sum(column.width + 1 for column in self.columns) - 1
        self._looks: _Look | None = None
        self._looks_for: tuple[bool, str] | None = None

    # ------------------------------------------------------------------ data

    @property
    def records(self) -> list[R]:
        """What the table shows, in its order."""
        return self._shown

    @property
    def cursor_record(self) -> R | None:
        return self._shown[self._cursor] if 0 <= self._cursor < len(self._shown) else None

    @property
    def cursor(self) -> int:
        return self._cursor

    @cursor.setter
    def cursor(self, index: int) -> None:
        self._cursor = index
        self._tell_highlighted()

    def _tell_highlighted(self) -> None:
        """Post `Highlighted` when the record under the cursor is another one than last said."""
        record = self.cursor_record
        key = None if record is None else self._key_of(record)
        if key != self._highlighted:
            self._highlighted = key
            self.post_message(self.Highlighted(self, record))

    def show(self, records: list[R], *, in_order: bool = False, positions: Mapping[str, int] | None = None) -> None:
        """Show these records (already filtered; the table keeps the list), sorted as the table is, or as
        given with `in_order` (sorted by `ordered` off the UI thread, which may also give each key's
        position); the cursor stays on its record."""
        keep = self.cursor_record
        self._records = records
        if in_order:
            self._shown = records
        else:
            self._order()
        if keep is not None:
            key = self._key_of(keep)
            if positions is None:
                self.move_to(key)
            elif key in positions:
                self.cursor = positions[key]
        self.cursor = min(self.cursor, max(0, len(self._shown) - 1))  # also tells a new record under it
        size = Size(self._width, len(self._shown) + 1)
        if size != self.virtual_size:  # a new size lays the screen out again: only when it changed
            self.virtual_size = size
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
        self._tell_highlighted()
        self.refresh()

    def move_to(self, key: str) -> bool:
        """Put the cursor on the record with this key, if it is shown."""
        key_of = self._key_of
        found = next((index for index, record in enumerate(self._shown) if key_of(record) == key), None)
        if found is None:
            return False
        self.cursor = found
        self._follow()
        return True

    def _order(self) -> None:
        self._shown = ordered(self._records, self.columns, self.sort_column, self.descending)

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
        look = self._look()
        if y == 0:
            style = look.header
            segments = [Segment(self._header(), style)]
        else:
            index = scroll_y + y - 1
            if index >= len(self._shown):
                return Strip.blank(width, look.base)
            record = self._shown[index]
            fault = self._fault(record)
            if index == self.cursor:
                style = look.fault_cursor if fault else look.cursor
            else:
                style = look.fault if fault else look.base
            segments = self._line(record, style, look)
        return Strip(segments, self._width).crop_extend(scroll_x, scroll_x + width, style)

    def _look(self) -> _Look:
        """The line styles, worked out once per focus and theme rather than ~10 times a line: Textual's
        `rich_style` walks the widget's ancestors each time (a third of a refresh's drawing)."""
        key = (self.has_focus, self.app.theme)
        if self._looks_for != key or self._looks is None:
            base = self.rich_style
            fault = base + self.get_component_rich_style("record-table--fault")
            cursor = self.get_component_rich_style("record-table--cursor")
            self._looks = _Look(base, base + self.get_component_rich_style("record-table--header"), fault,
                                base + cursor, fault + cursor,
                                Style(color=self.get_component_rich_style("record-table--up").color),
                                Style(color=self.get_component_rich_style("record-table--down").color))
            self._looks_for = key
        return self._looks

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._looks = None

    def _header(self) -> str:
        labels = []
        for column in self.columns:
            label = column.label
            if column.key == self.sort_column:  # the arrow always shows; the label gives way
                label = _fit(label, column.width - 2, False).rstrip() + (" ▼" if self.descending else " ▲")
            labels.append(_fit(label, column.width, column.align_right))
        return " ".join(labels)

    def _line(self, record: R, style: Style, look: _Look) -> list[Segment]:
        """Plain segments, one per cell (and per marker): no rich Text per cell, which cost most of a redraw."""
        segments = []
        # the markers' colour only: the line's own background (cursor, fault) stays under them
        up, down = style + look.up, style + look.down
        gap = Segment(" ", style)
        for column in self.columns:
            if segments:
                segments.append(gap)
            if column.mark is None:
                segments.append(Segment(_fit(column.cell(record), column.width, column.align_right), style))
                continue
            segments.append(Segment(_fit(column.cell(record), column.width - 1, column.align_right), style))
            moved = column.mark(record)
            segments.append(Segment(("↑" if moved > 0 else "↓") if moved else " ", up if moved > 0 else down))
        return segments


@dataclass(frozen=True)
class _Look:
    """A table's line styles for one focus state and theme."""

    base: Style
    header: Style
    fault: Style
    cursor: Style
    fault_cursor: Style
    up: Style
    """Colour only: laid over the line's style."""
    down: Style


def ordered(records: Sequence[R], columns: Sequence[Column[R]], sort_column: str | None,
            descending: bool) -> list[R]:
    """`records` as a table sorted by `sort_column` shows them: records without a value (None) last
    either way, ties in their given order. Pure, so a poll worker can sort off the UI thread."""
    column = next((column for column in columns if column.key == sort_column), None)
    if column is None:
        return list(records)
    key = column.sort_key
    keyed = [(value, record) for record in records if (value := key(record)) is not None]
    keyed.sort(key=itemgetter(0), reverse=descending)  # stable: ties keep their order
    shown = [record for _, record in keyed]
    if len(keyed) < len(records):
        shown += [record for record in records if key(record) is None]
    return shown


def _fit(value: str, width: int, right: bool) -> str:
    """`value` in exactly `width` cells: cut with an ellipsis, padded on the left (numbers) or the right."""
    if len(value) > width:
        value = value[: max(0, width - 1)] + "…"
    return value.rjust(width) if right else value.ljust(width)


"""A customer's credits per day this period as bars, with the included credits spread per day as a
line (what the usage page draws, in text): days above the line burn faster than the plan allows."""

from __future__ import annotations

from fractions import Fraction

from rich.text import Text
from textual.widgets import Static

from tui import format as fmt

EIGHTHS = " ▁▂▃▄▅▆▇█"


def chart(daily: list[int], included_per_day: Fraction, height: int = 8) -> Text:
    """`height` lines of bars, one column per day (two cells wide), the included line as ┄."""
    top = max([*daily, included_per_day, 1]) * Fraction(11, 10)
    line_row = None if included_per_day <= 0 else int(included_per_day / top * height)
    text = Text()
    for row in range(height - 1, -1, -1):
        for used in daily:
            fill = Fraction(used) / top * height - row  # how much of this cell the bar fills, 0..1
            cell = EIGHTHS[max(0, min(8, int(fill * 8)))]
            if cell == " " and row == line_row:
                text.append("┄┄", style="yellow")
            else:
                text.append(cell * 2, style="red" if used > included_per_day > 0 else "cyan")
        text.append("\n")
    text.append(f"max {fmt.credits(int(max(daily, default=0)))} credits/day · ┄ included per day "
                f"{fmt.credits(int(included_per_day))}", style="dim")
    return text


class DailyChart(Static):
    DEFAULT_CSS = "DailyChart { height: auto; padding: 0 1; }"

    def show(self, daily: list[int], included_per_day: Fraction) -> None:
        self.update(chart(daily, included_per_day) if daily else Text("no usage this period", style="dim"))

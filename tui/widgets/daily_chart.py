"""A customer's credits per day this period as bars, with the included credits spread per day as a
line (what the usage page draws, in text): days above the line burn faster than the plan allows.
The whole period is drawn, days still to come empty, so the chart says how far into it we are."""

from __future__ import annotations

from fractions import Fraction

from rich.text import Text
from textual.widgets import Static

from tui import format as fmt

EIGHTHS = " ▁▂▃▄▅▆▇█"
WIDE_ENOUGH = 76
"""Cells the bars may take: two per day while the period fits (a month does), else one."""


def chart(daily: list[int], included_per_day: Fraction, days: int, height: int = 6) -> Text:
    """`height` lines of bars for `days` days (`daily` the ones so far), the included line as ┄."""
    days = max(days, len(daily))
    cells = 2 if 2 * days <= WIDE_ENOUGH else 1
    top = max([*daily, included_per_day, 1]) * Fraction(11, 10)
    line_row = None if included_per_day <= 0 else min(height - 1, int(included_per_day / top * height))
    text = Text()
    for row in range(height - 1, -1, -1):
        for day in range(days):
            used = daily[day] if day < len(daily) else 0
            fill = Fraction(used) / top * height - row  # how much of this cell the bar fills, 0..1
            cell = EIGHTHS[max(0, min(8, int(fill * 8)))]
            if cell == " " and row == line_row:
                text.append("┄" * cells, style="yellow")
            else:
                text.append(cell * cells, style="red" if used > included_per_day > 0 else "cyan")
        text.append("\n")
    text.append(f"day {len(daily)} of {days} · max {fmt.credits(int(max(daily, default=0)))} credits/day · "
                f"┄ included per day {fmt.credits(int(included_per_day))}", style="dim")
    return text


class DailyChart(Static):
    DEFAULT_CSS = "DailyChart { height: auto; padding: 0 1; }"

    def show(self, daily: list[int], included_per_day: Fraction, days: int) -> None:
        self.update(chart(daily, included_per_day, days) if daily else Text("no usage this period", style="dim"))

"""One customer (`enter` on the customers screen): its figures, the period's daily chart with the
included line, top actions, members, limits, the breaker's history (who and why) and the last
ledger rows, from `GET /customers/{id}` and its usage report; `escape` goes back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from fractions import Fraction

from rich import box
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Header, Static

from tui import format as fmt
from tui import keys
from tui.client import CustomerDetail, Limits, UsageReport
from tui.screens.live import LiveScreen
from tui.widgets.daily_chart import DailyChart
from tui.widgets.status_line import StatusLine

DETAIL_KEYS = tuple(key for key in keys.CUSTOMER_KEYS if key.action in ("trip", "reset", "limits"))


@dataclass(frozen=True)
class Detail:
    customer: CustomerDetail
    usage: UsageReport
    limits: Limits


class CustomerScreen(LiveScreen):
    HELP_KEYS = DETAIL_KEYS
    BINDINGS = [Binding("escape", "back", "Back"), *keys.bindings(DETAIL_KEYS)]

    def __init__(self, customer_id: str) -> None:
        super().__init__()
        self.customer_id = customer_id

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine(self.customer_id)
        with VerticalScroll(id="detail"):
            yield Static(id="figures")
            yield DailyChart(id="chart")
            yield Static(id="tables")
        yield Footer()

    async def fetch(self) -> Detail:
        client = self.app.client
        customer, usage, limits = await asyncio.gather(client.customer(self.customer_id),
                                                       client.usage(self.customer_id), client.limits(self.customer_id))
        return Detail(customer, usage, limits)

    def paint(self, detail: Detail) -> None:
        row, usage, limits = detail.customer, detail.usage, detail.limits
        self.query_one("#figures", Static).update(
            f"[b]{row.customer_id}[/b] · plan {row.plan}{_grandfathered(row)} · breaker [b]{row.breaker}[/b]\n"
            f"this period {fmt.credits(row.used_ucr)} of {fmt.credits(row.included_ucr)} included "
            f"({fmt.percent(row.included_pct)}) · projected {fmt.credits(row.projected_ucr)} · "
            f"today {fmt.credits(row.today_ucr)} · this hour {fmt.credits(row.hour_ucr)} "
            f"(typical {fmt.credits(row.typical_hour_ucr)}, burn {fmt.ratio(row.burn_ratio)})\n"
            f"limits: soft {', '.join(f'{pct}%' for pct in limits.effective_soft_thresholds_pct) or fmt.NOTHING} · "
            f"hard {_hard(limits)} · overage {'blocked' if row.block_overage else 'allowed'} · "
            f"cap {fmt.credits(row.cap_ucr)} · open alerts {row.alerts_open}")
        period_seconds = (usage.period_end - usage.period_start).total_seconds()
        per_day = Fraction(usage.included_ucr * 86_400, max(1, int(period_seconds)))
        days = -(-int(period_seconds) // 86_400)
        self.query_one("#chart", DailyChart).show([day.used_ucr for day in usage.daily], per_day, days)
        self.query_one("#tables", Static).update(_tables(detail))

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_trip(self) -> None:
        self.app.trip(self.customer_id)

    def action_reset(self) -> None:
        self.app.reset(self.customer_id)

    def action_limits(self) -> None:
        self.app.edit_limits(self.customer_id)


def _grandfathered(row: CustomerDetail) -> str:
    """Kept on its flat plan for good: said next to the plan, with the date."""
    return "" if row.grandfathered_at is None else f" (grandfathered since {row.grandfathered_at[:10]})"


def _hard(limits: Limits) -> str:
    if limits.hard_limit_usd is not None:
        return f"${limits.hard_limit_usd}"
    return fmt.NOTHING if limits.hard_limit_ucr is None else f"{fmt.credits(limits.hard_limit_ucr)} credits"


def _table(title: str, *headers: str) -> Table:
    """A compact table: a rule under the headers, no boxes (room for rows at 80×24)."""
    return Table(*headers, title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 pad_edge=False, show_edge=False)


def _tables(detail: Detail) -> Table:
    """Top actions and members side by side, then the breaker's history and the last ledger rows."""
    grid = Table.grid(padding=(0, 2))
    actions = _table("Top actions", "action", "credits", "share")
    for action in detail.usage.top_actions:
        actions.add_row(action.action, fmt.credits(action.used_ucr), fmt.percent(action.share_pct))
    members = _table("Members", "member", "credits", "calls")
    for member in detail.customer.members[:10]:
        members.add_row(member.member, fmt.credits(member.used_ucr), f"{member.requests:,}")
    grid.add_row(actions, members)
    history = _table("Breaker history", "when", "move", "by", "why")
    for move in detail.customer.breaker_history[:10]:
        history.add_row(f"{move.at:%Y-%m-%d %H:%M}", f"{move.before} → {move.after}", move.by, move.why)
    recent = _table("Last ledger rows", "when", "model", "action", "credits")
    for entry in detail.customer.recent[:15]:
        recent.add_row(str(entry.get("created_at", ""))[:19].replace("T", " "), str(entry.get("model", "")),
                       str(entry.get("action", "")), fmt.credits(int(entry.get("credits_ucr") or 0)))
    outer = Table.grid()
    outer.add_row(grid)
    outer.add_row(history)
    outer.add_row(recent)
    return outer

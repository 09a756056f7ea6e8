"""Queue (key 3): the outbox on its way to Stripe, from `GET /outbox`: depth by status, the oldest
waiting event's age, and the events themselves with their last error (a dead letter's reason).
`s` cycles the status shown; `r` re-queues the event under the cursor: a dead or held one after a
confirmation, an `unknown` one only after a warning that Stripe may already have counted it."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Footer, Header, Static

from tui import format as fmt
from tui import keys
from tui.client import ConsoleError, Queue, QueuedEvent
from tui.screens.confirm import ConfirmDialog
from tui.screens.live import LiveScreen
from tui.widgets.record_table import Column, RecordTable
from tui.widgets.status_line import StatusLine

STATUSES = (None, "dead", "unknown", "held", "pending", "sending")
"""What `s` cycles through; None: every undelivered event."""
REQUEUABLE = ("dead", "held", "unknown")
_URGENCY = {status: rank for rank, status in enumerate(("dead", "unknown", "held", "pending", "sending"))}
"""The status line counts what needs an operator first."""

COLUMNS: tuple[Column[QueuedEvent], ...] = (
    Column("id", "Event", 17, lambda event: event.id, lambda event: event.id, False),
    Column("customer", "Customer", 14, lambda event: event.customer_id, lambda event: event.customer_id, False),
    Column("credits", "Credits", 8, lambda event: fmt.credits(event.value_ucr), lambda event: event.value_ucr),
    Column("status", "Status", 7, lambda event: event.status, lambda event: event.status, False),
    Column("attempts", "Tries", 5, lambda event: str(event.attempts), lambda event: event.attempts),
    Column("occurred", "Occurred", 11,
           lambda event: "" if event.occurred_at is None else f"{event.occurred_at:%m-%d %H:%M}",
           lambda event: event.occurred_at, False),
    Column("error", "Last error", 80, lambda event: event.last_error or "", lambda event: event.last_error or "",
           False),
)


def note(event: QueuedEvent | None) -> str:
    """The event under the cursor in full, under the table: its id, and its last error (a dead letter's reason)."""
    if event is None:
        return ""
    retry = "" if event.next_attempt_at is None else f" · next try {event.next_attempt_at:%H:%M:%S} UTC"
    return (f"{event.id} · {event.customer_id} · {event.status}, {event.attempts} tries{retry}\n"
            f"{event.last_error or 'no error'}")


class QueueScreen(LiveScreen):
    AUTO_FOCUS = "#queue"
    HELP_KEYS = keys.QUEUE_KEYS
    BINDINGS = keys.bindings(keys.QUEUE_KEYS)

    def __init__(self) -> None:
        super().__init__()
        self.status_shown: str | None = None
        self.queue: Queue | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine()
        yield RecordTable(COLUMNS, key_of=lambda event: event.id, sort="occurred", id="queue",
                          fault=lambda event: event.status in ("dead", "unknown"))
        yield Static(classes="record-note")
        yield Footer()

    @property
    def table(self) -> RecordTable[QueuedEvent]:
        return self.query_one("#queue", RecordTable)

    async def fetch(self) -> Queue:
        return await self.app.client.queue(self.status_shown)

    def paint(self, queue: Queue) -> None:
        self.queue = queue
        self.table.show(queue.events)
        self.noted()
        depth = " · ".join(f"{status} {count:,}" for status, count in
                           sorted(queue.depth.items(), key=lambda item: _URGENCY.get(item[0], len(_URGENCY))) if count)
        oldest = "" if queue.oldest_age_seconds is None else f" · oldest {fmt.age(queue.oldest_age_seconds)}"
        self.status.summary = f"{self.status_shown or 'undelivered'} · {depth or 'queue empty'}{oldest}"
        self.status.redraw()

    @on(RecordTable.Highlighted, "#queue")
    def noted(self) -> None:
        self.query_one(".record-note", Static).update(note(self.table.cursor_record))

    def action_show_status(self) -> None:
        self.status_shown = STATUSES[(STATUSES.index(self.status_shown) + 1) % len(STATUSES)]
        self.poll_now()

    @work(group="action", exit_on_error=False)
    async def action_requeue(self) -> None:
        event = self.table.cursor_record
        if event is None or event.status not in REQUEUABLE:
            self.app.notify("Only dead, held or unknown events can be re-queued.", severity="warning")
            return
        force = event.status == "unknown"
        question = (f"Re-queue {event.id}? Its status is unknown: Stripe may already have counted it, and "
                    "sending it again may bill twice if Stripe no longer dedupes it. Prefer reconciliation."
                    if force else f"Re-queue {event.id} ({event.status}) for delivery now?")
        confirm = "Re-queue anyway" if force else "Re-queue"
        if not await self.app.push_screen_wait(ConfirmDialog(question, confirm=confirm)):
            return
        try:
            count = await self.app.client.requeue([event.id], force=force)
        except ConsoleError as error:
            self.app.notify(str(error), title="Refused", severity="error")
            return
        self.app.notify(f"{count} event re-queued." if count else "Nothing re-queued (it moved meanwhile).")
        self.poll_now()

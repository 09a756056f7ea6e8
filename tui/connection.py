"""The console's link to the proxy, as the status line shows it: when data last arrived, what failed,
and when the next try is. Backoff doubles from one second to at most ten (DESIGN)."""

from __future__ import annotations

from dataclasses import dataclass

from tui import format as fmt
from tui.client import ConsoleError

MAX_BACKOFF = 10.0


@dataclass
class Connection:
    last_ok: float | None = None
    """Monotonic time of the last answer."""
    error: ConsoleError | None = None
    failures: int = 0
    retry_at: float | None = None

    def succeeded(self, now: float) -> None:
        self.last_ok, self.error, self.failures, self.retry_at = now, None, 0, None

    def failed(self, error: ConsoleError, now: float) -> float:
        """Record a failure; the seconds to wait before the next try."""
        self.error, self.failures = error, self.failures + 1
        wait = min(MAX_BACKOFF, 2.0 ** (self.failures - 1))
        self.retry_at = now + wait
        return wait

    @property
    def stale(self) -> bool:
        return self.error is not None

    def describe(self, now: float, *, paused: bool, refresh: float) -> str:
        """One line: the link's state, the data's age and what happens next (the header names the proxy)."""
        age = "no data yet" if self.last_ok is None else f"updated {fmt.age(now - self.last_ok)} ago"
        if self.error is not None:
            retry = "" if self.retry_at is None else f" · retry in {max(0, int(self.retry_at - now + 0.999))} s"
            kept = "" if self.last_ok is None else " · showing the last data"
            return f"⚠ {self.error}{kept} · {age}{retry}"
        state = "paused (p resumes)" if paused else f"every {refresh:g} s"
        return f"{age} · {state}"

"""The console's heap and Python's cyclic garbage collector.

A fleet refresh makes some 50,000 objects that all live until the next one. Collector passes run
while they are made find nothing to free, yet each pass walks the young objects and a full pass
walks every object in the process, the app's own included: tens of milliseconds, landing on
whichever thread allocates next (bench/tui_refresh.py). So the collector waits while a fleet is
parsed and its lines are made, and what the console builds at start-up (Textual, its styles,
pydantic's validators) is frozen out of every later pass.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collector passes inside (a burst of objects that all stay alive); as before afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive now out of the collector's sight for good: they live
    as long as the console, and later passes need not walk them (`gc.freeze`)."""
    gc.collect()
    gc.freeze()

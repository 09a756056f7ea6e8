"""`meterline migrate grandfather ID` and `meterline migrate schedule ID --to-plan P`: moving one
customer (plugin/services/plan_moves.py)."""

from __future__ import annotations


def register_actions(actions) -> None:
    """Adds this module's actions to the `migrate` group (plugin/cli/migrate.py)."""

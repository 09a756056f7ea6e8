"""`meterline tui`: the operator console (tui/)."""

from __future__ import annotations

from typing import TextIO


def cmd_tui(args, out: TextIO) -> None:
    from tui.app import make_app

    make_app().run()


def register(commands) -> None:
    tui = commands.add_parser("tui", help="the operator console")
    tui.set_defaults(run=cmd_tui)

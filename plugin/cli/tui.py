"""`meterline tui [--url URL] [--refresh SECONDS] [--readonly]`: the operator console (tui/). It
talks to the proxy's HTTP API only; the master key comes from LITELLM_MASTER_KEY or a prompt that
does not echo, and is never printed."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import TextIO

from plugin.cli.common import BadInput


def refresh_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 5, got {value!r}") from None
    if not 0.5 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"refresh every 0.5 to 3600 seconds, got {value!r}")
    return seconds


def url_arg(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected http(s)://host:port, got {value!r}")
    return value


def master_key() -> str:
    key = os.environ.get("LITELLM_MASTER_KEY", "")
    if not key and sys.stdin.isatty():
        key = getpass.getpass("master key (LITELLM_MASTER_KEY): ")
    if not key:
        raise BadInput("meterline tui: set LITELLM_MASTER_KEY (or run it in a terminal to be asked)")
    return key


def cmd_tui(args, out: TextIO) -> None:
    from tui.app import make_app
    from tui.client import ConsoleClient

    key = master_key()
    app = make_app(ConsoleClient(args.url, key), refresh_seconds=args.refresh, readonly=args.readonly,
                   freeze_heap=True)
    app.run()
    if app.return_code:  # Textual has shown what failed; say so to the shell too
        raise SystemExit(app.return_code)


def register(commands) -> None:
    from tui.client import DEFAULT_URL

    tui = commands.add_parser("tui", help="the operator console (talks to a proxy's HTTP API)")
    tui.add_argument("--url", type=url_arg, default=DEFAULT_URL, help=f"the proxy (default {DEFAULT_URL})")
    tui.add_argument("--refresh", type=refresh_seconds, default=5.0, help="seconds between refreshes (default 5)")
    tui.add_argument("--readonly", action="store_true", help="hide every action that changes state")
    tui.set_defaults(run=cmd_tui)

"""One row of a ledger file (`meterline ledger import`, DESIGN "Contract: migration and pricing
operations"): its values as read from CSV or JSON, checked and turned into the ledger row it becomes,
or the reason it cannot be. Pure: the customers' current periods and `now` come in as plain values.

The file's columns are the export's, every one present and every value given as the export writes
them: strings may be empty (the export writes what the ledger holds), numbers, booleans and the time
may not, because a default would invent usage nobody recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from plugin.rules.records import LedgerRow

COLUMNS = (
    "id", "customer_id", "member", "action", "model", "provider", "prompt_tokens", "completion_tokens",
    "cached_tokens", "credits_ucr", "provider_cost_uusd", "cache_hit", "saved_ucr", "stream", "created_at",
)
"""A ledger file's columns, in the order `meterline ledger export` writes them (DESIGN "Contract: CLI")."""

TEXT_LENGTHS = {"id": 100, "customer_id": 64, "member": 255, "action": 255, "model": 255, "provider": 64}
"""The ledger's column lengths (plugin/ledger/models.py LedgerEntry; a test holds them equal)."""

LARGEST = 2**63 - 1
"""The ledger's integers are BIGINT."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The rollups count whole hours and days since the epoch; rows before it would be counted in the wrong one."""

_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


class BadValue(ValueError):
    """Why one value cannot be imported (the message follows the column's name)."""


def _shown(value: Any) -> str:
    """A value as the message quotes it: repr (one line whatever it holds), cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(limit: int) -> Callable[[Any], str]:
    def text(value: Any) -> str:
        if type(value) is not str:
            raise BadValue(f"expected text, got {_shown(value)}")
        if len(value) > limit:
            raise BadValue(f"longer than {limit} characters")
        return value
    return text


_id_text = _text(TEXT_LENGTHS["id"])


def _ledger_id(value: Any) -> str:
    if value == "":
        raise BadValue("empty")
    return _id_text(value)


def _whole(value: Any) -> int:
    """A non-negative integer: its digits as text (CSV, checked first), or a JSON number without a fraction."""
    if type(value) is str and value.isdigit() and value.isascii():
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        raise BadValue(f"expected a whole number >= 0, got {_shown(value)}")
    if not 0 <= number <= LARGEST:
        raise BadValue(f"expected a whole number from 0 to {LARGEST}, got {_shown(value)}")
    return number


def _boolean(value: Any) -> bool:
    """true/false in any case, or 1/0 (as text, or JSON's booleans and numbers)."""
    if type(value) is bool:
        return value
    found = _BOOLEANS.get(value.lower() if type(value) is str else str(value)) if type(value) in (str, int) else None
    if found is None:
        raise BadValue(f"expected true/false or 1/0, got {_shown(value)}")
    return found


def _moment(value: Any) -> datetime:
    """ISO 8601 with a timezone: a naive time would be read in whatever zone the reader guesses."""
    if type(value) is not str:
        raise BadValue(f"expected an ISO 8601 date and time with a timezone, got {_shown(value)}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadValue(f"expected an ISO 8601 date and time with a timezone, e.g. 2025-06-01T12:00:00Z, "
                       f"got {_shown(value)}") from None
    if moment.tzinfo is None:
        raise BadValue(f"{_shown(value)} has no timezone; add Z or an offset such as +00:00")
    moment = moment.astimezone(UTC)
    if moment < EPOCH:
        raise BadValue(f"{_shown(value)} is before 1970")
    return moment


_CONVERT: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("id", _ledger_id), ("customer_id", _text(TEXT_LENGTHS["customer_id"])),
    ("member", _text(TEXT_LENGTHS["member"])), ("action", _text(TEXT_LENGTHS["action"])),
    ("model", _text(TEXT_LENGTHS["model"])), ("provider", _text(TEXT_LENGTHS["provider"])),
    ("prompt_tokens", _whole), ("completion_tokens", _whole), ("cached_tokens", _whole), ("credits_ucr", _whole),
    ("provider_cost_uusd", _whole), ("cache_hit", _boolean), ("saved_ucr", _whole), ("stream", _boolean),
    ("created_at", _moment),
)


def parse_row(values: Mapping[str, Any], period_starts: Mapping[str, datetime]) -> LedgerRow | str:
    """The history row `values` (column -> value, text from CSV or JSON values) become, or why not:
    every problem of the row, joined by "; ". `period_starts`: each known customer -> the start of its
    current billing period; a row from then on is refused (live counters are seeded from the ledger,
    so imported usage there would count against the customer's limits)."""
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for column, convert in _CONVERT:
        try:
            parsed[column] = convert(values[column])
        except KeyError:
            problems.append(f"{column}: missing")
        except BadValue as bad:
            problems.append(f"{column}: {bad}")
    if len(values) != len(COLUMNS) and (unknown := sorted(str(name) for name in values if name not in COLUMNS)):
        problems.append("unknown columns " + ", ".join(unknown))
    cached, prompt = parsed.get("cached_tokens"), parsed.get("prompt_tokens")
    if cached is not None and prompt is not None and cached > prompt:
        problems.append(f"cached_tokens: {cached} is more than prompt_tokens ({prompt})")
    customer = parsed.get("customer_id")
    if customer is not None:
        period_start = period_starts.get(customer)
        created_at = parsed.get("created_at")
        if period_start is None:
            problems.append(f"unknown customer {_shown(customer)}")
        elif created_at is not None and created_at >= period_start:
            problems.append(f"created_at {created_at.isoformat()} is in the customer's current billing period "
                            f"(from {period_start.isoformat()}); only history before it can be imported")
    if problems:
        return "; ".join(problems)
    return LedgerRow(**parsed, history=True)


def format_of(file_name: str) -> str | None:
    """csv or jsonl from a file's extension (any case); None for another."""
    suffix = file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    return suffix if suffix in ("csv", "jsonl") else None


MAX_REPORTED = 50
"""Bad rows reported one per line; beyond them, one line says how many more."""


def refusal_lines(problems: list[str], bad_rows: int) -> list[str]:
    """What a refused import prints: the first MAX_REPORTED problems, then how many more bad rows there are."""
    lines = problems[:MAX_REPORTED]
    if bad_rows > len(lines):
        more = bad_rows - len(lines)
        lines.append(f"... and {more:,} more bad row{'s' if more != 1 else ''}; nothing was imported")
    return lines

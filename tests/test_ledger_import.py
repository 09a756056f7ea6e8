"""`meterline ledger import`: the row rules by table; then the command against real SQLite and PostgreSQL
ledgers: an export imported into a fresh database answers usage exactly as the original, a file with bad
rows changes nothing and says which lines, and imported history never reaches the outbox."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from plugin import runtime
from plugin.cli import main
from plugin.ledger import accounts, store
from plugin.ledger.models import LedgerEntry
from plugin.rules.ledger_import import (
    COLUMNS,
    LARGEST,
    TEXT_LENGTHS,
    format_of,
    parse_row,
    refusal_lines,
)
from plugin.rules.policy import credits_grouped
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.services import ledger_import
from plugin.services.ledger_import import import_ledger
from plugin.services.usage import usage_daily, usage_report
from tests.support.postgres import empty_all_tables
from tests.support.rollups import assert_rollups_match_ledger, rollup_sums

PERIOD = datetime(2026, 12, 1, tzinfo=UTC)
"""The customer's current period starts here (in the pure tests)."""
STARTS = {"acme": PERIOD}

GOOD = {
    "id": "chatcmpl-1", "customer_id": "acme", "member": "alice", "action": "chat", "model": "gpt-4o",
    "provider": "openai", "prompt_tokens": "120", "completion_tokens": "30", "cached_tokens": "20",
    "credits_ucr": "1500000", "provider_cost_uusd": "420", "cache_hit": "false", "saved_ucr": "0",
    "stream": "True", "created_at": "2026-11-03T10:15:00.250000+02:00",
}


def with_values(**changes) -> dict:
    return {**GOOD, **changes}


# ------------------------------------------------------------------ the rules of one row


def test_a_good_row_becomes_a_history_row_in_utc():
    row = parse_row(GOOD, STARTS)
    assert row == LedgerRow(
        id="chatcmpl-1", customer_id="acme", member="alice", action="chat", model="gpt-4o", provider="openai",
        prompt_tokens=120, completion_tokens=30, cached_tokens=20, credits_ucr=1_500_000, provider_cost_uusd=420,
        cache_hit=False, saved_ucr=0, stream=True, created_at=datetime(2026, 11, 3, 8, 15, 0, 250000, tzinfo=UTC),
        history=True)
    assert row.price_version is None and row.reasoning_tokens == 0


def test_json_values_are_read_as_json_types():
    values = {**GOOD, "prompt_tokens": 120, "completion_tokens": 30, "cached_tokens": 20, "credits_ucr": 1_500_000,
              "provider_cost_uusd": 420, "cache_hit": False, "saved_ucr": 0, "stream": True}
    assert parse_row(values, STARTS) == parse_row(GOOD, STARTS)


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("True", True), ("1", True), (True, True), (1, True),
    ("false", False), ("False", False), ("fAlSe", False), ("0", False), (False, False), (0, False),
])
def test_booleans_in_any_case_or_as_one_and_zero(text, expected):
    assert parse_row(with_values(cache_hit=text, stream=text), STARTS).cache_hit is expected


@pytest.mark.parametrize(("changes", "reason"), [
    ({"id": ""}, "id: empty"),
    ({"id": "x" * 101}, "id: longer than 100 characters"),
    ({"customer_id": "ghost"}, "unknown customer 'ghost'"),
    ({"member": "m" * 256}, "member: longer than 255 characters"),
    ({"action": "a" * 256}, "action: longer than 255 characters"),
    ({"model": "m" * 256}, "model: longer than 255 characters"),
    ({"provider": "p" * 65}, "provider: longer than 64 characters"),
    ({"credits_ucr": "-5"}, "credits_ucr: expected a whole number >= 0, got '-5'"),
    ({"credits_ucr": "1.5"}, "credits_ucr: expected a whole number >= 0, got '1.5'"),
    ({"credits_ucr": ""}, "credits_ucr: expected a whole number >= 0, got ''"),
    ({"credits_ucr": " 7"}, "credits_ucr: expected a whole number >= 0, got ' 7'"),
    ({"credits_ucr": "١٢"}, "credits_ucr: expected a whole number >= 0, got '١٢'"),
    ({"credits_ucr": str(LARGEST + 1)}, f"credits_ucr: expected a whole number from 0 to {LARGEST}"),
    ({"credits_ucr": -5}, f"credits_ucr: expected a whole number from 0 to {LARGEST}, got -5"),
    ({"credits_ucr": 1.0}, "credits_ucr: expected a whole number >= 0, got 1.0"),
    ({"credits_ucr": True}, "credits_ucr: expected a whole number >= 0, got True"),
    ({"prompt_tokens": "many"}, "prompt_tokens: expected a whole number >= 0, got 'many'"),
    ({"completion_tokens": None}, "completion_tokens: expected a whole number >= 0, got None"),
    ({"provider_cost_uusd": "1e3"}, "provider_cost_uusd: expected a whole number >= 0, got '1e3'"),
    ({"saved_ucr": "-1"}, "saved_ucr: expected a whole number >= 0, got '-1'"),
    ({"cached_tokens": "121"}, "cached_tokens: 121 is more than prompt_tokens (120)"),
    ({"cache_hit": "yes"}, "cache_hit: expected true/false or 1/0, got 'yes'"),
    ({"stream": 2}, "stream: expected true/false or 1/0, got 2"),
    ({"stream": ""}, "stream: expected true/false or 1/0, got ''"),
    ({"created_at": "2026-11-03T10:15:00"},
     "created_at: '2026-11-03T10:15:00' has no timezone; add Z or an offset such as +00:00"),
    ({"created_at": "2026-11-03"}, "created_at: '2026-11-03' has no timezone"),
    ({"created_at": "yesterday"}, "created_at: expected an ISO 8601 date and time with a timezone"),
    ({"created_at": 1767225600}, "created_at: expected an ISO 8601 date and time with a timezone, got 1767225600"),
    ({"created_at": "1969-12-31T23:59:59Z"}, "created_at: '1969-12-31T23:59:59Z' is before 1970"),
    ({"created_at": "2026-12-01T00:00:00Z"},
     "created_at 2026-12-01T00:00:00+00:00 is in the customer's current billing period "
     "(from 2026-12-01T00:00:00+00:00); only history before it can be imported"),
    ({"created_at": "2027-03-01T00:00:00+01:00"},
     "created_at 2027-02-28T23:00:00+00:00 is in the customer's current billing period"),
    ({"member": 7}, "member: expected text, got 7"),
    ({"extra": "1"}, "unknown columns extra"),
])
def test_each_bad_value_is_named(changes, reason):
    problem = parse_row(with_values(**changes), STARTS)
    assert isinstance(problem, str) and problem.startswith(reason), problem
    assert "\n" not in problem


def test_every_problem_of_a_row_is_said_once_on_one_line():
    values = with_values(prompt_tokens="x", cache_hit="maybe", provider="p\n" * 40)
    del values["stream"]
    assert parse_row(values, STARTS) == (
        "provider: longer than 64 characters; prompt_tokens: expected a whole number >= 0, got 'x'; "
        "cache_hit: expected true/false or 1/0, got 'maybe'; stream: missing")


def test_long_values_are_quoted_short():
    problem = parse_row(with_values(credits_ucr="9" * 30 + "x"), STARTS)
    assert problem == "credits_ucr: expected a whole number >= 0, got '" + "9" * 30 + "x'"
    problem = parse_row(with_values(credits_ucr="9" * 100 + "x"), STARTS)
    assert problem == "credits_ucr: expected a whole number >= 0, got '" + "9" * 56 + "..."


def test_the_last_moment_before_the_period_is_history():
    row = parse_row(with_values(created_at="2026-11-30T23:59:59.999999Z"), STARTS)
    assert isinstance(row, LedgerRow) and row.created_at == PERIOD - timedelta(microseconds=1)


def test_the_columns_and_lengths_are_the_ledgers():
    assert store.EXPORT_COLUMNS == COLUMNS
    for column, length in TEXT_LENGTHS.items():
        assert LedgerEntry.__table__.c[column].type.length == length


@pytest.mark.parametrize(("name", "expected"), [
    ("usage.csv", "csv"), ("USAGE.CSV", "csv"), ("a.b.jsonl", "jsonl"), ("usage.json", None), ("usage", None),
    ("csv", None),
])
def test_the_format_comes_from_the_extension(name, expected):
    assert format_of(name) == expected


def test_at_most_fifty_lines_then_how_many_more():
    problems = [f"line {n}: bad" for n in range(2, 52)]
    assert refusal_lines(problems[:3], 3) == problems[:3]
    assert refusal_lines(problems, 50) == problems
    assert refusal_lines(problems, 51) == [*problems, "... and 1 more bad row; nothing was imported"]
    assert refusal_lines(problems, 1_050) == [*problems, "... and 1,000 more bad rows; nothing was imported"]


# ------------------------------------------------------------------ the command, on a real database


CONFIG = """
plans:
  free: {cap_credits: 100}
  pro: {included_credits: 10000}
"""
CUSTOMERS = {"acme": "pro", "beta": "free", "gamma": "pro"}


class Cli:
    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, list[str]]:
        """Exit code, stdout, stderr's lines."""
        out = io.StringIO()
        self.capsys.readouterr()
        code = main(list(argv), out=out)
        return code, out.getvalue(), self.capsys.readouterr().err.splitlines()

    @property
    def meterline(self):
        return runtime.current()

    @property
    def engine(self):
        return runtime.current().engine


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, database_url) -> Iterator[Cli]:
    """The CLI against a ledger with three customers (gamma's periods anchored mid-month), on SQLite and on
    PostgreSQL."""
    config = tmp_path / "meterline.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("METERLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    add_customers(runtime.current().engine)
    yield Cli(capsys)
    runtime.reset_for_tests()


def add_customers(engine) -> None:
    for customer, plan in CUSTOMERS.items():
        store.add_customer(engine, customer, plan)
    accounts.set_terms(engine, "gamma", period_anchor=datetime(2025, 1, 17, 9, 30, tzinfo=UTC))


def period_start(cli: Cli, customer: str) -> datetime:
    meterline = cli.meterline
    return meterline.period(accounts.load_profile(meterline.engine, customer), meterline.clock()).start


def history(cli: Cli, count: int, seed: int = 3) -> list[LedgerRow]:
    """Rows of the three customers over the 100 days before each one's current period, many on the edges of
    hours and days, some cache hits, the last one a microsecond before the period."""
    rng = random.Random(seed)
    rows = []
    for number in range(count):
        customer = rng.choice(list(CUSTOMERS))
        moment = period_start(cli, customer) - timedelta(seconds=rng.randrange(1, 100 * 86400))
        edge = rng.random()
        if edge < 0.2:
            moment = moment.replace(minute=59, second=59, microsecond=999_999)
        elif edge < 0.4:
            moment = moment.replace(minute=0, second=0, microsecond=0)
        else:
            moment = moment.replace(microsecond=rng.randrange(1_000_000))
        hit = rng.random() < 0.1
        prompt = rng.randrange(0, 5000)
        rows.append(LedgerRow(
            id=f"chatcmpl-{rng.getrandbits(64):016x}", customer_id=customer,
            model=rng.choice(("gpt-4o", "claude-sonnet-4", "gemini-2.0-flash")),
            member=rng.choice(("-", "alice", "bob", "<script>", 'quote "me", please', "")),
            action=rng.choice(("-", "chat", "summarize", "line\nbreak")), provider=rng.choice(("openai", "-")),
            prompt_tokens=prompt, completion_tokens=rng.randrange(0, 900), cached_tokens=rng.randrange(0, prompt + 1),
            credits_ucr=0 if hit else rng.randrange(1, 5_000_000), provider_cost_uusd=rng.randrange(0, 10_000),
            cache_hit=hit, saved_ucr=rng.randrange(1, 1000) if hit else 0, stream=rng.random() < 0.5,
            created_at=moment))
    rows.append(LedgerRow(id="last-before-the-period", customer_id="gamma", model="gpt-4o", credits_ucr=7,
                          created_at=period_start(cli, "gamma") - timedelta(microseconds=1)))
    return rows


def usage_answers(cli: Cli) -> dict:
    """Every usage answer the API gives for the last four periods and the last 120 days, per customer."""
    meterline, now = cli.meterline, cli.meterline.clock()
    answers = {}
    for customer in CUSTOMERS:
        start = period_start(cli, customer)
        for back in range(4):
            at = start - timedelta(days=1 + 31 * back)
            answers[customer, back] = usage_report(meterline, customer, now, at=at)
        answers[customer, "daily"] = usage_daily(meterline, customer, now, 120)
    return answers


def state(cli: Cli) -> tuple:
    """Everything an import may change: ledger, rollups, outbox, alerts."""
    engine = cli.engine
    return ([store.export_row(row) | {"history": row.history} for row in store.ledger_rows(engine)],
            rollup_sums(engine), store.list_outbox_ids(engine), [alert.id for alert in store.list_alerts(engine)])


def start_afresh(cli: Cli, database_url: str, tmp_path: Path, monkeypatch) -> None:
    """The same customers in a new, empty ledger (a new SQLite file; PostgreSQL's tables emptied)."""
    if database_url.startswith("sqlite"):
        monkeypatch.setenv("METERLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    else:
        empty_all_tables(cli.engine)
    runtime.reset_for_tests()
    add_customers(cli.engine)


@pytest.mark.parametrize("file_format", ["csv", "jsonl"])
def test_an_export_imported_into_a_fresh_ledger_answers_usage_exactly_as_the_original(
        cli, file_format, database_url, tmp_path, monkeypatch):
    rows = history(cli, 400)
    assert store.write_records(cli.engine, [BillingRecord(row, meter=False) for row in rows]) == len(rows)
    before = usage_answers(cli)
    exported = [store.export_row(row) for row in store.ledger_rows(cli.engine)]
    code, out, err = cli("ledger", "export", "--format", file_format)
    assert code == 0 and err == []
    path = tmp_path / f"history.{file_format}"
    path.write_text(out)

    start_afresh(cli, database_url, tmp_path, monkeypatch)
    code, out, err = cli("ledger", "import", str(path))
    assert (code, err) == (0, [])
    total = sum(row.credits_ucr for row in rows)
    first, last = min(row.created_at for row in rows), max(row.created_at for row in rows)
    assert out == (f"imported 401 rows of 3 customers, {credits_grouped(total)} credits, from {first.isoformat()} "
                   f"to {last.isoformat()} as history (never sent to a sink)\n")

    imported = list(store.ledger_rows(cli.engine))
    assert [store.export_row(row) for row in imported] == exported  # ids kept, every value as it was
    assert all(row.history and row.price_version is None and row.reasoning_tokens == 0 for row in imported)
    assert assert_rollups_match_ledger(cli.engine) == 401
    assert usage_answers(cli) == before
    assert any(answer["used_ucr"] for key, answer in before.items() if key[1] != "daily")  # not all zeros
    assert store.list_outbox_ids(cli.engine) == [] and store.list_alerts(cli.engine) == []


def test_imported_history_is_never_sent_and_raises_no_alert_and_live_rows_still_are(cli, tmp_path):
    path = tmp_path / "history.jsonl"
    rows = history(cli, 50)
    write_jsonl(path, rows)
    assert cli("ledger", "import", str(path))[0] == 0
    assert store.list_outbox_ids(cli.engine) == [] and store.list_alerts(cli.engine) == []
    now = cli.meterline.clock()
    code, out, _ = cli("usage", "acme", "--json")
    assert code == 0 and json.loads(out)["used_ucr"] == 0  # nothing in the current period: limits see none of it
    # after the import the ledger bills as before: outbox row, alert, rollups by the trigger
    live = LedgerRow(id="live-1", customer_id="acme", model="gpt-4o", credits_ucr=2_000_000, created_at=now)
    assert store.write_records(cli.engine, [BillingRecord(live, alert="tokens not billed")]) == 1
    assert store.list_outbox_ids(cli.engine) == ["live-1"]
    assert [alert.subject_id for alert in store.list_alerts(cli.engine)] == ["live-1"]
    assert assert_rollups_match_ledger(cli.engine) == 52
    code, out, _ = cli("usage", "acme", "--json")
    assert json.loads(out)["used_ucr"] == 2_000_000


def csv_line(**changes) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([{**GOOD, **changes}[column] for column in COLUMNS])
    return out.getvalue()


def exported(row: LedgerRow) -> dict:
    """A row as `meterline ledger export` writes it."""
    return {column: getattr(row, column) for column in COLUMNS} | {"created_at": row.created_at.isoformat()}


def write_csv(path: Path, rows: list[LedgerRow]) -> list[int]:
    """The rows as an exported CSV; the line each starts on (values may hold line breaks)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    starts = []
    for row in rows:
        starts.append(out.getvalue().count("\n") + 1)
        writer.writerow(exported(row).values())
    path.write_text(out.getvalue())
    return starts


def write_jsonl(path: Path, rows: list[LedgerRow]) -> None:
    path.write_text("".join(json.dumps(exported(row)) + "\n" for row in rows))


def test_a_file_with_bad_rows_changes_nothing_and_names_every_one(cli, tmp_path):
    now = cli.meterline.clock()
    live = LedgerRow(id="live-1", customer_id="acme", model="gpt-4o", credits_ucr=2_000_000, created_at=now)
    older = LedgerRow(id="live-0", customer_id="beta", model="gpt-4o", credits_ucr=5, created_at=now - timedelta(
        days=70), cache_hit=False)
    store.write_records(cli.engine, [BillingRecord(live), BillingRecord(older, alert="seen")])
    before = state(cli)
    acme_start = period_start(cli, "acme")
    in_period = (acme_start + timedelta(seconds=5)).isoformat()
    lines = [
        ",".join(COLUMNS),                                                  # 1
        csv_line(id="g1"),                                                  # 2 good
        csv_line(id="b3", credits_ucr="-5"),                                # 3
        csv_line(id="b4", cache_hit="yes"),                                 # 4
        csv_line(id="b5", created_at="2026-11-03T10:15:00"),                # 5
        csv_line(id="g1"),                                                  # 6 the id of line 2
        csv_line(id="live-1"),                                              # 7 in the ledger
        csv_line(id="b8", customer_id="ghost"),                             # 8
        csv_line(id="b9", prompt_tokens="10", cached_tokens="20"),          # 9
        csv_line(id="b10", created_at=in_period),                           # 10
        ",".join(["b11"] * 14),                                             # 11
        csv_line(id="b12", prompt_tokens="abc", model="m" * 300),           # 12
        csv_line(id="g2"),                                                  # 13 good
        csv_line(id=""),                                                    # 14
        "",                                                                 # 15 blank: skipped
        csv_line(id="live-0"),                                              # 16 in the ledger
        csv_line(id="b17", customer_id="nobody"),                           # 17
        csv_line(id="g2", credits_ucr="x"),                                 # 18 bad twice over
        csv_line(id="b19", created_at="2026-13-01T00:00:00Z"),              # 19
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("ledger", "import", str(path))
    assert (code, out) == (2, "")
    assert err == [
        "line 3: credits_ucr: expected a whole number >= 0, got '-5'",
        "line 4: cache_hit: expected true/false or 1/0, got 'yes'",
        "line 5: created_at: '2026-11-03T10:15:00' has no timezone; add Z or an offset such as +00:00",
        "line 6: id 'g1' is also on line 2",
        "line 7: id 'live-1' is already in the ledger",
        "line 8: unknown customer 'ghost'",
        "line 9: cached_tokens: 20 is more than prompt_tokens (10)",
        f"line 10: created_at {in_period} is in the customer's current billing period (from "
        f"{acme_start.isoformat()}); only history before it can be imported",
        "line 11: 14 values, the header has 15",
        "line 12: model: longer than 255 characters; prompt_tokens: expected a whole number >= 0, got 'abc'",
        "line 14: id: empty",
        "line 16: id 'live-0' is already in the ledger",
        "line 17: unknown customer 'nobody'",
        "line 18: credits_ucr: expected a whole number >= 0, got 'x'; id 'g2' is also on line 13",
        "line 19: created_at: expected an ISO 8601 date and time with a timezone, e.g. 2025-06-01T12:00:00Z, "
        "got '2026-13-01T00:00:00Z'",
    ]
    assert state(cli) == before
    code, out, err = cli("ledger", "import", str(path), "--dry-run")  # a dry run says the same
    assert (code, len(err)) == (2, 15) and state(cli) == before


def test_a_file_whose_only_problem_is_an_id_in_the_ledger_is_refused_at_the_load_and_leaves_it_intact(
        cli, tmp_path):
    rows = history(cli, 30)
    store.write_records(cli.engine, [BillingRecord(rows[17], meter=False)])
    before = state(cli)
    path = tmp_path / "history.csv"
    line = write_csv(path, rows)[17]
    code, out, err = cli("ledger", "import", str(path))
    assert (code, out, err) == (2, "", [f"line {line}: id {rows[17].id!r} is already in the ledger"])
    assert state(cli) == before
    # the rollups' trigger, dropped inside the refused load, is there again: a live row is counted
    live = LedgerRow(id="live-1", customer_id="acme", model="gpt-4o", credits_ucr=3, created_at=cli.meterline.clock())
    store.write_records(cli.engine, [BillingRecord(live)])
    assert assert_rollups_match_ledger(cli.engine) == 2


def test_at_most_fifty_bad_rows_are_listed_then_how_many_more(cli, tmp_path):
    path = tmp_path / "ghosts.csv"
    path.write_text("\n".join([",".join(COLUMNS)] + [csv_line(id=f"r{n}", customer_id="ghost") for n in range(120)]))
    code, out, err = cli("ledger", "import", str(path))
    assert (code, out) == (2, "")
    assert err == [f"line {n}: unknown customer 'ghost'" for n in range(2, 52)] + [
        "... and 70 more bad rows; nothing was imported"]
    assert list(store.ledger_rows(cli.engine)) == []


def test_a_dry_run_checks_everything_and_writes_nothing(cli, tmp_path):
    rows = history(cli, 40)
    path = tmp_path / "history.jsonl"
    write_jsonl(path, rows)
    before = state(cli)
    code, out, err = cli("ledger", "import", str(path), "--dry-run")
    assert (code, err) == (0, [])
    assert out.startswith("dry run: would import 41 rows of 3 customers, ") and out.endswith("; nothing written\n")
    assert state(cli) == before
    assert cli("ledger", "import", str(path))[0] == 0  # and the real one then imports it
    assert len(list(store.ledger_rows(cli.engine))) == 41


def test_jsonl_lines_that_are_not_rows_are_named(cli, tmp_path):
    good = {column: value for column, value in GOOD.items()} | {"credits_ucr": 5, "cache_hit": False}
    lines = [
        json.dumps(good | {"id": "j1"}),                                   # 1 good
        "{not json",                                                       # 2
        json.dumps([1, 2]),                                                # 3
        "",                                                                # 4 blank: skipped
        json.dumps(good | {"id": "j5", "credits_ucr": 1.5, "stream": None}),  # 5
        json.dumps({key: value for key, value in good.items() if key != "created_at"} | {"id": "j6"}),  # 6
        json.dumps(good | {"id": "j7", "reasoning_tokens": 3}),             # 7
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("ledger", "import", str(path))
    assert (code, out) == (2, "")
    assert err == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes)",
        "line 3: not a JSON object",
        "line 5: credits_ucr: expected a whole number >= 0, got 1.5; stream: expected true/false or 1/0, got None",
        "line 6: created_at: missing",
        "line 7: unknown columns reasoning_tokens",
    ]
    assert list(store.ledger_rows(cli.engine)) == []


def test_what_the_command_refuses_as_a_whole(cli, tmp_path):
    def refused(*argv: str) -> str:
        code, out, err = cli("ledger", "import", *argv)
        assert (code, out, len(err)) == (2, "", 1), (code, out, err)
        return err[0]

    assert refused(str(tmp_path / "missing.csv")).startswith(
        f"meterline ledger import: cannot read {tmp_path / 'missing.csv'}: No such file or directory")
    assert refused(str(tmp_path), "--format", "csv").endswith(": Is a directory")
    (tmp_path / "rows.txt").write_text(",".join(COLUMNS) + "\n" + csv_line() + "\n")
    assert refused(str(tmp_path / "rows.txt")) == (
        "meterline ledger import: cannot tell the format of rows.txt from its extension (.csv or .jsonl): "
        "use --format csv|jsonl")
    assert "invalid choice: 'xml'" in refused(str(tmp_path / "rows.txt"), "--format", "xml")
    (tmp_path / "empty.csv").write_text("")
    assert refused(str(tmp_path / "empty.csv")) == (
        "meterline ledger import: the file is empty: expected a header line with the columns of "
        "`meterline ledger export`")
    (tmp_path / "short.csv").write_text(",".join(column for column in COLUMNS if column != "stream") + ",note\n")
    assert refused(str(tmp_path / "short.csv")).endswith(": missing stream; unknown 'note'")
    (tmp_path / "twice.csv").write_text(",".join(COLUMNS + ("id",)) + "\n")
    assert refused(str(tmp_path / "twice.csv")).endswith(": named twice id")
    (tmp_path / "latin1.csv").write_bytes((",".join(COLUMNS) + "\n" + csv_line(member="Zoë") + "\n").encode("latin-1"))
    assert refused(str(tmp_path / "latin1.csv")) == "meterline ledger import: latin1.csv is not UTF-8 text"
    (tmp_path / "quote.csv").write_text(",".join(COLUMNS) + "\n" + '"unclosed,' + "\n")
    assert refused(str(tmp_path / "quote.csv")).startswith("meterline ledger import: line 2: not valid CSV")
    assert refused() == "meterline ledger import: the following arguments are required: file"
    assert list(store.ledger_rows(cli.engine)) == []


def test_the_format_flag_wins_over_the_extension_and_a_header_alone_imports_nothing(cli, tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("\ufeff" + ",".join(reversed(COLUMNS)) + "\r\n")  # a BOM, CRLF, columns in another order
    code, out, err = cli("ledger", "import", str(path), "--format", "csv")
    assert (code, out, err) == (0, "imported 0 rows of 0 customers, 0 credits as history (never sent to a sink)\n", [])
    code, out, err = cli("ledger", "import", str(path), "--format", "jsonl")
    assert code == 2 and err[0].startswith("line 1: not valid JSON")


def test_progress_is_reported_in_bytes_up_to_the_files_size(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_import, "BATCH", 7)
    rows = history(cli, 30)
    path = tmp_path / "history.jsonl"
    write_jsonl(path, rows)
    seen: list[tuple[int, int]] = []
    result = import_ledger(cli.meterline, path, cli.meterline.clock(), dry_run=True,
                           progress=lambda done, total: seen.append((done, total)))
    assert result.rows == 31 and not result.imported
    size = path.stat().st_size
    assert len(seen) == 5 and all(total == size for _, total in seen)  # 31 rows in batches of 7, then the end
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == size

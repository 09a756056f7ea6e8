"""The `meterline` command, run in-process against a throwaway SQLite ledger and meterline.yaml."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from plugin import runtime
from plugin.cli import main
from plugin.ledger import store
from plugin.rules.plans import calendar_month
from plugin.rules.records import BillingRecord, LedgerRow

M = 1_000_000

CONFIG = """
plans:
  free: {cap_credits: 100}
  pro: {included_credits: 10000}
"""

# DESIGN.md "Contract: CLI", copied here on purpose: the test must fail if the code drifts.
USAGE_KEYS = {
    "customer_id", "plan", "period_start", "period_end", "used_ucr", "reserved_ucr", "included_ucr",
    "hard_limit_ucr", "cap_ucr", "remaining_ucr", "projected_ucr", "by_model", "by_action", "by_member", "breaker",
}
EXPORT_COLUMNS = [
    "id", "customer_id", "member", "action", "model", "provider", "prompt_tokens", "completion_tokens",
    "cached_tokens", "credits_ucr", "provider_cost_uusd", "cache_hit", "saved_ucr", "stream", "created_at",
]


class Cli:
    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        self.capsys.readouterr()  # start each command with empty captured stderr
        code = main(list(argv), out=out)
        return code, out.getvalue()

    def stderr(self) -> str:
        return self.capsys.readouterr().err

    def fails(self, *argv: str) -> str:
        """Run a command that must be refused: exit 2, nothing on stdout, one line on stderr."""
        code, out = self(*argv)
        err = self.stderr()
        assert code == 2, (code, out, err)
        assert out == ""
        assert err.endswith("\n") and err.count("\n") == 1, repr(err)
        return err.strip()

    @property
    def engine(self):
        return runtime.current().engine


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, database_url) -> Iterator[Cli]:
    """The CLI against an empty ledger, on SQLite and on PostgreSQL."""
    config = tmp_path / "meterline.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("METERLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    yield Cli(capsys)
    runtime.reset_for_tests()


def entry(ledger_id: str, customer_id: str, created_at: datetime, credits_ucr: int, *, model: str = "gpt-a",
          member: str = "alice", action: str = "chat", cache_hit: bool = False, saved_ucr: int = 0) -> LedgerRow:
    return LedgerRow(
        id=ledger_id, customer_id=customer_id, member=member, action=action, model=model, provider="openai",
        prompt_tokens=100, completion_tokens=50, cached_tokens=10, reasoning_tokens=5,
        credits_ucr=credits_ucr, provider_cost_uusd=0 if cache_hit else 42, cache_hit=cache_hit,
        saved_ucr=saved_ucr, stream=False, usage_source="provider", created_at=created_at,
    )


@pytest.fixture
def ledger(cli) -> dict:
    """Two customers and a few rows: three in acme's current period, one just before it, one of beta."""
    assert cli("customers", "add", "acme", "--plan", "free")[0] == 0
    assert cli("customers", "add", "beta", "--plan", "pro", "--stripe-customer", "cus_123")[0] == 0
    start = calendar_month(datetime.now(UTC)).start
    rows = [
        entry("r1", "acme", start, 1_500_000, model="gpt-a", member="alice", action="chat"),
        entry("r2", "acme", start + timedelta(seconds=1), 250_000, model="gpt-b", member="bob", action="chat"),
        entry("r3", "acme", start + timedelta(seconds=2), 0, model="gpt-a", member="alice", action="summarize",
              cache_hit=True, saved_ucr=1_500_000),
        entry("r0", "acme", start - timedelta(microseconds=1), 9_999_999, model="gpt-old"),
        entry("b1", "beta", start + timedelta(seconds=3), 7_000_000, model="gpt-a", member="carol"),
    ]
    assert store.write_records(cli.engine, [BillingRecord(entry=row) for row in rows]) == len(rows)
    return {"start": start}


# ------------------------------------------------------------------ customers


def test_customers_add_and_list(cli):
    code, out = cli("customers", "add", "acme", "--plan", "free")
    assert code == 0 and "acme" in out
    assert cli("customers", "add", "beta", "--plan", "pro", "--stripe-customer", "cus_123")[0] == 0
    code, out = cli("customers", "list")
    assert code == 0
    assert out.splitlines() == ["acme\tfree\t-", "beta\tpro\tcus_123"]
    assert store.get_customer(cli.engine, "beta").stripe_customer_id == "cus_123"


def test_customers_list_json(cli):
    cli("customers", "add", "acme", "--plan", "free")
    cli("customers", "add", "beta", "--plan", "pro", "--stripe-customer", "cus_123")
    code, out = cli("customers", "list", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["plan"], r["stripe_customer_id"]) for r in rows] == [("acme", "free", None), ("beta", "pro", "cus_123")]
    assert all(datetime.fromisoformat(r["created_at"]).tzinfo is not None for r in rows)


def test_customers_list_when_empty(cli):
    assert cli("customers", "list") == (0, "")


def test_duplicate_customer_is_refused(cli):
    assert cli("customers", "add", "acme", "--plan", "free")[0] == 0
    message = cli.fails("customers", "add", "acme", "--plan", "pro")
    assert "acme" in message and "exists" in message
    assert store.get_customer(cli.engine, "acme").plan == "free"


def test_unknown_plan_is_refused(cli):
    message = cli.fails("customers", "add", "acme", "--plan", "gold")
    assert "gold" in message and "free" in message and "pro" in message
    assert store.get_customer(cli.engine, "acme") is None


@pytest.mark.parametrize("customer_id", ["has space", "x" * 65, "semi;colon", "acme\n"])
def test_invalid_customer_id_is_refused(cli, customer_id):
    # "acme\n" fails today: settings.valid_customer_id accepts a trailing newline (`$` in the pattern).
    cli.fails("customers", "add", customer_id, "--plan", "free")
    assert store.list_customers(cli.engine) == []


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["customers"], ["customers", "remove", "acme"], ["ledger", "import"], ["customers", "add", "acme"]],
)
def test_unknown_or_incomplete_commands_are_refused(cli, argv):
    cli.fails(*argv)


def test_invalid_meterline_yaml_is_refused(cli, tmp_path):
    (tmp_path / "meterline.yaml").write_text("pricing: {markup: 0.3}\n")
    runtime.reset_for_tests()
    assert "pricing.markup" in cli.fails("customers", "list")


# ------------------------------------------------------------------ keys


def test_keys_create_prints_a_working_key(cli):
    cli("customers", "add", "acme", "--plan", "free")
    code, out = cli("keys", "create", "acme")
    assert code == 0
    secret = out.strip()
    assert secret.startswith("mk_") and len(secret) > 20
    assert store.customer_for_secret(cli.engine, secret) == "acme"
    assert secret not in cli.stderr()  # shown once, on stdout only


def test_two_keys_are_different(cli):
    cli("customers", "add", "acme", "--plan", "free")
    first, second = cli("keys", "create", "acme")[1].strip(), cli("keys", "create", "acme")[1].strip()
    assert first != second
    assert store.customer_for_secret(cli.engine, first) == store.customer_for_secret(cli.engine, second) == "acme"


def test_keys_revoke_stops_the_key(cli):
    cli("customers", "add", "acme", "--plan", "free")
    kept = cli("keys", "create", "acme")[1].strip()
    revoked = cli("keys", "create", "acme")[1].strip()
    keys = store.list_keys(cli.engine, "acme")
    revoked_id = next(k.id for k in keys if k.key_hash == store.hash_key(revoked))
    code, _ = cli("keys", "revoke", revoked_id)
    assert code == 0
    assert store.customer_for_secret(cli.engine, revoked) is None
    assert store.customer_for_secret(cli.engine, kept) == "acme"
    listing = dict(line.split("\t")[:2] for line in cli("keys", "list", "acme")[1].splitlines())
    assert listing[revoked_id] == "revoked"
    assert sorted(listing.values()) == ["active", "revoked"]


def test_keys_for_unknown_customer_or_key_are_refused(cli):
    assert "nobody" in cli.fails("keys", "create", "nobody")
    assert "key_nope" in cli.fails("keys", "revoke", "key_nope")


# ------------------------------------------------------------------ usage


def test_usage_json_has_the_contract_keys_and_correct_sums(cli, ledger):
    code, out = cli("usage", "acme", "--json")
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    report = json.loads(out)
    assert USAGE_KEYS <= set(report)
    period = calendar_month(datetime.now(UTC))
    assert report["customer_id"] == "acme"
    assert report["plan"] == "free"
    assert datetime.fromisoformat(report["period_start"]) == period.start
    assert datetime.fromisoformat(report["period_end"]) == period.end
    # r1 + r2 + cache hit r3 (0); r0 is in the previous period, b1 is beta's
    assert report["used_ucr"] == 1_750_000
    assert report["reserved_ucr"] == 0
    assert report["included_ucr"] == 0
    assert report["hard_limit_ucr"] is None
    assert report["cap_ucr"] == 100 * M
    assert report["remaining_ucr"] == 100 * M - 1_750_000
    assert type(report["projected_ucr"]) is int and report["projected_ucr"] >= report["used_ucr"]
    assert report["by_model"] == {"gpt-a": 1_500_000, "gpt-b": 250_000}
    assert report["by_action"] == {"chat": 1_750_000, "summarize": 0}
    assert report["by_member"] == {"alice": 1_500_000, "bob": 250_000}
    assert report["breaker"] is not None
    for key in ("used_ucr", "reserved_ucr", "included_ucr", "cap_ucr", "remaining_ucr", "projected_ucr"):
        assert type(report[key]) is int, key


def test_usage_json_counts_reservations_in_flight(cli, ledger):
    """A capped customer's requests in flight hold part of the cap: the report shows it and what is left."""
    from datetime import timedelta

    from plugin.counters.base import Account
    from plugin.rules.policy import Ask

    now = datetime.now(UTC)
    account = Account("acme", calendar_month(now).start)
    granted = runtime.current().counters.reserve(account, "in-flight", Ask(3 * M, M), cap_ucr=100 * M,
                                                 expires_at=now + timedelta(minutes=5), now=now)
    assert granted.granted_ucr == 3 * M
    report = json.loads(cli("usage", "acme", "--json")[1])
    assert (report["reserved_ucr"], report["remaining_ucr"]) == (3 * M, 100 * M - 1_750_000 - 3 * M)


def test_usage_json_of_an_uncapped_plan(cli, ledger):
    report = json.loads(cli("usage", "beta", "--json")[1])
    assert report["plan"] == "pro"
    assert report["used_ucr"] == 7_000_000
    assert report["included_ucr"] == 10_000 * M
    assert report["cap_ucr"] is None and report["remaining_ucr"] is None
    assert report["by_member"] == {"carol": 7_000_000}


def test_usage_of_a_customer_without_rows_is_zero(cli):
    cli("customers", "add", "acme", "--plan", "free")
    report = json.loads(cli("usage", "acme", "--json")[1])
    assert (report["used_ucr"], report["projected_ucr"], report["remaining_ucr"]) == (0, 0, 100 * M)
    assert report["by_model"] == report["by_action"] == report["by_member"] == {}


def test_usage_text_output(cli, ledger):
    code, out = cli("usage", "acme")
    assert code == 0
    assert "acme" in out and "used      1.75 credits in 3 requests" in out and "gpt-a" in out
    assert "cap       100 credits (98.25 left)" in out
    assert "% of" not in out  # the free plan includes nothing: no percentage to show
    report = json.loads(cli("usage", "acme", "--json")[1])
    assert f"on track for ${report['projected_usd']} this period" in out
    assert "top actions\n  chat" in out and "100.0%" in out


def test_usage_text_shows_the_share_of_included_and_the_projection_in_dollars(cli, ledger):
    code, out = cli("usage", "beta")
    assert code == 0
    assert "used      7 credits in 1 requests, 0.1% of 10,000 included" in out
    report = json.loads(cli("usage", "beta", "--json")[1])
    assert report["included_pct"] == 0.1
    assert f"on track for ${report['projected_usd']} this period" in out


def test_usage_of_unknown_customer_is_refused(cli):
    assert "nobody" in cli.fails("usage", "nobody", "--json")


# ------------------------------------------------------------------ ledger export


def test_ledger_export_jsonl_rows_have_exactly_the_contract_columns(cli, ledger):
    code, out = cli("ledger", "export")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["id"] for row in rows] == ["r0", "r1", "r2", "r3", "b1"]  # in creation order
    for row in rows:
        assert set(row) == set(EXPORT_COLUMNS)
    by_id = {row["id"]: row for row in rows}
    r1 = by_id["r1"]
    assert (r1["customer_id"], r1["member"], r1["action"], r1["model"], r1["provider"]) == ("acme", "alice", "chat", "gpt-a", "openai")
    assert (r1["prompt_tokens"], r1["completion_tokens"], r1["cached_tokens"]) == (100, 50, 10)
    assert (r1["credits_ucr"], r1["provider_cost_uusd"], r1["cache_hit"], r1["saved_ucr"], r1["stream"]) == (1_500_000, 42, False, 0, False)
    assert datetime.fromisoformat(r1["created_at"]) == ledger["start"]


def test_cache_hit_appears_in_the_export_with_zero_credits(cli, ledger):
    rows = {row["id"]: row for row in map(json.loads, cli("ledger", "export", "--format", "jsonl")[1].splitlines())}
    hit = rows["r3"]
    assert hit["cache_hit"] is True
    assert hit["credits_ucr"] == 0
    assert hit["saved_ucr"] == 1_500_000


def test_ledger_export_csv_header_and_rows(cli, ledger):
    code, out = cli("ledger", "export", "--format", "csv")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ",".join(EXPORT_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["id"] for row in rows] == ["r0", "r1", "r2", "r3", "b1"]
    assert rows[1]["credits_ucr"] == "1500000"
    assert rows[3]["credits_ucr"] == "0"


def test_ledger_export_customer_filter(cli, ledger):
    rows = [json.loads(line) for line in cli("ledger", "export", "--customer", "beta")[1].splitlines()]
    assert [row["id"] for row in rows] == ["b1"]
    csv_rows = list(csv.DictReader(io.StringIO(cli("ledger", "export", "--customer", "acme", "--format", "csv")[1])))
    assert {row["customer_id"] for row in csv_rows} == {"acme"}
    assert len(csv_rows) == 4


def test_ledger_export_of_empty_ledger(cli):
    assert cli("ledger", "export") == (0, "")
    assert cli("ledger", "export", "--format", "csv") == (0, ",".join(EXPORT_COLUMNS) + "\n")


def test_ledger_export_bad_options_are_refused(cli):
    cli.fails("ledger", "export", "--format", "xml")
    cli.fails("ledger", "export", "--customer", "bad id")


def run_outside_the_fixture(monkeypatch, capsys, env: dict[str, str], *argv: str) -> tuple[int, str]:
    """Run the CLI with a given environment (and no working ledger fixture); returns (code, stderr)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset_for_tests()
    try:
        code = main(list(argv), out=io.StringIO())
    finally:
        runtime.reset_for_tests()
    return code, capsys.readouterr().err


def test_an_unreachable_database_is_one_line_without_secrets_and_exit_1(tmp_path, monkeypatch, capsys):
    code, err = run_outside_the_fixture(monkeypatch, capsys, {
        "METERLINE_DATABASE_URL": "postgresql+psycopg://meterline:s3cret-pw@127.0.0.1:1/meterline",
        "METERLINE_CONFIG": str(tmp_path / "absent.yaml"),
    }, "customers", "list")
    assert code == 1
    assert err.count("\n") == 1 and "database error (OperationalError)" in err
    assert "s3cret-pw" not in err and "Traceback" not in err


def test_a_bad_environment_value_is_exit_2_naming_the_variable(tmp_path, monkeypatch, capsys):
    code, err = run_outside_the_fixture(monkeypatch, capsys, {
        "METERLINE_KEY_CACHE_SECONDS": "soon", "METERLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }, "customers", "list")
    assert code == 2
    assert err.startswith("environment: METERLINE_KEY_CACHE_SECONDS:") and err.count("\n") == 1


# ------------------------------------------------------------------ delivery commands (the Stripe paths
# themselves run against the emulator in test_delivery_stripe.py and test_stripe_setup.py)


def test_outbox_list_shows_queue_health_and_events(cli, ledger):
    code, out = cli("outbox", "list")
    assert code == 0
    first, *rows = out.splitlines()
    assert first.startswith("outbox: 4 pending; oldest waiting")
    assert sorted(row.split("\t")[0] for row in rows) == ["b1", "r0", "r1", "r2"]  # the cache hit makes no event
    code, out = cli("outbox", "list", "--customer", "beta", "--json")
    [event] = [json.loads(line) for line in out.splitlines()]
    assert (event["id"], event["value_ucr"], event["status"], event["attempts"]) == ("b1", 7_000_000, "pending", 0)


def test_delivery_commands_refuse_bad_input(cli, ledger, monkeypatch):
    assert "give event ids or --all-dead" in cli.fails("outbox", "retry")
    assert "give event ids or --all-dead" in cli.fails("outbox", "retry", "r1", "--all-dead")
    assert "invalid choice" in cli.fails("outbox", "list", "--status", "lost")
    assert "positive whole number" in cli.fails("outbox", "list", "--limit", "0")
    assert "invalid Stripe customer id" in cli.fails("customers", "set-stripe", "acme", "acct_123")
    assert "unknown customer 'nobody'" in cli.fails("customers", "set-stripe", "nobody", "cus_123")
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    monkeypatch.delenv("METERLINE_SINK", raising=False)
    runtime.reset_for_tests()
    assert "no sink configured" in cli.fails("relay", "--once")
    assert "STRIPE_API_KEY is not set" in cli.fails("stripe", "setup")
    monkeypatch.setenv("METERLINE_SINK", "openmeter")
    runtime.reset_for_tests()
    assert "METERLINE_OPENMETER_URL" in cli.fails("relay", "--once")


def test_outbox_retry_reports_what_it_could_not_requeue(cli, ledger):
    code, out = cli("outbox", "retry", "r1")  # pending, not dead: nothing to do
    assert (code, out) == (0, "0 event(s) queued for delivery\n")
    assert "were not dead or held" in cli.stderr()


def test_set_stripe_links_the_customer(cli, ledger):
    code, out = cli("customers", "set-stripe", "acme", "cus_acme1")
    assert code == 0 and "acme is cus_acme1 at Stripe; 0 held meter event(s) queued" in out
    assert store.get_customer(cli.engine, "acme").stripe_customer_id == "cus_acme1"


# ------------------------------------------------------------------ limits, terms, breaker, kill switch


def test_limits_set_and_show_feed_the_usage_report(cli, ledger):
    code, out = cli("limits", "set", "beta", "--hard-credits", "50", "--soft", "50,80,100",
                    "--notify-email", "ops@beta.example")
    assert code == 0
    stored = json.loads(out)
    assert (stored["hard_limit_ucr"], stored["soft_thresholds_pct"], stored["cap_ucr"]) == (50 * M, [50, 80, 100], 50 * M)
    assert json.loads(cli("limits", "show", "beta")[1]) == stored
    report = json.loads(cli("usage", "beta", "--json")[1])
    assert (report["hard_limit_ucr"], report["cap_ucr"], report["remaining_ucr"]) == (50 * M, 50 * M, 43 * M)
    cleared = json.loads(cli("limits", "set", "beta", "--hard-credits", "none", "--soft", "default")[1])
    assert (cleared["hard_limit_ucr"], cleared["soft_thresholds_pct"], cleared["effective_soft_thresholds_pct"]) == (
        None, None, [80])


def test_limits_set_refuses_bad_input_in_one_line(cli, ledger):
    assert cli.fails("limits", "set", "beta") == ("nothing to change: give --soft, --hard-credits, --hard-usd, "
                                                  "--block-overage, --notify-email or --notify-webhook-url")
    assert cli.fails("limits", "set", "beta", "--soft", "80,lots") == (
        "soft_thresholds_pct.1: Input should be a valid integer")
    assert cli.fails("limits", "set", "beta", "--hard-credits", "-3") == (
        "expected credits as a decimal number, e.g. 500 or 2.5, got '-3'")
    assert cli.fails("limits", "set", "ghost", "--block-overage", "on") == "No customer 'ghost'."
    assert cli.fails("limits", "set", "beta", "--hard-usd", "10") == (
        "The pro plan charges nothing for usage, so a limit in dollars cannot be reached; set hard_limit_ucr instead.")


def test_customers_set_gives_own_terms_and_a_period_anchor(cli, ledger):
    code, out = cli("customers", "set", "beta", "--included-credits", "5", "--cap-credits", "8",
                    "--anchor", "2026-01-15T09:30:00Z")
    assert code == 0 and "monthly from 2026-01-15T09:30:00+00:00" in out
    report = json.loads(cli("usage", "beta", "--json")[1])
    assert (report["included_ucr"], report["cap_ucr"]) == (5 * M, 8 * M)
    start = datetime.fromisoformat(report["period_start"])
    assert (start.day, start.hour, start.minute) == (15, 9, 30)
    assert cli("customers", "set", "beta", "--clear-terms")[0] == 0
    assert json.loads(cli("usage", "beta", "--json")[1])["cap_ucr"] is None
    assert cli.fails("customers", "set", "beta", "--plan", "gold").startswith("unknown plan 'gold'")
    assert "expected an ISO date and time" in cli.fails("customers", "set", "beta", "--anchor", "next tuesday")


def test_breaker_trip_reset_and_status_are_audited(cli, ledger):
    tripped = json.loads(cli("breaker", "trip", "acme", "--why", "leaked key", "--by", "alice")[1])
    assert (tripped["status"], tripped["by"], tripped["reason"]) == ("open", "cli:alice", "leaked key")
    assert json.loads(cli("usage", "acme", "--json")[1])["breaker"] == "open"
    cli("breaker", "reset", "acme", "--why", "rotated", "--by", "bob")
    status = json.loads(cli("breaker", "status", "acme")[1])
    assert status["status"] == "closed"
    assert [(event["after"], event["by"], event["why"]) for event in status["events"]] == [
        ("closed", "cli:bob", "rotated"), ("open", "cli:alice", "leaked key")]
    assert cli.fails("breaker", "trip", "ghost") == "unknown customer 'ghost'"


def test_the_global_overage_block(cli):
    assert cli("overage-block", "status")[1] == "global overage block is off\n"
    assert cli("overage-block", "on")[1] == "global overage block is on: no customer is billed past its included quota\n"
    assert cli("overage-block", "status")[1].startswith("global overage block is on")
    assert cli("overage-block", "off")[0] == 0


def test_demo_prints_snippets_that_use_the_key_it_saved(cli, tmp_path):
    key_file = tmp_path / "demo-key"
    code, out = cli("demo", "--key-file", str(key_file), "--port", "4111")
    secret = key_file.read_text().strip()
    assert code == 0 and secret.startswith("mk_")
    assert f'curl http://127.0.0.1:4111/v1/chat/completions \\\n    -H "Authorization: Bearer {secret}"' in out
    assert f'curl -X PUT http://127.0.0.1:4111/meterline/v1/limits -H "Authorization: Bearer {secret}" \\' in out
    assert "/meterline/v1/preview" in out
    assert cli("demo", "--key-file", str(key_file))[0] == 0 and key_file.read_text().strip() == secret  # reused


@pytest.mark.parametrize("master, shown", [("sk-meterline-demo-master", "sk-meterline-demo-master"),
                                           ("sk-a-real-operator-key", "<your master key>")])
def test_demo_says_how_to_open_the_console_and_never_prints_a_real_master_key(cli, tmp_path, monkeypatch, master,
                                                                              shown):
    monkeypatch.setenv("LITELLM_MASTER_KEY", master)
    code, out = cli("demo", "--key-file", str(tmp_path / "demo-key"), "--port", "4111")
    assert code == 0 and f"LITELLM_MASTER_KEY={shown} .venv/bin/meterline tui --url http://127.0.0.1:4111" in out
    assert "sk-a-real-operator-key" not in out

"""The pricing changelog: the snapshot diff by table, who a change touches, `meterline pricing change`
with meterline.yaml edited between calls, processes recording at once, and the real proxy stamping its
version on every ledger row and serving the changelog to anyone (JSON and page)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import httpx
import openai
import pytest
import yaml

from plugin import runtime
from plugin.ledger import pricing_versions, store
from plugin.ledger.models import PricingVersion
from plugin.rules.pricing_log import (
    Change,
    CustomerPlan,
    affected_customers,
    config_of,
    diff,
    flatten,
    repriced_models,
    snapshot_of,
)
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.runtime import build_price_book
from plugin.services.pricing import CHANGED_AT_START_UP, record, running_version
from plugin.settings import MeterlineConfig, Settings
from tests.support.browser import Dom, dump_dom
from tests.support.proxy import METERLINE_YAML, run_proxy
from tests.test_cli import Cli
from tests.test_proxy_metering import ask, expected_ucr

BASE = {
    "pricing": {"tokens_per_credit": "1000", "models": {"gpt-4o": {"basis": "cost", "markup": "0.5"}}},
    "prices": {"gpt-4o": {"input": "2.50", "output": "10"}},
    "plans": {"pro": {"included_credits": "1000", "overage_usd_per_credit": "0.002"},
              "tiered": {"overage_tiers": [{"up_to_credits": "1000", "usd_per_credit": "0.004"},
                                           {"usd_per_credit": "0.001"}]}},
}


def snap(changes: dict | None = None) -> dict:
    """BASE with some sections replaced (a shallow merge per section), as a snapshot."""
    config = {**BASE, **(changes or {})}
    return snapshot_of(MeterlineConfig.model_validate(config))


def fields(changes: list[Change]) -> list[tuple[str, str | None, str | None]]:
    return [(change.field, change.old, change.new) for change in changes]


# ------------------------------------------------------------------------------ the diff


def test_a_snapshot_holds_every_field_as_exact_decimal_strings():
    found = snap()
    assert found["plans"]["pro"]["overage_usd_per_credit"] == "0.002"
    assert found["plans"]["pro"]["cap_credits"] is None and found["plans"]["pro"]["metered"] is True
    assert found["pricing"]["markup"] == "0.3" and found["pricing"]["models"]["gpt-4o"]["markup"] == "0.5"
    assert found["prices"]["gpt-4o"] == {"input": "2.5", "output": "10", "cached_input": None, "audio_input": None,
                                         "audio_output": None, "image_input": None}
    assert flatten(found)[("plans", "tiered", "overage_tiers", "1", "usd_per_credit")] == "0.001"
    assert snapshot_of(config_of(found)) == found  # a version's configuration is rebuilt from its snapshot


@pytest.mark.parametrize("edit, expected", [
    ({"plans": {**BASE["plans"], "pro": {"included_credits": "1000", "overage_usd_per_credit": "0.0025"}}},
     [("plans.pro.overage_usd_per_credit", "0.002", "0.0025")]),
    ({"pricing": {"tokens_per_credit": "1000", "models": {"gpt-4o": {"basis": "cost", "markup": "0.45"}}}},
     [("pricing.models.gpt-4o.markup", "0.5", "0.45")]),
    ({"pricing": {"tokens_per_credit": "800", "models": {"gpt-4o": {"basis": "cost", "markup": "0.5"}},
                  "weights": {"output": "3"}}},
     [("pricing.tokens_per_credit", "1000", "800"), ("pricing.weights.output", None, "3")]),
    ({"prices": {"gpt-4o": {"input": "2.5", "output": "10"}}}, []),  # 2.50 == 2.5: the same price
    ({"prices": {}}, [("prices.gpt-4o.input", "2.5", None), ("prices.gpt-4o.output", "10", None)]),
    ({"plans": {**BASE["plans"], "team": {"included_credits": "5000", "metered": False}}},
     [("plans.team.included_credits", None, "5000"), ("plans.team.metered", None, "false")]),
    ({"plans": {**BASE["plans"], "pro": {"included_credits": "1000", "overage_usd_per_credit": "0.002",
                                         "metered": False}}},
     [("plans.pro.metered", "true", "false")]),
    ({"plans": {**BASE["plans"], "tiered": {"overage_tiers": [{"up_to_credits": "2000", "usd_per_credit": "0.004"},
                                                              {"up_to_credits": "9000", "usd_per_credit": "0.002"},
                                                              {"usd_per_credit": "0.001"}]}}},
     [("plans.tiered.overage_tiers.0.up_to_credits", "1000", "2000"),
      ("plans.tiered.overage_tiers.1.up_to_credits", None, "9000"),
      ("plans.tiered.overage_tiers.1.usd_per_credit", "0.001", "0.002"),
      ("plans.tiered.overage_tiers.2.usd_per_credit", None, "0.001")]),
])
def test_diff_names_each_changed_leaf_by_its_dotted_path(edit, expected):
    assert fields(diff(snap(), snap(edit))) == expected


def test_the_baseline_has_no_changes_and_an_unchanged_config_none():
    assert diff(None, snap()) == [] and diff(snap(), snap()) == []


def test_a_field_an_older_snapshot_lacks_is_no_change_while_unset():
    old = snap()
    for plan in old["plans"].values():
        del plan["max_output_tokens"]  # as a snapshot taken before the field existed
    assert diff(old, snap()) == []
    limited = {"plans": {**BASE["plans"], "pro": {**BASE["plans"]["pro"], "max_output_tokens": 4096}}}
    assert fields(diff(old, snap(limited))) == [("plans.pro.max_output_tokens", None, "4096")]


# ------------------------------------------------------------------------------ who is affected


def test_plan_changes_touch_its_customers_unless_their_own_terms_set_the_field():
    changes = diff(snap(), snap({"plans": {**BASE["plans"], "pro": {"included_credits": "2000",
                                                                    "overage_usd_per_credit": "0.002"}}}))
    customers = {"a": CustomerPlan("pro"), "b": CustomerPlan("pro", frozenset({"included_credits"})),
                 "c": CustomerPlan("pro", frozenset({"overage_usd_per_credit"})), "d": CustomerPlan("tiered")}
    assert affected_customers(changes, customers, {"d": {"gpt-4o"}}, set()) == {"a", "c"}
    removed = diff(snap(), snap({"plans": {"pro": BASE["plans"]["pro"]}}))  # plan `tiered` removed
    assert affected_customers(removed, customers, {}, set()) == {"d"}


def test_price_changes_touch_the_recent_users_of_the_models_they_reprice():
    old, new_markup = snap(), snap({"pricing": {"tokens_per_credit": "1000",
                                                "models": {"gpt-4o": {"basis": "cost", "markup": "0.6"}}}})
    new_price_of_token_model = snap({"prices": {**BASE["prices"], "mini": {"input": "0.15", "output": "0.6"}}})
    models = {"gpt-4o", "mini"}

    def books(before, after):
        return build_price_book(config_of(before)), build_price_book(config_of(after))

    assert repriced_models(models, *books(old, new_markup)) == {"gpt-4o"}
    # a provider price of a tokens-basis model changes the cost, not what customers pay
    assert repriced_models(models, *books(old, new_price_of_token_model)) == set()
    global_rate = snap({"pricing": {**BASE["pricing"], "tokens_per_credit": "500"}})
    assert repriced_models(models, *books(old, global_rate)) == {"mini"}  # gpt-4o is on the cost basis
    used = {"a": {"gpt-4o"}, "b": {"mini"}, "c": {"mini", "gpt-4o"}}
    changes = diff(old, new_markup)
    assert affected_customers(changes, {}, used, {"gpt-4o"}) == {"a", "c"}


def test_the_changelog_counts_affected_customers_from_plans_and_recent_usage(tmp_path):
    meterline = runtime.Meterline(settings=Settings(database_url=f"sqlite:///{tmp_path / 'l.db'}", relay=False),
                                  config=MeterlineConfig())
    engine = meterline.engine
    now = datetime(2026, 5, 20, 12, tzinfo=UTC)
    for customer, plan in (("p1", "pro"), ("p2", "pro"), ("t1", "tiered"), ("t2", "tiered")):
        store.add_customer(engine, customer, plan)
    store.write_records(engine, [BillingRecord(LedgerRow(id=f"r{n}", customer_id=customer, model="gpt-4o",
                                                         credits_ucr=1, created_at=at), meter=False)
                                 for n, (customer, at) in enumerate([("t1", now - timedelta(days=3)),
                                                                     ("p1", now - timedelta(days=45))])])
    base = MeterlineConfig.model_validate(BASE)
    assert record(engine, base, "baseline", now)[0].customers_affected == 0
    both = MeterlineConfig.model_validate({**BASE, "pricing": {"models": {"gpt-4o": {"basis": "cost",
                                                                                       "markup": "0.6"}}},
                                           "plans": {**BASE["plans"], "pro": {"included_credits": "900"}}})
    entry, new = record(engine, both, "cheaper pro, dearer gpt-4o", now)
    # p1, p2 by their plan; t1 called gpt-4o 3 days ago (p1's call was 45 days ago, but it is on pro anyway)
    assert new and entry.version == 2 and entry.customers_affected == 3
    meterline.close()


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, database_url):
    """The CLI over an empty ledger (SQLite and PostgreSQL) and a meterline.yaml the test edits."""
    config = tmp_path / "meterline.yaml"
    config.write_text(yaml.safe_dump(BASE))
    monkeypatch.setenv("METERLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    runtime.reset_for_tests()
    commands = Cli(capsys)
    commands.config = config
    yield commands
    runtime.reset_for_tests()


def edit_config(cli, sections: dict) -> None:
    cli.config.write_text(yaml.safe_dump({**BASE, **sections}))
    runtime.reset_for_tests()  # a new CLI process reads meterline.yaml again


def test_pricing_change_records_a_baseline_then_changes_and_says_when_nothing_changed(cli):
    assert cli.fails("pricing", "change", "--reason", "   ") == "meterline pricing change: --reason must say why " \
                                                               "(customers read it)"
    code, out = cli("pricing", "change", "--reason", "launch prices", "--json")
    baseline = json.loads(out)
    assert code == 0 and baseline["changed"] and baseline["entry"]["version"] == 1
    assert baseline["entry"]["changes"] == [] and baseline["entry"]["customers_affected"] == 0
    assert cli("pricing", "change", "--reason", "again") == (0, "nothing changed since the last recorded pricing: "
                                                                "no entry written\n")
    assert cli("pricing", "change", "--reason", "again", "--json") == (0, '{"changed": false, "entry": null}\n')
    edit_config(cli, {"plans": {**BASE["plans"], "pro": {"included_credits": "1000",
                                                         "overage_usd_per_credit": "0.0025"}}})
    code, out = cli("pricing", "change", "--reason", "pro overage up a quarter")
    assert code == 0 and out.splitlines() == ["version 2 recorded: 1 change(s), 0 customer(s) affected",
                                              "  plans.pro.overage_usd_per_credit: 0.002 -> 0.0025"]
    code, out = cli("pricing", "changelog", "--json")
    log = json.loads(out)
    assert [entry["version"] for entry in log["entries"]] == [2, 1]
    assert log["entries"][0]["reason"] == "pro overage up a quarter"
    assert log["entries"][0]["changes"] == [{"field": "plans.pro.overage_usd_per_credit", "old": "0.002",
                                             "new": "0.0025"}]
    assert [row.version for row in pricing_versions.every_version(cli.engine)] == [2, 1]


def test_processes_recording_at_once_record_one_version(database_url):
    """Eight start-ups racing: one baseline, then one version for the edited config, whoever wins."""
    engine = store.make_engine(database_url)
    configs = [MeterlineConfig.model_validate(BASE),
               MeterlineConfig.model_validate({**BASE, "pricing": {"tokens_per_credit": "900"}})]
    for round_number, config in enumerate(configs, start=1):
        start = threading.Barrier(8)
        found: list[int] = []

        def start_up(config=config, start=start, found=found):
            start.wait(timeout=30)
            found.append(running_version(engine, config, datetime.now(UTC)))

        threads = [threading.Thread(target=start_up) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert found == [round_number] * 8
    assert [entry.version for entry in pricing_versions.every_version(engine)] == [2, 1]
    assert pricing_versions.add(engine, PricingVersion(version=2, at=datetime.now(UTC), reason="late", snapshot="{}",
                                                       changes="[]")) is False
    engine.dispose()


# ------------------------------------------------------------------------------ the proxy


@pytest.mark.proxy
def test_the_proxy_stamps_its_version_on_rows_and_serves_the_changelog_to_anyone(tmp_path, upstream, capsys,
                                                                                  monkeypatch):
    workdir, database_url = tmp_path / "proxy", f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = store.make_engine(database_url)
    store.add_customer(engine, "acme", "pro")
    _, key = store.create_key(engine, "acme")

    def one_call(proxy, tag: str) -> LedgerRow:
        client = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        client.chat.completions.create(model="test-model", messages=ask(f"[[p=100 c=10 tag={tag}]]"))
        [row] = [row for row in store.ledger_rows(engine, "acme") if row.id not in seen]
        seen.add(row.id)
        return row

    seen: set[str] = set()
    with run_proxy(workdir, upstream.base_url, database_url) as proxy:
        first = one_call(proxy, "one")
    assert first.price_version == 1 and first.credits_ucr == expected_ucr(100, 10)
    # the operator records an edit with the CLI before restarting: the proxy then prices with that version
    edited = {**METERLINE_YAML, "pricing": {**METERLINE_YAML["pricing"], "weights": {"input": "1",
                                                                                     "cached_input": "0.1",
                                                                                     "output": "5"}}}
    (workdir / "meterline.yaml").write_text(yaml.safe_dump(edited))
    monkeypatch.setenv("METERLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("METERLINE_CONFIG", str(workdir / "meterline.yaml"))
    runtime.reset_for_tests()
    try:
        assert Cli(capsys)("pricing", "change", "--reason", "output <b>dearer</b>")[0] == 0
    finally:
        runtime.reset_for_tests()
    with run_proxy(workdir, upstream.base_url, database_url, meterline_yaml=edited) as proxy:
        second = one_call(proxy, "two")
    assert second.price_version == 2 and second.credits_ucr == 100 * 1000 + 10 * 5000
    # edited again and restarted without `pricing change`: the proxy records the version itself
    unrecorded = {**edited, "plans": {**edited["plans"], "pro": {"included_credits": 2000}}}
    with run_proxy(workdir, upstream.base_url, database_url, meterline_yaml=unrecorded) as proxy:
        third = one_call(proxy, "three")
        anyone = httpx.Client(base_url=proxy.base_url + "/meterline/v1", timeout=30)  # no key at all
        answer = anyone.get("/pricing/changelog")
        page = anyone.get("/pricing/changelog.html")
        rendered = Dom(dump_dom(proxy.base_url + "/meterline/v1/pricing/changelog.html"))  # as a browser shows it
    assert third.price_version == 3
    assert answer.status_code == 200
    entries = answer.json()["entries"]
    assert [(entry["version"], entry["reason"]) for entry in entries] == [
        (3, CHANGED_AT_START_UP), (2, "output <b>dearer</b>"),
        (1, "baseline recorded at start-up: no pricing had been recorded yet")]
    assert entries[0]["changes"] == [{"field": "plans.pro.included_credits", "old": "1000", "new": "2000"}]
    assert entries[0]["customers_affected"] == 1 and entries[1]["customers_affected"] == 1  # acme: pro, test-model
    assert entries[1]["changes"] == [{"field": "pricing.weights.output", "old": "4", "new": "5"}]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "output &lt;b&gt;dearer&lt;/b&gt;" in html and "<b>dearer" not in html  # the reason is escaped
    assert html.index("Version 3") < html.index("Version 2") < html.index("Version 1")
    assert "pricing.weights.output" in html and "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    assert rendered.text("version-2").startswith("Version 2") and "output <b>dearer</b>" in rendered.text("version-2")
    assert not rendered.all("b")  # the operator's markup is text, never an element
    assert rendered.table("changes-3") == [["plans.pro.included_credits", "1000", "2000"]]
    assert rendered.table("changes-2") == [["pricing.weights.output", "4", "5"]]
    assert "The prices in force when this log began." in rendered.text("version-1")
    engine.dispose()


def test_fractions_stay_exact_through_a_snapshot():
    config = MeterlineConfig.model_validate({"plans": {"pro": {"overage_usd_per_credit": "0.0000001"}}})
    found = snapshot_of(config)
    assert found["plans"]["pro"]["overage_usd_per_credit"] == "0.0000001"
    assert config_of(found).plans["pro"].overage_usd_per_credit == Fraction(1, 10_000_000)

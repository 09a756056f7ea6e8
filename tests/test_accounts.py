"""Customer controls in the database (limits, terms, switches, notices, breakers), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from plugin.ledger import accounts, store
from plugin.ledger.store import StoreError, make_engine
from plugin.rules.breaker import CLOSED, BreakerStatus, reset, trip
from plugin.rules.limits import Limits
from plugin.settings import TermsOverride

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    store.add_customer(engine, "acme", "pro")
    yield engine
    engine.dispose()


def test_limits_change_only_what_is_given_and_null_clears(engine):
    assert accounts.get_limits(engine, "acme") == Limits()
    stored = accounts.put_limits(engine, "acme", {"soft_thresholds_pct": [100, 50, 50], "hard_limit_ucr": 5},
                                 by="customer:acme")
    assert (stored.soft_thresholds_pct, stored.hard_limit_ucr) == ((50, 100), 5)
    stored = accounts.put_limits(engine, "acme", {"hard_limit_usd": "25.50"}, by="operator")  # replaces the other kind
    assert (stored.hard_limit_ucr, stored.hard_limit_usd, stored.soft_thresholds_pct) == (None, Fraction("25.5"),
                                                                                         (50, 100))
    stored = accounts.put_limits(engine, "acme", {"soft_thresholds_pct": None, "block_overage": True}, by="operator")
    assert (stored.soft_thresholds_pct, stored.block_overage) == (None, True)
    with pytest.raises(StoreError, match="unknown customer"):
        accounts.put_limits(engine, "ghost", {"hard_limit_ucr": 5}, by="operator")


def test_terms_merge_and_anchor_show_in_the_profile(engine):
    accounts.set_terms(engine, "acme", terms=TermsOverride(included_credits=Fraction(500)))
    accounts.set_terms(engine, "acme", terms=TermsOverride(overage_usd_per_credit=Fraction("0.0015")),
                       period_anchor=NOW)
    profile = accounts.load_profile(engine, "acme")
    assert profile.terms == TermsOverride(included_credits=Fraction(500), overage_usd_per_credit=Fraction("0.0015"))
    assert profile.period_anchor == NOW
    accounts.set_terms(engine, "acme", clear_terms=True, plan="free")
    assert (accounts.load_profile(engine, "acme").terms, accounts.load_profile(engine, "acme").plan) == (None, "free")


def test_switches(engine):
    assert accounts.get_switch(engine, accounts.GLOBAL_OVERAGE_BLOCK) is False
    accounts.set_switch(engine, accounts.GLOBAL_OVERAGE_BLOCK, True, by="operator")
    assert accounts.get_switch(engine, accounts.GLOBAL_OVERAGE_BLOCK) is True


def test_a_notice_is_claimed_once_even_by_racing_proxies(engine):
    wins: list[bool] = []
    threads = [threading.Thread(target=lambda: wins.append(accounts.claim_notice(engine, "acme", "p1", 80)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(wins) == [False] * 7 + [True]
    assert accounts.claim_notice(engine, "acme", "p1", 100) and accounts.claim_notice(engine, "acme", "p2", 80)


def test_breaker_moves_are_stored_with_their_audit_row_and_compare_and_set(engine):
    opened, transition = trip(CLOSED, now=NOW, by="cli:alice", why="leaked key")
    assert accounts.save_breaker(engine, "acme", opened, transition, expected=BreakerStatus.CLOSED)
    # a second proxy that saw the same spike finds it open already: nothing stored, no second audit row
    assert not accounts.save_breaker(engine, "acme", opened, transition, expected=BreakerStatus.CLOSED)
    assert accounts.get_breaker(engine, "acme") == opened
    closed, back = reset(opened, now=NOW, by="cli:bob", why="rotated")
    accounts.save_breaker(engine, "acme", closed, back)
    assert [(event.after, event.by, event.why) for event in accounts.breaker_events(engine, "acme")] == [
        ("closed", "cli:bob", "rotated"), ("open", "cli:alice", "leaked key")]
    assert accounts.open_breakers(engine) == []

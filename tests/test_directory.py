"""The authentication directory: keys remembered for a bounded time, unknown keys never."""

from __future__ import annotations

from plugin.ledger import store
from plugin.ledger.directory import Directory
from plugin.ledger.store import make_engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_revoked_key_is_refused_once_its_memory_expires(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.add_customer(engine, "acme", "pro")
    key_id, secret = store.create_key(engine, "acme")
    clock = Clock()
    directory = Directory(engine, ttl=5.0, clock=clock)

    assert not directory.knows_key(secret)
    assert directory.customer_for_secret(secret) == "acme"
    assert directory.knows_key(secret)

    store.revoke_key(engine, key_id)
    clock.now += 4.9
    assert directory.customer_for_secret(secret) == "acme"  # still remembered: within the documented TTL
    clock.now += 0.2
    assert not directory.knows_key(secret)
    assert directory.customer_for_secret(secret) is None


def test_unknown_keys_are_not_remembered_so_new_keys_work_at_once(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.add_customer(engine, "acme", "pro")
    directory = Directory(engine, ttl=60.0, clock=Clock())
    assert directory.customer_for_secret("mk_unknown") is None
    assert not directory.knows_key("mk_unknown")
    _, secret = store.create_key(engine, "acme")
    assert directory.customer_for_secret(secret) == "acme"


def test_customers_are_remembered_once_seen_and_unknown_ones_are_not(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    directory = Directory(engine)
    assert not directory.customer_exists("acme")
    assert not directory.knows_customer("acme")
    store.add_customer(engine, "acme", "pro")
    assert directory.customer_exists("acme")
    assert directory.knows_customer("acme")


def test_the_key_memory_is_bounded(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.add_customer(engine, "acme", "pro")
    secrets = [store.create_key(engine, "acme")[1] for _ in range(5)]
    directory = Directory(engine, max_keys=3, clock=Clock())
    for secret in secrets:
        directory.customer_for_secret(secret)
    assert [directory.knows_key(secret) for secret in secrets] == [False, False, True, True, True]


def test_a_stale_profile_is_still_at_hand_until_it_is_reloaded(tmp_path):
    """Admission uses a profile past its ttl once more while a fresh copy is read in the background."""
    from plugin.ledger import accounts

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.add_customer(engine, "acme", "free")
    clock = Clock()
    directory = Directory(engine, ttl=5.0, clock=clock)
    assert directory.reload_profile("acme").plan == "free"
    accounts.set_terms(engine, "acme", plan="pro")
    clock.now += 6
    assert directory.cached_profile("acme") is None
    assert directory.cached_profile("acme", stale_ok=True).plan == "free"
    assert directory.reload_profile("acme").plan == "pro"
    assert directory.cached_profile("acme").plan == "pro"
    assert directory.cached_profile("ghost", stale_ok=True) is None
    accounts.set_switch(engine, accounts.GLOBAL_OVERAGE_BLOCK, True, by="test")
    assert directory.switch(accounts.GLOBAL_OVERAGE_BLOCK) is True
    accounts.set_switch(engine, accounts.GLOBAL_OVERAGE_BLOCK, False, by="test")
    clock.now += 6
    assert directory.switch(accounts.GLOBAL_OVERAGE_BLOCK, stale_ok=True) is True  # the old value, no read
    assert not directory.knows_switch(accounts.GLOBAL_OVERAGE_BLOCK)
    assert directory.switch(accounts.GLOBAL_OVERAGE_BLOCK) is False
    engine.dispose()

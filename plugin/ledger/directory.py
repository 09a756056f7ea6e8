"""Who-is-who lookups for authentication, remembered briefly so most requests skip the database.

A key resolved in the last `ttl` seconds is answered from memory: revoking a key takes effect
within `ttl` seconds (5 by default) in every running proxy. Unknown keys are never remembered,
so a key created a moment ago works at once. Customers are never deleted, so a customer seen
once is remembered for good.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import Engine

from plugin.ledger import accounts, store
from plugin.ledger.accounts import Profile
from plugin.rules.breaker import BreakerState


class Directory:
    def __init__(self, engine: Engine, ttl: float = 5.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl
        self._max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._customers: set[str] = set()
        self._profiles: dict[str, tuple[Profile, float]] = {}
        self._switches: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def knows_key(self, secret: str | None) -> bool:
        """True when this key resolves from memory, without touching the database."""
        return bool(secret) and self._cached(store.hash_key(secret)) is not None

    def knows_customer(self, customer_id: str | None) -> bool:
        return customer_id is not None and customer_id in self._customers

    def customer_for_secret(self, secret: str) -> str | None:
        digest = store.hash_key(secret)
        customer = self._cached(digest)
        if customer is None:
            customer = store.customer_for_secret(self._engine, secret)
            if customer is not None:
                with self._lock:
                    self._keys[digest] = (customer, self._clock() + self._ttl)
                    while len(self._keys) > self._max_keys:
                        self._keys.popitem(last=False)
        return customer

    def customer_exists(self, customer_id: str) -> bool:
        if customer_id in self._customers:
            return True
        if store.get_customer(self._engine, customer_id) is None:
            return False
        self._customers.add(customer_id)
        return True

    def cached_profile(self, customer_id: str, *, stale_ok: bool = False) -> Profile | None:
        """The customer's profile if remembered (and fresh, unless `stale_ok`), without touching the database."""
        with self._lock:
            entry = self._profiles.get(customer_id)
        if entry is None:
            return None
        return entry[0] if stale_ok or self._clock() < entry[1] else None

    def reload_profile(self, customer_id: str) -> Profile | None:
        """Read the customer's plan, terms, limits and breaker from the database and remember them for
        `ttl` seconds: a change made in another process applies here within that time (changes made
        here apply at once: `forget`)."""
        profile = accounts.load_profile(self._engine, customer_id)
        if profile is None:
            return None
        with self._lock:
            self._profiles[customer_id] = (profile, self._clock() + self._ttl)
        return profile

    def forget(self, customer_id: str) -> None:
        """Drop what is remembered about a customer, after changing it."""
        with self._lock:
            self._profiles.pop(customer_id, None)

    def remember_breaker(self, customer_id: str, state: BreakerState) -> None:
        """A breaker this process just moved: later requests here see it at once."""
        with self._lock:
            entry = self._profiles.get(customer_id)
            if entry is not None:
                self._profiles[customer_id] = (replace(entry[0], breaker=state), entry[1])

    def switch(self, name: str, *, stale_ok: bool = False) -> bool:
        """An operator switch (see plugin.ledger.accounts), remembered for `ttl` seconds (any age with
        `stale_ok`, for callers that refresh it in the background)."""
        with self._lock:
            entry = self._switches.get(name)
        if entry is not None and (stale_ok or self._clock() < entry[1]):
            return entry[0]
        enabled = accounts.get_switch(self._engine, name)
        with self._lock:
            self._switches[name] = (enabled, self._clock() + self._ttl)
        return enabled

    def knows_switch(self, name: str, *, stale_ok: bool = False) -> bool:
        """True when `switch(name)` can answer from memory (fresh, or any age with `stale_ok`)."""
        with self._lock:
            entry = self._switches.get(name)
        return entry is not None and (stale_ok or self._clock() < entry[1])

    def forget_switch(self, name: str) -> None:
        with self._lock:
            self._switches.pop(name, None)

    def _cached(self, digest: str) -> str | None:
        with self._lock:
            entry = self._keys.get(digest)
            if entry is None:
                return None
            customer, expires = entry
            if self._clock() >= expires:
                del self._keys[digest]
                return None
            return customer

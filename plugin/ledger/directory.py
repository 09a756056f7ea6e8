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

from sqlalchemy import Engine

from plugin.ledger import store


class Directory:
    def __init__(self, engine: Engine, ttl: float = 5.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl
        self._max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._customers: set[str] = set()
        self._plans: dict[str, tuple[str, float]] = {}
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

    def cached_plan(self, customer_id: str) -> str | None:
        """The customer's plan if remembered and fresh, without touching the database."""
        with self._lock:
            entry = self._plans.get(customer_id)
        return entry[0] if entry is not None and self._clock() < entry[1] else None

    def plan_of(self, customer_id: str) -> str | None:
        """The customer's plan, remembered for `ttl` seconds like keys (a plan change applies within it)."""
        with self._lock:
            entry = self._plans.get(customer_id)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        customer = store.get_customer(self._engine, customer_id)
        if customer is None:
            return None
        with self._lock:
            self._plans[customer_id] = (customer.plan, self._clock() + self._ttl)
        return customer.plan

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

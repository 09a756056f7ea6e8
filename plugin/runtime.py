"""Wiring: settings + meterline.yaml -> engine, price book, ledger writer. One per process.

The LiteLLM hooks module is executed by LiteLLM once per reference in the config (it loads it
by file path), so process-wide state lives here, in a normally imported module.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine

from plugin import metrics
from plugin.baselines import Baselines
from plugin.counters.base import CounterStore
from plugin.counters.redis import RedisCounterStore
from plugin.counters.sql import SqlCounterStore
from plugin.ledger.accounts import GLOBAL_OVERAGE_BLOCK, Profile
from plugin.ledger.checkpoint import WalCheckpointer
from plugin.ledger.directory import Directory
from plugin.ledger.fleet_usage import FleetUsage
from plugin.ledger.rollups import billed_between
from plugin.ledger.store import make_engine
from plugin.ledger.writer import LedgerWriter
from plugin.notify import Notice, Notifier, SmtpConfig
from plugin.outbox.relay import Relay, RelayOptions, RelayThread
from plugin.outbox.retry import RetryPolicy
from plugin.rules.breaker import BreakerConfig
from plugin.rules.limits import effective_ceiling
from plugin.rules.plans import Period, anchored_month, calendar_month, credits_to_ucr
from plugin.rules.policy import Ceiling, Estimate
from plugin.rules.pricing import (
    PER_MILLION,
    UCR_PER_CREDIT,
    CreditRule,
    PriceBook,
    ProviderPrice,
    Weights,
    round_half_up,
)
from plugin.settings import (
    DEFAULT_WEIGHTS,
    ConfigError,
    MeterlineConfig,
    ModelPricingConfig,
    PlanConfig,
    PriceConfig,
    PricingConfig,
    Settings,
    WeightsConfig,
    config_path,
    load_config,
    load_settings,
)
from plugin.sinks.base import Sink
from plugin.sinks.stripe import StripeConfig, StripeSink
from plugin.slice_book import SliceBook


def _overlay(base: BaseModel, override: BaseModel | None) -> dict:
    """Fields of `base`, replaced by the ones `override` sets (None = not set)."""
    values = {name: getattr(base, name) for name in type(base).model_fields}
    if override is not None:
        for name in type(override).model_fields:
            if getattr(override, name) is not None:
                values[name] = getattr(override, name)
    return values


def _rule(pricing: PricingConfig, override: ModelPricingConfig | None = None) -> CreditRule:
    """The credit rule of one model: defaults <- pricing section <- the model's own overrides."""
    weights = _overlay(DEFAULT_WEIGHTS, pricing.weights)
    if override is not None:
        weights = _overlay(WeightsConfig(**weights), override.weights)
    scalars = _overlay(pricing, override)
    return CreditRule(
        basis=scalars["basis"],
        tokens_per_credit=scalars["tokens_per_credit"],
        weights=Weights(**weights),
        markup=scalars["markup"],
        credits_per_usd=scalars["credits_per_usd"],
    )


def _provider_price(price: PriceConfig) -> ProviderPrice:
    def per_token(value):
        return None if value is None else value * PER_MILLION

    return ProviderPrice(
        input=price.input * PER_MILLION, output=price.output * PER_MILLION,
        cached_input=per_token(price.cached_input), audio_input=per_token(price.audio_input),
        audio_output=per_token(price.audio_output), image_input=per_token(price.image_input),
    )


def stripe_config(settings: Settings, config: MeterlineConfig) -> StripeConfig:
    """How meterline reaches Stripe, from the environment (STRIPE_API_KEY, METERLINE_STRIPE_*) and
    meterline.yaml's meter; ConfigError without a key."""
    if not settings.stripe_api_key:
        raise ConfigError("STRIPE_API_KEY is not set (METERLINE_STRIPE_API_BASE points it at a local server)")
    return StripeConfig(api_key=settings.stripe_api_key, event_name=config.stripe.meter_event_name,
                        api_base=settings.stripe_api_base, meter_events_base=settings.stripe_meter_events_base,
                        stream=settings.stripe_stream)


def build_sink(settings: Settings, config: MeterlineConfig) -> Sink | None:
    """The sink METERLINE_SINK names, configured from the environment; ConfigError when incomplete."""
    match settings.sink_name:
        case "stripe":
            if not settings.stripe_api_key:
                raise ConfigError("METERLINE_SINK=stripe needs STRIPE_API_KEY")
            return StripeSink(stripe_config(settings, config))
        case "openmeter":
            if not settings.openmeter_url:
                raise ConfigError("METERLINE_SINK=openmeter needs METERLINE_OPENMETER_URL")
            from plugin.sinks.openmeter import (
                OpenMeterSink,  # only when chosen: it needs nothing of Stripe's
            )

            return OpenMeterSink(settings.openmeter_url, settings.openmeter_token)
    return None


def build_price_book(config: MeterlineConfig, model_cost: Mapping[str, Mapping[str, object]] | None = None,
                     version: int | None = None) -> PriceBook:
    """meterline.yaml's rules and prices, with LiteLLM's model_cost as the fallback price table; `version`:
    the pricing changelog's entry they are, stamped on every row priced with the book."""
    pricing = config.pricing
    cache_hits = config.policies.cache_hits
    return PriceBook(
        default_rule=_rule(pricing),
        cache_hit_fee_ucr=0 if cache_hits == "free" else round_half_up(cache_hits.flat_fee_credits * UCR_PER_CREDIT),
        rules={model: _rule(pricing, override) for model, override in pricing.models.items()},
        prices={model: _provider_price(price) for model, price in config.prices.items()},
        model_cost=model_cost or {},
        version=version,
    )


@dataclass
class Meterline:
    """Everything a process needs to meter; built lazily so the CLI pays only for what it uses."""

    settings: Settings
    config: MeterlineConfig
    model_cost: Mapping[str, Mapping[str, object]] | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC), repr=False)
    """Now, for admission and settlement (tests drive a runaway loop through simulated hours)."""
    prompt_token_counter: Callable[[str, list], int] | None = field(default=None, repr=False)
    """The gateway's tokenizer (set by plugin.litellm_hooks); previews fall back to ~4 characters a token."""
    _relay_thread: RelayThread | None = field(default=None, repr=False)
    _reconciler: Any = field(default=None, repr=False)
    """plugin.services.reconcile.Reconciler, when the proxy reconciles on a timer."""
    _checkpointer: WalCheckpointer | None = field(default=None, repr=False)
    _last_alerts: dict[str, float] = field(default_factory=dict, repr=False)

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def price_version(self) -> int:
        """The pricing changelog's version of the running meterline.yaml, recorded when the newest entry is
        not it (plugin/services/pricing.py). Settled once per process (at start-up in the proxy): each
        ledger row then names its version at the cost of a field read."""
        from plugin.services.pricing import (
            running_version,  # the service builds on this module
        )

        return running_version(self.engine, self.config, self.clock())

    @cached_property
    def price_book(self) -> PriceBook:
        return build_price_book(self.config, self.model_cost, version=self.price_version)

    @cached_property
    def directory(self) -> Directory:
        return Directory(self.engine, ttl=self.settings.key_cache_seconds)

    @cached_property
    def fleet_usage(self) -> FleetUsage:
        """Every customer's recent usage, for the fleet view (plugin/ledger/fleet_usage.py)."""
        return FleetUsage(self.engine)

    @cached_property
    def writer(self) -> LedgerWriter:
        return LedgerWriter(self.engine)

    @cached_property
    def counters(self) -> CounterStore:
        """Redis when METERLINE_REDIS_URL is set, else the embedded store in the ledger's database."""
        if self.settings.redis_url:
            engine = self.engine
            return RedisCounterStore.from_url(
                self.settings.redis_url, lambda customer, start, end: billed_between(engine, customer, start, end))
        return SqlCounterStore(self.engine)

    @cached_property
    def slices(self) -> SliceBook:
        """This process's budget slices of capped customers (plugin/rules/slices.py)."""
        policies = self.config.policies
        return SliceBook(self.counters, requests=policies.slice_requests, seconds=policies.slice_seconds,
                         reservation_seconds=policies.reservation_seconds)

    @property
    def counters_in_ledger(self) -> SqlCounterStore | None:
        """The embedded counter store, which settles inside the ledger writer's transaction; None with Redis."""
        counters = self.counters
        return counters if isinstance(counters, SqlCounterStore) else None

    @cached_property
    def breaker_config(self) -> BreakerConfig:
        config = self.config.policies.breaker
        return BreakerConfig(
            multiplier=config.multiplier, floor_ucr_per_hour=credits_to_ucr(config.floor_credits_per_hour),
            baseline_days=config.baseline_days, trickle_requests=config.trickle_requests,
            cool_down=None if config.cool_down_minutes is None else timedelta(minutes=config.cool_down_minutes),
        )

    @cached_property
    def baselines(self) -> Baselines:
        return Baselines(self.engine, self.breaker_config)

    @cached_property
    def notifier(self) -> Notifier:
        settings = self.settings
        smtp = None
        if settings.smtp_host:
            smtp = SmtpConfig(host=settings.smtp_host, port=settings.smtp_port, sender=settings.smtp_from,
                              username=settings.smtp_username, password=settings.smtp_password,
                              starttls=settings.smtp_starttls)
        return Notifier(smtp=smtp)

    def tell_operator(self, notice: Notice) -> list[str]:
        """Email and webhook the operator (METERLINE_ALERT_EMAIL, METERLINE_ALERT_WEBHOOK_URL); returns failures."""
        emails = [address.strip() for address in (self.settings.alert_email or "").split(",") if address.strip()]
        webhooks = [self.settings.alert_webhook_url] if self.settings.alert_webhook_url else []
        return self.notifier.deliver(notice, emails=emails, webhooks=webhooks)

    def tell_customer(self, customer: Profile, notice: Notice) -> list[str]:
        """Email and webhook the customer where its limits say (notify_email, notify_webhook_url)."""
        limits = customer.limits
        return self.notifier.deliver(notice, emails=[limits.notify_email] if limits.notify_email else [],
                                     webhooks=[limits.notify_webhook_url] if limits.notify_webhook_url else [])

    def first_in_a_while(self, kind: str, every_seconds: float = 60.0) -> bool:
        """True at most once per `every_seconds` per kind: alerts about an outage are raised once a
        minute per process, not once per request."""
        now = time.monotonic()
        with _lock:
            last = self._last_alerts.get(kind)
            if last is not None and now - last < every_seconds:
                return False
            self._last_alerts[kind] = now
            return True

    @property
    def page_secret(self) -> bytes | None:
        """The key that signs usage-page tokens: METERLINE_PAGE_SECRET, else one derived from the master
        key (never the master key itself); None when neither is set (no tokens can be minted)."""
        if self.settings.page_secret:
            return self.settings.page_secret.encode()
        if self.settings.master_key:
            return hmac.new(self.settings.master_key.encode(), b"meterline usage page tokens", "sha256").digest()
        return None

    def plan_of(self, customer: Profile) -> PlanConfig:
        """The customer's plan with its own terms over it. An unknown plan name (removed from
        meterline.yaml) is treated as a plan with nothing included and no limit, never as free.
        A grandfathered customer's plan is unmetered whatever meterline.yaml says: in the ledger, never sent
        to the sink, never billed or blocked for overage (its plan's cap and its own hard limit still hold)."""
        plan = self.config.plans.get(customer.plan, _NO_PLAN)
        plan = plan if customer.terms is None else customer.terms.apply(plan)
        return plan if customer.grandfathered_at is None else plan.model_copy(update={"metered": False})

    def ceiling_of(self, customer: Profile, *, stale_ok: bool = False) -> Ceiling | None:
        """The most the customer may be billed this period (plan cap, hard limit, overage blocks).
        `stale_ok`: the request path, which refreshes the global switch in the background."""
        block = self.directory.switch(GLOBAL_OVERAGE_BLOCK, stale_ok=stale_ok)
        return effective_ceiling(self.plan_of(customer), customer.limits, global_overage_block=block)

    def estimate(self, model: str, prompt_tokens: int, max_tokens: int | None) -> Estimate:
        """A request's worst case before it runs: the prompt as fresh input, and `max_tokens` of output
        (policies.reservation_output_tokens when it sets none)."""
        input_rate, output_rate = self.price_book.token_rates(model)
        return Estimate(prompt_tokens * input_rate, output_rate,
                        max_tokens or self.config.policies.reservation_output_tokens)

    def count_prompt_tokens(self, model: str, messages: list) -> int:
        """Prompt tokens of a chat request, for previews."""
        if self.prompt_token_counter is not None:
            return int(self.prompt_token_counter(model, messages))
        return -(-len(json.dumps(messages)) // 4)

    def sink(self) -> Sink | None:
        """A new connection to the configured sink (METERLINE_SINK), or None for `none`."""
        return build_sink(self.settings, self.config)

    def relay(self, sink: Sink, worker: str | None = None) -> Relay:
        settings = self.settings
        options = RelayOptions(
            batch=settings.relay_batch, concurrency=settings.relay_concurrency,
            lease=timedelta(seconds=settings.relay_lease_seconds), poll_seconds=settings.relay_poll_seconds,
            alert_age=timedelta(seconds=settings.outbox_alert_age_seconds),
            policy=RetryPolicy(base_seconds=settings.relay_retry_base_seconds,
                               cap_seconds=settings.relay_retry_cap_seconds),
        )
        return Relay(self.engine, sink, options=options, worker=worker, on_outcomes=metrics.count_outcomes)

    def start(self) -> None:
        """Open the database and start the ledger writer (and the relay, when a sink is configured) now
        rather than on the first request. SQLite's WAL is checkpointed by a thread of its own from now on
        (plugin/ledger/checkpoint.py), never inside a request's commit."""
        if self._checkpointer is None:
            self._checkpointer = WalCheckpointer(self.engine)
            self._checkpointer.start()
        self.writer  # noqa: B018  (cached_property: the access is the point)
        self.price_version  # noqa: B018  (recorded now, not on the first request)
        if self.settings.relay and self._relay_thread is None and (sink := self.sink()) is not None:
            self._relay_thread = RelayThread(self.relay(sink))
            self._relay_thread.start()
        settings = self.settings
        if (self._reconciler is None and settings.reconcile_seconds and settings.sink_name == "stripe"
                and settings.stripe_api_key):
            from plugin.services.reconcile import (
                Reconciler,  # the service builds on this module
            )

            self._reconciler = Reconciler(self, settings.reconcile_seconds, self.clock)
            self._reconciler.start()

    def close(self) -> None:
        """Stop the relay, drain the writer, give back budget slices, release database connections (what
        never started is skipped)."""
        if self._reconciler is not None:
            self._reconciler.stop()
            self._reconciler = None
        if self._relay_thread is not None:
            self._relay_thread.stop()
            self._relay_thread = None
        if "writer" in self.__dict__:
            self.writer.close()
        if "slices" in self.__dict__:  # after the writer: its last settlements take from them
            self.slices.close()
        if "counters" in self.__dict__:  # after the slices: giving them back is a counter call
            self.counters.close()
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if "engine" in self.__dict__:
            self.engine.dispose()

    def period(self, customer: Profile | None, now: datetime | None = None) -> Period:
        """The customer's current billing period: monthly from its anchor, else the calendar month."""
        now = now or self.clock()
        if customer is not None and customer.period_anchor is not None:
            return anchored_month(customer.period_anchor, now)
        return calendar_month(now)


_NO_PLAN = PlanConfig()

PROCESS_SEAL = secrets.token_hex(16)
"""Marks per-request state this process created, so a client's own metadata can never pose as it."""

_lock = threading.Lock()
_current: Meterline | None = None


def current(model_cost: Mapping[str, Mapping[str, object]] | None = None) -> Meterline:
    """The process's Meterline, created on first use from the environment and meterline.yaml."""
    global _current
    with _lock:
        if _current is None:
            settings = load_settings()
            _current = Meterline(settings=settings, config=load_config(config_path(settings)), model_cost=model_cost)
        elif model_cost is not None and _current.model_cost is None:
            _current.model_cost = model_cost
            _current.__dict__.pop("price_book", None)
        return _current


def reset_for_tests() -> None:
    """Forget the process's Meterline (tests build several in one process)."""
    global _current
    with _lock:
        if _current is not None:
            _current.close()
        _current = None

"""Limits and protection through the real proxy, driven by the real openai client and HTTP API:
hard limits (credits and dollars), overage blocks, the rate limit, the circuit breaker, soft-limit
notices by email (a real SMTP server) and webhook, previews, and the answers' headers.

Every refusal body is checked word for word: it is what a customer reads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import openai
import pytest

from plugin.counters.base import Account
from plugin.ledger import store
from plugin.outbox import store as outbox_store
from plugin.rules.plans import calendar_month
from tests.conftest import MeteredProxy, _metered_proxy
from tests.support.proxy import METERLINE_YAML
from tests.support.smtp import Mailbox, receiving_mail
from tests.support.webhook import WebhookReceiver, receiving_webhooks

pytestmark = pytest.mark.proxy

M = 1_000_000
PROTECTION_YAML = {
    **METERLINE_YAML,
    "plans": {
        "pro": {"included_credits": 1000},
        "free": {"cap_credits": 100},
        "metered": {"included_credits": 10, "base_fee_usd": "20", "overage_usd_per_credit": "0.01"},
        "throttled": {"included_credits": 1000, "requests_per_minute": 3},
        "legacy": {"metered": False, "base_fee_usd": "99"},
    },
    # The breaker trips past 10 x 5 credits in an hour for a new customer: 50 credits, about a dozen
    # of the 4-credit requests below. Every other test here stays well under that per customer.
    "policies": {"breaker": {"floor_credits_per_hour": "5"}},
}
FOUR_CREDITS = [{"role": "user", "content": "[[c=1000]] hello"}]  # 1,000 output tokens at weight 4, plus a prompt


class Protected(MeteredProxy):
    mailbox: Mailbox
    operator_hooks: WebhookReceiver
    customer_hooks: WebhookReceiver


@pytest.fixture(scope="module")
def protected(tmp_path_factory, upstream) -> Iterator[Protected]:
    """A proxy with its own plans, a real SMTP server and webhook receivers for the operator's alerts."""
    workdir = tmp_path_factory.mktemp("protected")
    with receiving_mail() as mailbox, receiving_webhooks() as operator_hooks, receiving_webhooks() as customer_hooks:
        env = {"METERLINE_SMTP_HOST": mailbox.host, "METERLINE_SMTP_PORT": str(mailbox.port),
               "METERLINE_ALERT_EMAIL": "ops@example.com", "METERLINE_ALERT_WEBHOOK_URL": operator_hooks.url}
        for metered in _metered_proxy(workdir, upstream, f"sqlite:///{workdir / 'ledger.db'}", env=env,
                                      meterline_yaml=PROTECTION_YAML):
            metered.__class__ = Protected
            metered.mailbox, metered.operator_hooks, metered.customer_hooks = mailbox, operator_hooks, customer_hooks
            yield metered


def period_end() -> str:
    return f"{calendar_month(datetime.now(UTC)).end:%Y-%m-%d %H:%M} UTC"


def refusal(status: int, reason: str, message: str) -> dict:
    return {"error": {"message": message, "type": reason, "param": None, "code": str(status)}}


def ask_until_refused(client: openai.OpenAI, limit: int = 12) -> tuple[int, openai.APIStatusError]:
    """Send 4-credit requests until one is refused; (how many succeeded, the refusal)."""
    for sent in range(limit):
        try:
            client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
        except openai.APIStatusError as refused:
            return sent, refused
    raise AssertionError(f"no refusal after {limit} requests")


def billed(metered: MeteredProxy, customer_id: str) -> int:
    return sum(row.credits_ucr for row in metered.ledger(customer_id))


# ------------------------------------------------------------------------------ hard limits


def test_a_customer_sets_a_hard_limit_in_credits_and_is_stopped_there(protected):
    tenant = protected.tenant("hard-credits", plan="metered")
    with protected.api(tenant.key) as api:
        answer = api.put("/limits", json={"hard_limit_ucr": 10 * M})
        assert answer.status_code == 200
        assert answer.json() == {
            "customer_id": "hard-credits", "soft_thresholds_pct": None, "effective_soft_thresholds_pct": [80],
            "hard_limit_ucr": 10 * M, "hard_limit_usd": None, "block_overage": False, "notify_email": None,
            "notify_webhook_url": None, "cap_ucr": 10 * M, "cap_reason": "hard_limit_reached",
        }
        sent, refused = ask_until_refused(tenant.client)
        assert sent >= 2 and refused.status_code == 402
        assert refused.response.headers["x-meterline-error"] == "hard_limit_reached"
        assert refused.response.json() == refusal(402, "hard_limit_reached", "You've hit your limit of 10 credits. "
                                                  f"Raise it in settings to continue, or wait until {period_end()}.")
        assert 9 * M < billed(protected, "hard-credits") <= 10 * M
        # Raising (here: clearing) the limit lets the customer continue at once.
        assert api.put("/limits", json={"hard_limit_ucr": None}).json()["cap_ucr"] is None
    tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)


def test_a_hard_limit_in_dollars_counts_usage_charges(protected):
    """$0.05 at $0.01 a credit past the 10 included credits: usage stops at 15 credits."""
    tenant = protected.tenant("hard-dollars", plan="metered")
    with protected.api(tenant.key) as api:
        stored = api.put("/limits", json={"hard_limit_usd": "0.05"}).json()
    assert (stored["hard_limit_usd"], stored["cap_ucr"]) == ("0.05", 15 * M)
    _, refused = ask_until_refused(tenant.client)
    assert refused.response.json() == refusal(402, "hard_limit_reached", "You've hit your limit of $0.05. Raise it "
                                              f"in settings to continue, or wait until {period_end()}.")
    assert 14 * M < billed(protected, "hard-dollars") <= 15 * M


def test_the_customer_and_the_operator_can_block_overage(protected):
    own = protected.tenant("blocks-own", plan="metered")
    with protected.api(own.key) as api:
        assert api.put("/limits", json={"block_overage": True}).json()["cap_reason"] == "overage_blocked"
    _, refused = ask_until_refused(own.client)
    assert refused.response.json() == refusal(
        402, "overage_blocked", "You've used the 10 credits your plan includes and overage is blocked. Allow "
        f"overage in settings to continue, or wait until {period_end()}.")
    assert billed(protected, "blocks-own") <= 10 * M

    everyone = protected.tenant("blocked-globally", plan="metered")
    unaffected = protected.tenant("no-overage-plan", plan="pro")  # a plan without overage charges has nothing to block
    with protected.api() as operator:
        assert operator.put("/overage-block", json={"enabled": True}).json() == {"enabled": True}
        try:
            _, refused = ask_until_refused(everyone.client)
            assert refused.response.headers["x-meterline-error"] == "overage_blocked"
            unaffected.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
        finally:
            assert operator.put("/overage-block", json={"enabled": False}).json() == {"enabled": False}
    everyone.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"hard_limit_ucr": -5}, "hard_limit_ucr", "hard_limit_ucr: Input should be greater than or equal to 1"),
    ({"hard_limit_ucr": 10**16}, "hard_limit_ucr",
     "hard_limit_ucr: Input should be less than or equal to 1000000000000000"),
    ({"hard_limit_ucr": "lots"}, "hard_limit_ucr", "hard_limit_ucr: Input should be a valid integer"),
    ({"hard_limit_ucr": 2.5}, "hard_limit_ucr", "hard_limit_ucr: Input should be a valid integer"),
    ({"soft_thresholds_pct": [50, 0]}, "soft_thresholds_pct.1",
     "soft_thresholds_pct.1: Input should be greater than or equal to 1"),
    ({"soft_thresholds_pct": [5000]}, "soft_thresholds_pct.0",
     "soft_thresholds_pct.0: Input should be less than or equal to 1000"),
    ({"block_overage": "yes"}, "block_overage", "block_overage: Input should be a valid boolean"),
    ({"hard_limit_usd": "-3"}, "hard_limit_usd",
     'hard_limit_usd: Value error, write dollars as a positive decimal string, e.g. "25" or "25.50"'),
    ({"notify_email": "not-an-address"}, "notify_email", "notify_email: Value error, not an email address"),
    ({"surprise": 1}, "surprise", "surprise: Extra inputs are not permitted"),
    ({"hard_limit_ucr": 5, "hard_limit_usd": "5"}, "hard_limit_usd", "Set hard_limit_ucr or hard_limit_usd, not both."),
])
def test_invalid_limits_are_refused_with_a_clear_422(protected, body, param, message):
    tenant = protected.tenant("validates", plan="metered")
    with protected.api(tenant.key) as api:
        answer = api.put("/limits", json=body)
    assert answer.status_code == 422
    assert answer.json() == {"error": {"message": message, "type": "invalid_request", "param": param, "code": "422"}}


def test_a_dollar_limit_on_a_plan_without_usage_charges_is_refused(protected):
    tenant = protected.tenant("dollars-on-pro", plan="pro")
    with protected.api(tenant.key) as api:
        answer = api.put("/limits", json={"hard_limit_usd": "10"})
    assert answer.status_code == 422
    assert answer.json()["error"]["message"] == ("The pro plan charges nothing for usage, so a limit in dollars "
                                                 "cannot be reached; set hard_limit_ucr instead.")


def test_a_customer_key_reaches_only_its_own_customer(protected):
    tenant = protected.tenant("nosy", plan="metered")
    protected.tenant("victim", plan="metered")
    with protected.api(tenant.key) as api:
        answer = api.put("/customers/victim/limits", json={"hard_limit_ucr": 1})
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "invalid_api_key"
        assert api.post("/customers/victim/breaker", json={"action": "trip"}).status_code == 401
        assert api.put("/overage-block", json={"enabled": True}).status_code == 401
    with protected.api("mk_not-a-key") as stranger:
        assert stranger.put("/limits", json={"hard_limit_ucr": 1}).json()["error"]["type"] == "invalid_api_key"
    with protected.api() as operator:  # the operator may set anyone's, and names who did in the audit columns
        assert operator.put("/customers/victim/limits", json={"hard_limit_ucr": 7 * M}).json()["cap_ucr"] == 7 * M
        assert operator.put("/customers/ghost/limits", json={"hard_limit_ucr": 1}).status_code == 404


# ------------------------------------------------------------------------------ rate limit


def test_the_rate_limit_answers_429_with_retry_after(protected):
    tenant = protected.tenant("throttled-customer", plan="throttled")
    for _ in range(3):
        tenant.client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as limited:
        tenant.client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    answer = limited.value.response
    wait = int(answer.headers["retry-after"])
    # up to two windows: requests of this window still weigh on the next one
    assert 1 <= wait <= 120 and answer.headers["x-meterline-error"] == "rate_limited"
    assert answer.json() == refusal(429, "rate_limited", "You've sent more than 3 requests in the last minute, the "
                                    f"limit of your throttled plan. Retry in {wait} s.")
    assert len(protected.ledger("throttled-customer")) == 3


# ------------------------------------------------------------------------------ circuit breaker


def test_an_operator_trips_and_resets_a_breaker_with_an_audit_trail(protected):
    tenant = protected.tenant("leaky", plan="pro")
    with protected.api() as operator:
        tripped = operator.post("/customers/leaky/breaker",
                                json={"action": "trip", "reason": "key posted publicly", "by": "alice"}).json()
        assert (tripped["status"], tripped["by"], tripped["reason"]) == ("open", "api:alice", "key posted publicly")
        with pytest.raises(openai.APIStatusError) as refused:
            tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
        assert refused.value.response.json() == refusal(
            402, "circuit_open", "Requests on this account are paused by the operator. Contact them to resume it.")
        operator.post("/customers/leaky/breaker", json={"action": "reset", "reason": "key rotated", "by": "bob"})
        tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
        events = operator.get("/customers/leaky/breaker").json()["events"]
    assert [(event["before"], event["after"], event["by"], event["why"]) for event in events] == [
        ("open", "closed", "api:bob", "key rotated"), ("closed", "open", "api:alice", "key posted publicly")]


def test_a_runaway_loop_trips_the_breaker_and_the_operator_is_told(protected):
    """A new customer's typical spend is the floor (5 credits an hour): past 50 credits in the last
    hour its requests stop with circuit_open, and the operator gets one email and one webhook."""
    tenant = protected.tenant("runaway", plan="pro")
    mails_before = len(protected.mailbox.messages)
    sent, refused = ask_until_refused(tenant.client, limit=30)
    assert refused.response.json() == refusal(
        402, "circuit_open", "Requests on this account are paused: it spent far more in the last hour than it usually "
        "does, which looks like a runaway loop. The operator has been alerted and can resume it.")
    # It trips right after the request that crossed 50 credits (a request or two may slip in meanwhile).
    assert 50 * M < billed(protected, "runaway") <= 50 * M + 3 * 4_100_000
    [notice] = [body for body in protected.operator_hooks.wait_for(1, timeout=10)
                if body["meterline"]["customer_id"] == "runaway"]
    assert notice["meterline"]["kind"] == "circuit_open"
    assert notice["text"].startswith("meterline: circuit open for runaway\ncircuit breaker opened for runaway: spent ")
    mail = protected.mailbox.wait_for(mails_before + 1, timeout=10)[-1]
    assert (mail["To"], mail["Subject"]) == ("ops@example.com", "meterline: circuit open for runaway")
    assert [alert.customer_id for alert in store.list_alerts(protected.engine, "circuit_open")] == ["runaway"]
    time.sleep(0.5)
    with pytest.raises(openai.APIStatusError):  # it stays open: no cool-down configured, an operator decides
        tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
    assert len(protected.mailbox.messages) == mails_before + 1


# ------------------------------------------------------------------------------ soft limits


def test_soft_limits_fire_once_per_threshold_by_email_webhook_and_in_app(protected):
    """1% and 2% of the 1,000 included credits: 10 and 20 credits. Seven 4-credit requests cross both."""
    tenant = protected.tenant("watched", plan="pro")
    with protected.api(tenant.key) as api:
        api.put("/limits", json={"soft_thresholds_pct": [2, 1], "notify_email": "billing@watched.example",
                                 "notify_webhook_url": protected.customer_hooks.url})
        mails_before = len(protected.mailbox.messages)
        for _ in range(7):
            tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
        hooks = protected.customer_hooks.wait_for(2, timeout=10)
        mails = protected.mailbox.wait_for(mails_before + 2, timeout=10)[mails_before:]
        time.sleep(0.5)  # nothing more arrives: each threshold fires once
        assert len(protected.customer_hooks.bodies) == 2 and len(protected.mailbox.messages) == mails_before + 2
        alerts = api.get("/alerts").json()["alerts"]
    assert sorted(mail["Subject"] for mail in mails) == ["meterline: watched reached 1% of its usage",
                                                         "meterline: watched reached 2% of its usage"]
    assert {mail["To"] for mail in mails} == {"billing@watched.example"}
    assert sorted(body["meterline"]["fields"]["threshold_pct"] for body in hooks) == ["1", "2"]
    assert [alert["kind"] for alert in alerts] == ["soft_limit", "soft_limit"]
    assert all(alert["customer_id"] == "watched" for alert in alerts)
    assert re.fullmatch(r"watched has used [\d.]+ credits this period, 2% of 1000\. The period ends .+ UTC\.",
                        alerts[0]["message"])


# ------------------------------------------------------------------------------ previews and headers


def test_preview_answers_cost_and_verdict_without_reserving(protected):
    tenant = protected.tenant("previewer", plan="free")
    with protected.api(tenant.key) as api:
        small = api.post("/preview", json={"model": "test-model", "prompt_tokens": 1000, "max_tokens": 500}).json()
        # 1,000 prompt tokens at 1,000 µcr + 500 output tokens at 4,000 µcr
        assert small == {"credits_ucr": 3 * M, "cost_usd": "0.00", "verdict": "allowed", "reason": None,
                         "message": None, "max_tokens": None, "remaining_ucr_after": 97 * M}
        big = api.post("/preview", json={"model": "test-model", "prompt_tokens": 0, "max_tokens": 30_000}).json()
        # lowered to what the 100-credit cap affords, which also crosses the default 80% soft threshold
        assert (big["verdict"], big["reason"], big["max_tokens"], big["credits_ucr"]) == (
            "soft_limit", "max_tokens_lowered", 25_000, 100 * M)
        chat = api.post("/preview", json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 10}).json()
        assert chat["verdict"] == "allowed" and chat["credits_ucr"] > 40_000  # the prompt was counted
        api.put("/limits", json={"hard_limit_ucr": 2 * M})
        refused = api.post("/preview", json={"model": "test-model", "prompt_tokens": 3000, "max_tokens": 100}).json()
        assert (refused["verdict"], refused["reason"]) == ("refused", "hard_limit_reached")
        assert refused["message"].startswith("You've hit your limit of 2 credits.")
        bad = api.post("/preview", json={"model": "test-model"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "messages"
    account = Account("previewer", calendar_month(datetime.now(UTC)).start)
    assert protected.counters().snapshot(account, datetime.now(UTC)).reserved_ucr == 0


def test_preview_warns_before_a_soft_limit(protected):
    tenant = protected.tenant("nearly", plan="pro")
    with protected.api(tenant.key) as api:
        api.put("/limits", json={"soft_thresholds_pct": [1]})
        answer = api.post("/preview", json={"model": "test-model", "prompt_tokens": 0, "max_tokens": 3000}).json()
    assert (answer["verdict"], answer["reason"], answer["credits_ucr"]) == ("soft_limit", "soft_limit_1pct", 12 * M)


def test_billed_answers_say_what_they_cost_and_what_is_left(protected):
    tenant = protected.tenant("header-reader", plan="free")
    answer = tenant.client.chat.completions.with_raw_response.create(model="test-model", messages=FOUR_CREDITS)
    credits = int(answer.headers["x-meterline-credits"])
    assert credits == billed(protected, "header-reader") > 0
    assert int(answer.headers["x-meterline-remaining"]) == 100 * M - credits


def test_a_legacy_plan_is_in_the_ledger_but_never_metered(protected):
    tenant = protected.tenant("old-flat-rate", plan="legacy")
    tenant.client.chat.completions.create(model="test-model", messages=FOUR_CREDITS)
    [row] = protected.ledger("old-flat-rate")
    assert row.credits_ucr > 0
    assert outbox_store.list_events(protected.engine, customer_id="old-flat-rate", limit=10) == []
    assert store.list_outbox_ids(protected.engine, "old-flat-rate") == []


def test_metrics_count_refusals_breaker_trips_and_notices(protected):
    """Runs last in this module: the counters reflect the tests above (Prometheus exposition)."""
    with protected.api() as api:
        text = api.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("meterline_") and not line.startswith("meterline_relay")}
    for reason in ("hard_limit_reached", "overage_blocked", "circuit_open", "rate_limited"):
        assert values[f'meterline_refusals_total{{reason="{reason}"}}'] >= 1, reason
    assert values["meterline_breaker_trips_total"] == 1  # the runaway customer
    assert values["meterline_soft_limit_notices_total"] >= 2  # the watched customer's 1% and 2%

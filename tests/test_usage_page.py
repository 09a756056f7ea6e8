"""The customer's usage page end to end: the real proxy serves it, a real headless chromium reads it,
fills its limits form and submits it; the figures are checked against the ledger's own rows."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from plugin.api.page import limits_from_form
from plugin.ledger import accounts, store
from plugin.ledger.store import as_utc
from plugin.rules import page_tokens
from plugin.rules.plans import calendar_month
from plugin.rules.policy import credits_grouped, usd_text
from plugin.rules.records import BillingRecord, LedgerRow
from plugin.rules.usage import pct
from plugin.runtime import Meterline
from plugin.services.limits import LimitsRefused
from plugin.settings import MeterlineConfig, Settings, TermsOverride
from tests.support.browser import Dom, devtools_page, dump_dom, screenshot
from tests.support.processes import free_port, serving
from tests.support.proxy import MASTER_KEY
from tests.test_proxy_durability import _wait_for_rows

M = 1_000_000
TERMS = TermsOverride(included_credits=Fraction(5), base_fee_usd=Fraction(20), overage_usd_per_credit=Fraction("0.01"))
HOSTILE_MEMBER = '<img src=x onerror="document.title=1">'
PAGE_HEADERS = {
    "content-type": "text/html; charset=utf-8",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors *",
}
proxy = pytest.mark.proxy


def _customer(metered, name: str):
    """A fresh customer of the session's proxy (its database is shared), on the pro plan with priced terms."""
    tenant = metered.tenant(f"{name}-{uuid.uuid4().hex[:8]}")
    accounts.set_terms(metered.engine, tenant.customer_id, terms=TERMS)
    return tenant


def _mint(metered, customer_id: str, **query) -> dict:
    with metered.api() as api:
        answer = api.post(f"/customers/{customer_id}/page-token", params=query)
    assert answer.status_code == 201, answer.text
    return answer.json()


@dataclass
class Shown:
    """A customer with usage on several days, a page link, and what its ledger holds this period."""

    customer_id: str
    key: str
    url: str
    used_ucr: int
    daily: dict[str, int]
    actions: Counter
    members: Counter


@pytest.fixture(scope="module")
def shown(metered) -> Shown:
    tenant = _customer(metered, "page")
    calls = [("summarize", "alice", 2000, 500), ("summarize", "bob", 1000, 250), ("chat", HOSTILE_MEMBER, 500, 100)]
    for action, member, prompt, completion in calls:  # through the proxy, billed as any customer's calls are
        tenant.client.chat.completions.create(
            model="test-model", user=member, extra_headers={"x-meterline-action": action},
            messages=[{"role": "user", "content": f"[[p={prompt} c={completion}]] hello"}])
    assert len(_wait_for_rows(metered, tenant.customer_id, len(calls), timeout=20)) == len(calls)
    now = datetime.now(UTC)
    earlier = [now - timedelta(days=days) for days in (1, 3) if (now - timedelta(days=days)).month == now.month]
    store.write_records(metered.engine, [  # earlier days of the period, as an older proxy would have billed them
        BillingRecord(LedgerRow(id=f"page-{uuid.uuid4().hex}", customer_id=tenant.customer_id, model="test-model",
                                created_at=day, member="alice", action="translate", credits_ucr=1_250_000 * nth),
                      meter=False)
        for nth, day in enumerate(earlier, start=1)])
    period = calendar_month(now)
    rows = [row for row in metered.ledger(tenant.customer_id) if period.start <= as_utc(row.created_at) < period.end]
    daily, actions, members = Counter(), Counter(), Counter()
    for row in rows:
        daily[as_utc(row.created_at).date().isoformat()] += row.credits_ucr
        actions[row.action] += row.credits_ucr
        members[row.member] += row.credits_ucr
    link = _mint(metered, tenant.customer_id)
    return Shown(tenant.customer_id, tenant.key, metered.proxy.base_url + link["url"], sum(daily.values()),
                 dict(daily), actions, members)


@proxy
def test_the_page_shows_what_the_ledger_holds(metered, shown):
    with metered.api(shown.key) as api:  # the JSON the page is rendered from, read just before and just after it
        before = api.get("/usage").json()
        page = Dom(dump_dom(shown.url))
        after = api.get("/usage").json()
    assert page.text("used-credits") == credits_grouped(shown.used_ucr) and before["used_ucr"] == shown.used_ucr
    assert page.text("included-pct") == f"{pct(shown.used_ucr, 5 * M):.1f}%" == f"{before['included_pct']:.1f}%"
    projection = re.fullmatch(r"On track for \$([\d.]+) this month: \$([\d.]+) over included\.",
                              page.text("projected-usd"))
    assert projection, page.text("projected-usd")
    total, over = (Decimal(figure) for figure in projection.groups())
    assert total == 20 + over > 20  # the base fee, plus the overage the straight-line projection reaches
    assert Decimal(after["projected_usd"]) <= total <= Decimal(before["projected_usd"])  # spend so far, ever later
    projected_over = Fraction(before["projected_ucr"] - 5 * M, M) * TERMS.overage_usd_per_credit
    assert f"${before['projected_usd']}" == usd_text(20 + projected_over)
    assert page.text("overage-rates") == "Past the included credits: $0.01 per credit."  # the terms' rate

    bars = {bar["data-date"]: int(bar["data-used-ucr"]) for bar in page.all("rect", class_="day")}
    period = calendar_month(datetime.now(UTC))
    assert len(page.all("rect", class_="day")) == datetime.now(UTC).day  # one bar per day of the period so far
    assert min(bars) == period.start.date().isoformat()
    assert {day: used for day, used in bars.items() if used} == shown.daily
    assert len(page.all("line", class_="included-line")) == 1

    actions = sorted(shown.actions.items(), key=lambda item: (-item[1], item[0]))
    assert [row[:2] for row in page.table("top-actions")] == [[name, credits_grouped(used)] for name, used in actions]
    members = sorted(shown.members.items(), key=lambda item: (-item[1], item[0]))
    assert [row[:2] for row in page.table("members")] == [[name, credits_grouped(used)] for name, used in members]
    assert HOSTILE_MEMBER in page.text("members") and not page.all("img")  # shown as text, never as markup
    assert page.by_id["limits-form"]["attrs"]["action"].startswith("/meterline/v1/usage/page/limits?token=mlp_")


@proxy
def test_the_page_looks_right_wide_and_narrow(shown, tmp_path):
    """Screenshots for a person to look at (they stay in pytest's tmp dir, never committed)."""
    for width, height in ((1200, 900), (360, 800)):
        path = screenshot(shown.url, tmp_path / f"usage-page-{width}x{height}.png", width, height)
        assert path.stat().st_size > 10_000  # a drawn page, not a blank one


@proxy
def test_the_page_answers_with_its_headers_and_nothing_else_loads(metered, shown):
    answer = httpx.get(shown.url, timeout=30)
    assert answer.status_code == 200
    assert {name: answer.headers.get(name) for name in PAGE_HEADERS} == PAGE_HEADERS
    assert "http://" not in answer.text and "https://" not in answer.text


@proxy
async def test_the_limits_form_stores_what_the_customer_typed(metered):
    tenant = _customer(metered, "page-form")
    link = _mint(metered, tenant.customer_id)
    token = link["token"]
    async with devtools_page() as tab:
        await tab.goto(metered.proxy.base_url + link["url"])
        await tab.type_into("[name=soft_thresholds_pct]", "50, 90")
        await tab.type_into("[name=hard_limit_credits]", "1,250.5")
        await tab.click("[name=block_overage]")
        since = await tab.click_and_load("#limits-form button[type=submit]")
        assert tab.document_statuses(since) == [303, 200]
        landed = urlsplit(await tab.evaluate("location.href"))
        assert landed.path == "/meterline/v1/usage/page"
        assert parse_qs(landed.query) == {"token": [token], "saved": ["1"]}  # back to the page it came from
        shown = await tab.evaluate("""({
            soft: document.querySelector('[name=soft_thresholds_pct]').value,
            hard: document.querySelector('[name=hard_limit_credits]').value,
            block: document.querySelector('[name=block_overage]').checked,
            notice: document.querySelector('.notice').textContent})""")
    assert shown == {"soft": "50, 90", "hard": "1250.5", "block": True, "notice": "Your limits are saved."}
    with metered.api(tenant.key) as api:
        stored = api.get("/limits").json()
    assert (stored["soft_thresholds_pct"], stored["hard_limit_ucr"], stored["block_overage"]) == (
        [50, 90], 1_250_500_000, True)
    audit = accounts.load_profile(metered.engine, tenant.customer_id)
    assert audit.limits.hard_limit_ucr == 1_250_500_000


@proxy
async def test_a_refused_form_says_why_and_keeps_what_was_typed(metered):
    tenant = _customer(metered, "page-refused")
    link = _mint(metered, tenant.customer_id)
    async with devtools_page() as tab:
        await tab.goto(metered.proxy.base_url + link["url"])
        await tab.type_into("[name=soft_thresholds_pct]", "80, 5000")
        await tab.type_into("[name=hard_limit_credits]", "12")
        since = await tab.click_and_load("#limits-form button[type=submit]")
        assert tab.document_statuses(since) == [422]
        shown = await tab.evaluate("""({
            soft: document.querySelector('[name=soft_thresholds_pct]').value,
            hard: document.querySelector('[name=hard_limit_credits]').value,
            error: document.querySelector('#limits-error').textContent,
            action: document.querySelector('#limits-form').getAttribute('action')})""")
    assert shown["soft"] == "80, 5000" and shown["hard"] == "12"
    assert shown["error"] == "Warn me at: Input should be less than or equal to 1000."
    assert shown["action"] == f"/meterline/v1/usage/page/limits?token={link['token']}"  # the next try works too
    with metered.api(tenant.key) as api:
        assert api.get("/limits").json()["hard_limit_ucr"] is None  # nothing was stored


@proxy
async def test_the_page_shows_inside_another_sites_iframe(shown, tmp_path):
    """Embedded by a page of another origin (a customer's app), the page renders with its figures. LiteLLM
    sends X-Frame-Options: DENY on every answer; browsers ignore it when CSP frame-ancestors is sent."""
    (tmp_path / "app.html").write_text(f'<iframe src="{shown.url}" width="360" height="700"></iframe>')
    port = free_port()
    app = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with serving(app, f"http://127.0.0.1:{port}/app.html", "the embedding app"):
        async with devtools_page() as tab:
            await tab.call("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=False, flatten=True)
            since = await tab.goto(f"http://localhost:{port}/app.html")  # another site than 127.0.0.1
            frame = await tab.wait_for("Target.attachedToTarget", since)  # another origin: its own renderer
            assert frame["targetInfo"]["type"] == "iframe"
            deadline = time.monotonic() + 20
            while (used := await tab.evaluate("document.querySelector('#used-credits')?.textContent ?? null",
                                              session=frame["sessionId"])) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # the frame's document may still be loading
            where = await tab.evaluate("location.href", session=frame["sessionId"])
    assert where == shown.url and used == credits_grouped(shown.used_ucr)  # a blocked frame is a chrome-error:// page


@proxy
def test_a_token_shows_its_own_customer_whatever_else_is_sent(metered, shown):
    other = _customer(metered, "page-other")
    token = parse_qs(urlsplit(shown.url).query)["token"][0]
    answer = httpx.get(metered.proxy.base_url + "/meterline/v1/usage/page", timeout=30,
                       params={"token": token, "customer_id": other.customer_id, "customer": other.customer_id},
                       headers={"Authorization": f"Bearer {other.key}", "X-Meterline-Customer": other.customer_id})
    assert answer.status_code == 200
    assert shown.customer_id in answer.text and other.customer_id not in answer.text
    posted = httpx.post(metered.proxy.base_url + "/meterline/v1/usage/page/limits", timeout=30,
                        params={"token": token, "customer_id": other.customer_id},
                        headers={"Authorization": f"Bearer {other.key}"},
                        data={"soft_thresholds_pct": "", "hard_limit_credits": "900", "block_overage": ""})
    assert posted.status_code == 303
    assert accounts.load_profile(metered.engine, shown.customer_id).limits.hard_limit_ucr == 900 * M
    assert accounts.load_profile(metered.engine, other.customer_id).limits.hard_limit_ucr is None


@proxy
def test_a_customer_key_shows_its_own_customer_only(metered, shown):
    other = _customer(metered, "page-key")
    base = metered.proxy.base_url + "/meterline/v1/usage/page"
    own = httpx.get(base, headers={"Authorization": f"Bearer {other.key}", "X-Meterline-Customer": shown.customer_id},
                    timeout=30)
    assert own.status_code == 200 and other.customer_id in own.text and shown.customer_id not in own.text
    operator = httpx.get(base, headers={"Authorization": f"Bearer {MASTER_KEY}",
                                        "X-Meterline-Customer": shown.customer_id}, timeout=30)
    assert operator.status_code == 200 and shown.customer_id in operator.text
    assert httpx.get(base, timeout=30).status_code == 401
    assert httpx.get(base, headers={"Authorization": "Bearer sk-nobody"}, timeout=30).status_code == 401


@proxy
def test_expired_forged_and_garbled_tokens_are_refused(metered, shown):
    secret = Meterline(settings=Settings(LITELLM_MASTER_KEY=MASTER_KEY), config=MeterlineConfig()).page_secret
    expired, _ = page_tokens.mint(secret, shown.customer_id, datetime.now(UTC) - timedelta(hours=2), 3600)
    forged, _ = page_tokens.mint(b"not the proxy's secret", shown.customer_id, datetime.now(UTC), 3600)
    base = metered.proxy.base_url + "/meterline/v1/usage/page"
    for token, says in ((expired, "expired"), (forged, "not valid"), ("mlp_garbage", "not a usage page token")):
        for answer in (httpx.get(base, params={"token": token}, timeout=30),
                       httpx.post(base + "/limits", params={"token": token}, data={"hard_limit_credits": "1"},
                                  timeout=30)):
            assert answer.status_code == 401 and answer.headers["content-type"] == "application/json"
            assert answer.json()["error"]["type"] == "invalid_page_token" and says in answer.json()["error"]["message"]
    assert accounts.load_profile(metered.engine, shown.customer_id).limits.hard_limit_ucr != 1 * M


@proxy
def test_only_the_operator_mints_page_tokens(metered, shown):
    before = datetime.now(UTC).replace(microsecond=0)
    link = _mint(metered, shown.customer_id, ttl_seconds=600)
    assert link["url"] == f"/meterline/v1/usage/page?token={link['token']}"
    assert before + timedelta(seconds=600) <= datetime.fromisoformat(link["expires_at"]) <= (
        datetime.now(UTC) + timedelta(seconds=600))
    with metered.api(shown.key) as api:  # a customer's own key
        assert api.post(f"/customers/{shown.customer_id}/page-token").status_code == 401
    with metered.api() as api:
        missing = api.post("/customers/nobody-here/page-token")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_customer"
        for ttl in (59, 2_592_001):
            answer = api.post(f"/customers/{shown.customer_id}/page-token", params={"ttl_seconds": ttl})
            assert answer.status_code == 422 and answer.json()["error"]["param"] == "ttl_seconds"
    token = link["token"]
    as_json = httpx.post(metered.proxy.base_url + "/meterline/v1/usage/page/limits", params={"token": token},
                         json={"hard_limit_ucr": 1}, timeout=30)
    assert as_json.status_code == 415  # the form only: programs use PUT /limits


@pytest.mark.parametrize(("form", "body"), [
    ({}, {"soft_thresholds_pct": None, "hard_limit_ucr": None, "block_overage": False}),
    ({"soft_thresholds_pct": " 50, 80% ,100", "hard_limit_credits": "1,000.25", "block_overage": "on"},
     {"soft_thresholds_pct": [50, 80, 100], "hard_limit_ucr": 1_000_250_000, "block_overage": True}),
    ({"hard_limit_credits": "0.000001"}, {"soft_thresholds_pct": None, "hard_limit_ucr": 1, "block_overage": False}),
])
def test_the_form_becomes_a_limits_body(form, body):
    assert limits_from_form(form) == body


@pytest.mark.parametrize(("form", "says"), [
    ({"soft_thresholds_pct": "fifty"}, "whole percentages"),
    ({"soft_thresholds_pct": "50,,80"}, "whole percentages"),
    ({"soft_thresholds_pct": "12.5"}, "whole percentages"),
    ({"hard_limit_credits": "-5"}, "positive number"),
    ({"hard_limit_credits": "0"}, "positive number"),
    ({"hard_limit_credits": "1e9"}, "positive number"),
    ({"hard_limit_credits": "NaN"}, "positive number"),
    ({"hard_limit_credits": "0.0000001"}, "6 decimal places"),
    ({"hard_limit_credits": "1000000000.5"}, "at most 1,000,000,000 credits"),
])
def test_the_form_refuses_what_is_not_a_number(form, says):
    with pytest.raises(LimitsRefused, match=says):
        limits_from_form(form)


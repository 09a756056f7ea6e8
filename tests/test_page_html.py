"""The usage page's HTML from literal reports: figures in credits, escaping, no outside resources."""

from __future__ import annotations

import pytest

from plugin.api.page_html import render_page
from plugin.rules.policy import credits_grouped
from tests.support.browser import Dom

M = 1_000_000
HOSTILE = '<script>alert("x")</script>'


def report(**changes) -> dict:
    """A usage report as plugin.services.usage.usage_report returns it (the fields the page reads)."""
    base = {
        "customer_id": "acme", "plan": "pro",
        "period_start": "2026-03-01T00:00:00+00:00", "period_end": "2026-04-01T00:00:00+00:00",
        "used_ucr": 1_234_500_000, "reserved_ucr": 0, "included_ucr": 1000 * M, "included_pct": 123.5,
        "overage_ucr": 234_500_000, "hard_limit_ucr": None, "cap_ucr": None, "remaining_ucr": None,
        "projected_ucr": 3_000 * M, "projected_usd": "24.00", "projected_overage_usd": "4.00", "currency": "usd",
        "requests": 7, "saved_ucr": 0,
        "by_model": {"test-model": 1_234_500_000},
        "by_action": {"summarize": 1_000_000_000, HOSTILE: 234_500_000},
        "by_member": {"alice": 1_000_000_000, HOSTILE: 234_500_000},
        "top_actions": [{"action": "summarize", "used_ucr": 1_000_000_000, "share_pct": 81.0},
                        {"action": HOSTILE, "used_ucr": 234_500_000, "share_pct": 19.0}],
        "daily": [{"date": "2026-03-01", "used_ucr": 1_000_000_000, "requests": 5},
                  {"date": "2026-03-02", "used_ucr": 0, "requests": 0},
                  {"date": "2026-03-03", "used_ucr": 234_500_000, "requests": 2}],
        "breaker": "closed",
        "limits": {"customer_id": "acme", "soft_thresholds_pct": [50, 80], "effective_soft_thresholds_pct": [50, 80],
                   "hard_limit_ucr": 2_500_500_000, "hard_limit_usd": None, "block_overage": True,
                   "notify_email": None, "notify_webhook_url": None, "cap_ucr": 1000 * M,
                   "cap_reason": "overage_blocked"},
        "stripe": None,
    }
    return base | changes


def test_every_element_the_design_names_is_there():
    page = Dom(render_page(report(), form_action="/meterline/v1/usage/page/limits?token=t"))
    for element_id in ("used-credits", "included-pct", "projected-usd", "daily-chart", "top-actions", "members",
                       "limits-form"):
        assert element_id in page.by_id, element_id
    assert page.by_id["daily-chart"]["tag"] == "svg" and page.by_id["limits-form"]["tag"] == "form"


def test_figures_are_credits_and_dollars_from_the_report():
    page = Dom(render_page(report(), form_action="/x"))
    assert page.text("used-credits") == "1,234.5"
    assert page.text("included-pct") == "123.5%"
    assert page.text("projected-usd") == "On track for $24.00 this month: $4.00 over included."
    bars = page.all("rect")
    assert [(bar["data-date"], bar["data-used-ucr"]) for bar in bars] == [
        ("2026-03-01", "1000000000"), ("2026-03-02", "0"), ("2026-03-03", "234500000")]
    assert page.all("line", class_="included-line")
    assert page.table("top-actions") == [["summarize", "1,000", "81.0%"],
                                                                  [HOSTILE, "234.5", "19.0%"]]


def test_the_form_shows_the_stored_limits():
    page = Dom(render_page(report(), form_action="/meterline/v1/usage/page/limits?token=a&b"))
    form = page.by_id["limits-form"]["attrs"]
    assert form["method"] == "post" and form["action"] == "/meterline/v1/usage/page/limits?token=a&b"
    inputs = {attrs["name"]: attrs for attrs in page.all("input")}
    assert inputs["soft_thresholds_pct"]["value"] == "50, 80"
    assert inputs["hard_limit_credits"]["value"] == "2500.5"  # credits to type back, no separators
    assert "checked" in inputs["block_overage"]


def test_a_refused_form_shows_what_was_typed_and_why():
    typed = {"soft_thresholds_pct": HOSTILE, "hard_limit_credits": "lots"}
    html = render_page(report(), form_action="/x", error=f"No: {HOSTILE}", typed=typed)
    page = Dom(html)
    inputs = {attrs["name"]: attrs for attrs in page.all("input")}
    assert inputs["soft_thresholds_pct"]["value"] == HOSTILE and inputs["hard_limit_credits"]["value"] == "lots"
    assert "checked" not in inputs["block_overage"]
    assert page.text("limits-error") == f"No: {HOSTILE}"
    assert "<script" not in html


def test_hostile_names_are_escaped():
    html = render_page(report(customer_id=HOSTILE, plan=HOSTILE), form_action='/x"><script>', notice=HOSTILE)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert [tag for tag, _ in Dom(html).tags if tag == "script"] == []


def test_nothing_is_loaded_from_anywhere():
    html = render_page(report(), form_action="/x")
    assert "http://" not in html and "https://" not in html
    for tag, attrs in Dom(html).tags:
        assert not any("//" in (value or "") for value in attrs.values()), (tag, attrs)  # no protocol-relative URL
        assert not {"src", "href", "srcset", "xlink:href"} & set(attrs), tag
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
    assert "url(" not in html and "@import" not in html


def test_members_largest_first_at_most_twenty_the_rest_summed():
    members = {f"member-{number:02}": (number + 1) * M for number in range(25)}
    page = Dom(render_page(report(by_member=members), form_action="/x"))
    rows = page.table("members")
    assert [row[0] for row in rows[:3]] == ["member-24", "member-23", "member-22"]
    assert len(rows) == 21 and rows[-1] == ["(other)", "15", "4.6%"]  # members 00..04: 1+2+3+4+5 of 325 credits

def test_nothing_included_and_nothing_used():
    empty = report(used_ucr=0, included_ucr=0, included_pct=None, overage_ucr=0, projected_ucr=0,
                   projected_usd="0.00", projected_overage_usd="0.00", by_action={}, by_member={},
                   top_actions=[],
                   daily=[{"date": "2026-03-01", "used_ucr": 0, "requests": 0}],
                   limits=report()["limits"] | {"soft_thresholds_pct": None, "hard_limit_ucr": None,
                                                "block_overage": False, "cap_ucr": None})
    page = Dom(render_page(empty, form_action="/x"))
    assert page.text("used-credits") == "0" and page.text("included-pct") == "—"
    assert page.text("projected-usd") == "On track for $0.00 this month, nothing over included."
    assert "No usage yet" in page.text("top-actions") and "No usage yet" in page.text("members")
    inputs = {attrs["name"]: attrs for attrs in page.all("input")}
    assert inputs["soft_thresholds_pct"]["value"] == "" and inputs["hard_limit_credits"]["value"] == ""


@pytest.mark.parametrize(("ucr", "text"), [(0, "0"), (1, "0.000001"), (1_500_000, "1.5"), (1000 * M, "1,000"),
                                          (1_234_567_890_123, "1,234,567.890123")])
def test_credits_are_exact(ucr, text):
    assert credits_grouped(ucr) == text

"""The console's pure parts, with plain values: formats, markers and faults, filter and order, the
limits form's checks, which keys --readonly allows, and when the client asks for gzip."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from tui import format as fmt
from tui import keys
from tui.client import ConsoleClient, ConsoleError, FleetRow, _encoding
from tui.fleet_view import FleetLine, mark_moves, matching
from tui.screens.customers import COLUMNS
from tui.screens.limits import _dollars, _hard_ucr, _thresholds
from tui.widgets.record_table import ordered

M = 1_000_000


def line(customer_id: str, **figures) -> FleetLine:
    """A customer's line as the client decodes it from `GET /customers`."""
    base = {"customer_id": customer_id, "plan": "pro", "used_ucr": 0, "included_ucr": 1000 * M, "included_pct": 0.0,
            "hour_ucr": 0, "today_ucr": 0, "typical_hour_ucr": 0, "burn_ratio": None, "projected_ucr": 0,
            "breaker": "closed", "hard_limit_ucr": None, "cap_ucr": None, "block_overage": False, "alerts_open": 0,
            "hourly_ucr": [0] * 24}
    return msgspec.convert(base | figures, FleetLine)


def test_numbers_are_written_for_people():
    assert [fmt.credits(value) for value in (None, 0, 1_500_000, 250 * M, 12_345 * M, 2_500_000 * M, 12 * 10**13)] == \
        ["—", "0.00", "1.50", "250.0", "12,345", "2,500k", "120.0M"]
    assert (fmt.percent(None), fmt.percent(12.345), fmt.percent(250)) == ("—", "12.3%", "250%")
    assert (fmt.age(5), fmt.age(600), fmt.age(4 * 3600)) == ("5 s", "10 min", "4 h")
    assert fmt.sparkline([0, 1, 4, 8]) == " ▁▄█" and fmt.sparkline([0, 0]) == "  "


def test_markers_say_which_way_a_figure_moved_and_faults_are_flagged():
    before = [line("a", used_ucr=5 * M, hour_ucr=2 * M, projected_ucr=9 * M)]
    a, b = line("a", used_ucr=7 * M, hour_ucr=1 * M, projected_ucr=8 * M), \
        line("b", used_ucr=1001 * M, cap_ucr=1001 * M, block_overage=True)
    mark_moves(before, [a, b])
    assert dict(a.moved) == {"used_ucr": 1, "hour_ucr": -1} and not a.faulty and a.flags == ""
    assert b.moved == {} and b.over_quota and b.limit_hit and b.faulty and b.flags == "LQB"
    c = line("c", breaker="open")
    assert c.faulty and not c.over_quota


def test_the_filter_matches_id_or_plan_in_any_case_and_the_order_puts_missing_values_last():
    lines = [line("Acme-1", plan="pro", burn_ratio=2.0), line("globex", plan="Enterprise"),
             line("acme-2", burn_ratio=0.5, breaker="open")]
    assert [line.customer_id for line in matching(lines, "ACME", faults_only=False)] == ["Acme-1", "acme-2"]
    assert [line.customer_id for line in matching(lines, "enterp", faults_only=False)] == ["globex"]
    assert [line.customer_id for line in matching(lines, "", faults_only=True)] == ["acme-2"]
    assert [line.customer_id for line in ordered(lines, COLUMNS, "burn", True)] == ["Acme-1", "acme-2", "globex"]
    assert [line.customer_id for line in ordered(lines, COLUMNS, "burn", False)] == ["acme-2", "Acme-1", "globex"]


@pytest.mark.parametrize("text, expected", [("", None), ("80, 50,50", [50, 80]), ("100;10", [10, 100])])
def test_soft_thresholds_are_read_as_the_api_takes_them(text, expected):
    assert _thresholds(text) == expected


@pytest.mark.parametrize("call, text, problem", [
    (_thresholds, "eighty", "whole percentages"), (_thresholds, "0", "from 1 to 1000"),
    (_thresholds, ",".join(str(n) for n in range(1, 12)), "at most ten"),
    (_hard_ucr, "many", "a number"), (_hard_ucr, "0", "above 0"), (_hard_ucr, "1.0000001", "six decimals"),
    (_dollars, "ten", "a number"), (_dollars, "-5", "above 0")])
def test_a_limit_that_cannot_be_right_never_leaves_the_form(call, text, problem):
    with pytest.raises(ValueError, match=problem):
        call(text)


def test_limits_in_credits_and_dollars_become_what_the_api_stores():
    assert (_hard_ucr("2,500.5"), _dollars("$25.50")) == (2_500_500_000, "25.50")


def test_readonly_allows_looking_and_only_the_notice_for_changes():
    assert keys.allowed("trip", readonly=False) and not keys.allowed("trip", readonly=True)
    assert keys.allowed("readonly_notice", readonly=True) and not keys.allowed("readonly_notice", readonly=False)
    assert keys.allowed("filter", readonly=True) and keys.allowed("toggle_pause", readonly=True)
    looking = {key.action for key in keys.visible(keys.CUSTOMER_KEYS, readonly=True)}
    assert looking == {"filter", "open", "faults", "sort"}


def test_the_client_asks_for_gzip_only_from_a_remote_proxy():
    assert _encoding("http://127.0.0.1:4000") == _encoding("http://localhost:4000") == "identity"
    assert _encoding("https://proxy.example.com") == "gzip"


@pytest.mark.parametrize("body, said", [
    (b'{"generated_at": "x", "customers": [{"customer_id": 7}], "next_cursor": null}', "$.customers[0].customer_id"),
    (b"<html>gateway error</html>", "the answer is not JSON"),
])
async def test_an_answer_that_does_not_fit_is_one_console_error_naming_what(body, said):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    client = ConsoleClient("http://proxy.example", "sk-secret", transport=transport)
    with pytest.raises(ConsoleError) as raised:
        await client.fleet()
    assert said in str(raised.value) and "sk-secret" not in str(raised.value)
    await client.aclose()


async def test_a_newer_proxys_extra_fields_are_ignored_and_pages_are_followed():
    pages = iter([
        {"generated_at": "a", "customers": [{**_row("a"), "new_field": 1}], "next_cursor": "a"},
        {"generated_at": "b", "customers": [_row("b")], "next_cursor": None},
    ])
    seen_cursors = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen_cursors.append(request.url.params.get("cursor"))
        return httpx.Response(200, json=next(pages))

    client = ConsoleClient("http://proxy.example", "sk", transport=httpx.MockTransport(answer))
    fleet = await client.fleet(FleetLine)
    await client.aclose()
    assert [line.customer_id for line in fleet.customers] == ["a", "b"] and seen_cursors == [None, "a"]
    assert isinstance(fleet.customers[0], FleetLine) and fleet.customers[0].moved == {}


def _row(customer_id: str) -> dict:
    return {name: getattr(line(customer_id), name) for name in FleetRow.__struct_fields__}

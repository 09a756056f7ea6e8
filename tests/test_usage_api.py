"""The usage API through the real proxy: what a customer and the operator read equals the ledger,
a customer key reaches only its own customer, and bad input gets an OpenAI-shaped 4xx."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest

from plugin.ledger import store
from plugin.rules.plans import calendar_month
from tests.test_proxy_metering import ask, expected_ucr, unique

pytestmark = pytest.mark.proxy

M = 1_000_000


def call(tenant, prompt: int, completion: int, *, action: str = "-", member: str | None = None) -> None:
    extra = {"user": member} if member else {}
    tenant.client.chat.completions.create(model="test-model", messages=ask(f"[[p={prompt} c={completion}]]"),
                                          extra_body={"metadata": {"action": action}}, **extra)


@pytest.fixture(scope="module")
def two(metered):
    """Two customers with traffic: `a` with several actions and members, `b` with one call."""
    a, b = metered.tenant(f"ua-{unique()}"), metered.tenant(f"ub-{unique()}")
    call(a, 100, 50, action="summarize", member="alice")
    call(a, 200, 10, action="summarize", member="bob")
    call(a, 300, 20, action="chat", member="alice")
    call(b, 10, 1, action="chat")
    return a, b


def ledger_totals(metered, customer_id: str) -> tuple[int, Counter, Counter, Counter]:
    rows = metered.ledger(customer_id)
    by = {name: Counter() for name in ("model", "action", "member")}
    for row in rows:
        for name, counter in by.items():
            counter[getattr(row, name)] += row.credits_ucr
    return sum(row.credits_ucr for row in rows), by["model"], by["action"], by["member"]


def test_own_usage_equals_the_ledger(metered, two):
    a, _ = two
    answer = metered.api(a.key).get("/usage")
    assert answer.status_code == 200
    usage = answer.json()
    used, by_model, by_action, by_member = ledger_totals(metered, a.customer_id)
    assert used == expected_ucr(100, 50) + expected_ucr(200, 10) + expected_ucr(300, 20)
    period = calendar_month(datetime.now(UTC))
    assert usage["customer_id"] == a.customer_id and usage["plan"] == "pro"
    assert (usage["period_start"], usage["period_end"]) == (period.start.isoformat(), period.end.isoformat())
    assert usage["used_ucr"] == used
    assert (usage["by_model"], usage["by_action"], usage["by_member"]) == (by_model, by_action, by_member)
    assert usage["included_ucr"] == 1000 * M
    assert usage["included_pct"] == round(used * 100 / (1000 * M), 1)
    assert usage["overage_ucr"] == 0 and usage["currency"] == "usd"
    assert usage["top_actions"][0] == {"action": "summarize", "used_ucr": by_action["summarize"],
                                       "share_pct": round(by_action["summarize"] * 100 / used, 1)}
    today = datetime.now(UTC).date().isoformat()
    assert usage["daily"][-1] == {"date": today, "used_ucr": used, "requests": 3}
    assert len(usage["daily"]) == datetime.now(UTC).day and all(day["used_ucr"] == 0 for day in usage["daily"][:-1])
    assert usage["limits"] == metered.api(a.key).get("/limits").json()
    assert usage["stripe"] is None and usage["breaker"] == "closed"
    for field in ("reserved_ucr", "hard_limit_ucr", "cap_ucr", "remaining_ucr", "projected_ucr", "projected_usd"):
        assert field in usage
    # the operator reads the same through its own route, and the previous period is empty
    operator = metered.api()
    assert operator.get(f"/customers/{a.customer_id}/usage").json()["used_ucr"] == used
    previous = operator.get(f"/customers/{a.customer_id}/usage", params={"period": "previous"}).json()
    assert previous["used_ucr"] == 0 and previous["period_end"] == period.start.isoformat()
    at = operator.get(f"/customers/{a.customer_id}/usage", params={"at": period.start.isoformat()}).json()
    assert at["used_ucr"] == used


def test_daily_usage_covers_the_last_n_days_with_zeros(metered, two):
    a, _ = two
    answer = metered.api(a.key).get("/usage/daily", params={"days": 3}).json()
    assert answer["customer_id"] == a.customer_id and answer["included_ucr"] == 1000 * M
    assert [day["used_ucr"] for day in answer["days"]][:2] == [0, 0]
    assert answer["days"][-1]["date"] == datetime.now(UTC).date().isoformat()
    assert answer["days"][-1]["requests"] == 3


def test_a_customer_key_reaches_only_its_own_customer(metered, two):
    a, b = two
    as_b = metered.api(b.key)
    # its own usage, even when it names another customer (the header counts only with the master key)
    assert as_b.get("/usage").json()["customer_id"] == b.customer_id
    assert as_b.get("/usage", headers={"X-Meterline-Customer": a.customer_id}).json()["customer_id"] == b.customer_id
    assert as_b.get("/usage/daily").json()["customer_id"] == b.customer_id
    # every operator route refuses it
    for method, path, body in [
        ("GET", f"/customers/{a.customer_id}/usage", None), ("GET", "/customers", None),
        ("GET", f"/customers/{a.customer_id}", None), ("POST", "/customers", {"customer_id": "x", "plan": "pro"}),
        ("PUT", f"/customers/{a.customer_id}/limits", {"hard_limit_ucr": 1}),
        ("POST", f"/customers/{a.customer_id}/breaker", {"action": "trip"}),
        ("GET", f"/customers/{a.customer_id}/breaker", None),
    ]:
        answer = as_b.request(method, path, json=body)
        assert answer.status_code == 401, (method, path)
        assert answer.json()["error"]["type"] == "invalid_api_key"
    assert metered.api(a.key).get("/limits").json()["hard_limit_ucr"] is None
    # the master key may act for either, naming it
    as_operator = metered.api(**{"X-Meterline-Customer": a.customer_id})
    assert as_operator.get("/usage").json()["customer_id"] == a.customer_id


@pytest.mark.parametrize("path, params, param", [
    ("/usage", {"period": "last"}, "period"),
    ("/usage", {"at": "yesterday"}, "at"),
    ("/usage", {"at": "9999-12-31T23:59:59Z"}, "at"),
    ("/usage", {"at": "0001-01-01T00:00:00Z"}, "at"),
    ("/usage", {"at": "2026-13-01T00:00:00Z"}, "at"),
    ("/usage", {"period": "previous", "at": "2026-11-01T00:00:00Z"}, "at"),
    ("/usage/daily", {"days": 0}, "days"),
    ("/usage/daily", {"days": 367}, "days"),
    ("/usage/daily", {"days": "x"}, "days"),
])
def test_bad_query_values_get_an_openai_shaped_422(metered, two, path, params, param):
    a, _ = two
    answer = metered.api(a.key).get(path, params=params)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request", param, "422")
    assert param in error["message"]


@pytest.mark.parametrize("params, param", [({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"),
                                           ({"q": "x" * 65}, "q")])
def test_bad_fleet_queries_get_a_422(metered, params, param):
    answer = metered.api().get("/customers", params=params)
    assert answer.status_code == 422 and answer.json()["error"]["param"] == param


def test_the_fleet_and_one_customer(metered, two):
    a, b = two
    fleet = metered.api().get("/customers", params={"q": a.customer_id}).json()
    assert [row["customer_id"] for row in fleet["customers"]] == [a.customer_id]
    assert fleet["next_cursor"] is None and fleet["generated_at"]
    [row] = fleet["customers"]
    used = ledger_totals(metered, a.customer_id)[0]
    assert (row["used_ucr"], row["today_ucr"], row["hour_ucr"], row["hourly_ucr"][-1]) == (used,) * 4
    assert len(row["hourly_ucr"]) == 24 and row["plan"] == "pro" and row["breaker"] == "closed"
    page = metered.api().get("/customers", params={"limit": 1}).json()
    assert len(page["customers"]) == 1 and page["next_cursor"] == page["customers"][0]["customer_id"]
    after = metered.api().get("/customers", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert after["customers"][0]["customer_id"] > page["next_cursor"]
    detail = metered.api().get(f"/customers/{a.customer_id}").json()
    # the same row, but for the projection: it moves with the clock between the two calls
    same = [key for key in row if key != "projected_ucr"]
    assert {key: detail[key] for key in same} == {key: row[key] for key in same}
    assert detail["projected_ucr"] >= detail["used_ucr"]
    assert [member["member"] for member in detail["members"]] == ["alice", "bob"]
    assert len(detail["recent"]) == 3 and detail["recent"][0]["prompt_tokens"] == 300
    assert metered.api().get("/customers/nobody").status_code == 404


@pytest.mark.parametrize("accept, encoded", [("gzip", "gzip"), ("br, gzip;q=0.5", "gzip"), ("identity", None),
                                             ("gzip;q=0", None)])
def test_the_fleet_is_gzipped_for_a_client_that_takes_it(metered, two, accept, encoded):
    a, _ = two
    answer = metered.api().get("/customers", params={"q": a.customer_id}, headers={"Accept-Encoding": accept})
    assert answer.status_code == 200 and answer.headers.get("content-encoding") == encoded
    assert "accept-encoding" in answer.headers["vary"].lower()
    assert [row["customer_id"] for row in answer.json()["customers"]] == [a.customer_id]


def test_adding_a_customer(metered):
    customer_id = f"new-{unique()}"
    made = metered.api().post("/customers", json={"customer_id": customer_id, "plan": "free"})
    assert made.status_code == 201
    assert made.json()["customer_id"] == customer_id and made.json()["cap_ucr"] == 100 * M
    assert made.json()["used_ucr"] == 0 and made.json()["hourly_ucr"] == [0] * 24
    again = metered.api().post("/customers", json={"customer_id": customer_id, "plan": "free"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "customer_exists"
    unknown = metered.api().post("/customers", json={"customer_id": f"x-{unique()}", "plan": "platinum"})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "plan"
    bad = metered.api().post("/customers", json={"customer_id": "no spaces", "plan": "pro"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "customer_id"
    extra = metered.api().post("/customers", json={"customer_id": "y", "plan": "pro", "admin": True})
    assert extra.status_code == 422


def test_openapi_describes_meterlines_own_routes(metered):
    answer = httpx.get(metered.proxy.base_url + "/meterline/v1/openapi.json", timeout=30)  # open: no key
    assert answer.status_code == 200
    paths = answer.json()["paths"]
    for path in ("/usage", "/usage/daily", "/customers", "/customers/{customer_id}",
                 "/customers/{customer_id}/usage", "/limits", "/preview"):
        assert f"/meterline/v1{path}" in paths
    assert not any(path.startswith("/v1/") or path.startswith("/chat") for path in paths)
    json.dumps(answer.json())  # plain JSON, no objects the client cannot read


def test_an_acknowledged_alert_is_no_longer_open(metered, two):
    a, _ = two
    store.add_alert(metered.engine, "soft_limit", "80% used", customer_id=a.customer_id)
    [alert] = metered.api().get("/alerts", params={"customer_id": a.customer_id}).json()["alerts"]
    assert (alert["acknowledged"], alert["acknowledged_at"]) == (False, None)

    def open_alerts() -> int:
        return metered.api().get("/customers", params={"q": a.customer_id}).json()["customers"][0]["alerts_open"]

    assert open_alerts() == 1
    assert metered.api(a.key).post(f"/alerts/{alert['id']}/ack").status_code == 401  # a customer's key
    first = metered.api().post(f"/alerts/{alert['id']}/ack")
    assert first.status_code == 200 and first.json()["acknowledged"] is True
    again = metered.api().post(f"/alerts/{alert['id']}/ack").json()
    assert again["acknowledged_at"] == first.json()["acknowledged_at"]  # the first acknowledgement counts
    [seen] = metered.api().get("/alerts", params={"customer_id": a.customer_id}).json()["alerts"]
    assert seen["acknowledged"] is True and open_alerts() == 0
    assert metered.api().post("/alerts/999999999/ack").json()["error"]["type"] == "unknown_alert"
    assert metered.api().post("/alerts/abc/ack").status_code == 422

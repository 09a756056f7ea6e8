"""The emulator's pure parts: form decoding, tier maths, and the account's rules under an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest

from plugin.stripe.emulator.clock import month_period
from plugin.stripe.emulator.errors import ApiError
from plugin.stripe.emulator.faults import Faults
from plugin.stripe.emulator.forms import InvalidParam, Params, decode_form, decode_query
from plugin.stripe.emulator.idempotency import IdempotencyStore, StoredResponse
from plugin.stripe.emulator.meter_events import grouping_windows
from plugin.stripe.emulator.money import (
    Tier,
    graduated_amount,
    round_half_up,
    volume_amount,
)
from plugin.stripe.emulator.state import EmulatorState

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
DAY = 86_400


class FakeClock:
    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ forms


def test_decode_form_rebuilds_the_sdk_bracket_notation():
    body = (b"product=prod_1&currency=usd&billing_scheme=tiered&tiers_mode=graduated"
            b"&tiers[0][up_to]=10000000&tiers[0][unit_amount_decimal]=0"
            b"&tiers[1][up_to]=inf&tiers[1][unit_amount_decimal]=0.0001"
            b"&recurring[interval]=month&recurring[usage_type]=metered&metadata[plan]=pro"
            b"&expand[0]=tiers&lookup_keys[0]=a&lookup_keys[1]=b%20c")
    assert decode_form(body) == {
        "product": "prod_1", "currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
        "tiers": [{"up_to": "10000000", "unit_amount_decimal": "0"}, {"up_to": "inf", "unit_amount_decimal": "0.0001"}],
        "recurring": {"interval": "month", "usage_type": "metered"}, "metadata": {"plan": "pro"},
        "expand": ["tiers"], "lookup_keys": ["a", "b c"],
    }


def test_decode_query_appends_empty_brackets_and_keeps_blank_values():
    assert decode_query("expand[]=a&expand[]=b&metadata[note]=") == {"expand": ["a", "b"], "metadata": {"note": ""}}


def test_sparse_indexes_stay_a_hash_so_params_refuse_them_as_an_array():
    decoded = decode_query("tiers[0][up_to]=1&tiers[2][up_to]=inf")
    assert decoded == {"tiers": {"0": {"up_to": "1"}, "2": {"up_to": "inf"}}}
    with pytest.raises(InvalidParam) as refused:
        Params(decoded).children("tiers")
    assert refused.value.param == "tiers"


@pytest.mark.parametrize("query", ["a=1&a[b]=2", "a[b]=2&a=1", "a=1&a=2", "a[b=1"])
def test_conflicting_or_malformed_keys_are_refused(query):
    with pytest.raises(InvalidParam):
        decode_query(query)


def test_params_name_nested_errors_the_way_stripe_does():
    params = Params(decode_query("tiers[0][up_to]=ten&color=red"))
    with pytest.raises(InvalidParam) as unknown:
        params.only("tiers")
    assert (unknown.value.param, unknown.value.code) == ("color", "parameter_unknown")
    with pytest.raises(InvalidParam) as bad_integer:
        params.children("tiers")[0].integer("up_to")
    assert (bad_integer.value.param, bad_integer.value.code) == (
        "tiers[0][up_to]", "parameter_invalid_integer")
    with pytest.raises(InvalidParam) as missing:
        params.text("currency", required=True)
    assert (missing.value.param, missing.value.code) == ("currency", "parameter_missing")


# ------------------------------------------------------------------------------ money


FREE_THEN_TENTH_OF_A_MILLICENT = [
    Tier(10_000_000, Fraction(0), Fraction(0)), Tier(None, Fraction(1, 10_000), Fraction(0)),
]


@pytest.mark.parametrize(("units", "cents"), [
    (0, 0), (10_000_000, 0), (10_004_999, 0), (10_005_000, 1), (12_345_678, 235), (1_010_000_000, 100_000),
])
def test_graduated_free_allowance_then_fractional_cents(units, cents):
    assert round_half_up(graduated_amount(FREE_THEN_TENTH_OF_A_MILLICENT, Fraction(units))) == cents


def test_graduated_charges_each_entered_tier_its_flat_fee_and_the_first_one_always():
    tiers = [Tier(5, Fraction(100), Fraction(50)), Tier(10, Fraction(80), Fraction(20)),
             Tier(None, Fraction(60), Fraction(0))]
    assert graduated_amount(tiers, Fraction(0)) == 50
    assert graduated_amount(tiers, Fraction(5)) == 5 * 100 + 50
    assert graduated_amount(tiers, Fraction(7)) == 5 * 100 + 50 + 2 * 80 + 20
    assert graduated_amount(tiers, Fraction(12)) == 5 * 100 + 50 + 5 * 80 + 20 + 2 * 60


def test_volume_prices_every_unit_at_the_tier_the_total_lands_in():
    tiers = [Tier(5, Fraction(100), Fraction(0)), Tier(None, Fraction(60), Fraction(10))]
    assert volume_amount(tiers, Fraction(5)) == 500
    assert volume_amount(tiers, Fraction(6)) == 6 * 60 + 10


@pytest.mark.parametrize(("amount", "cents"), [(Fraction(1, 2), 1), (Fraction(3, 2), 2), (Fraction(249, 100), 2),
                                               (Fraction(2345678, 10_000), 235)])
def test_rounding_is_half_up_on_exact_fractions(amount, cents):
    assert round_half_up(amount) == cents


def test_month_period_wraps_the_year():
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert month_period(december) == (int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
                                      int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()))


def test_grouping_windows_cut_at_utc_boundaries_inside_the_range():
    assert grouping_windows(1800, 9000, 3600) == [(1800, 3600), (3600, 7200), (7200, 9000)]
    assert grouping_windows(0, 60, None) == [(0, 60)]


# ------------------------------------------------------------------------------ the account


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emitted() -> list[dict]:
    return []


@pytest.fixture
def account(clock, emitted):
    """A state with a customer, a `meterline_credits` meter, a graduated metered price and a subscription."""
    state = EmulatorState(clock, on_event=emitted.append)
    customer = state.create_customer(Params({"email": "a@example.com"}))
    product = state.create_product(Params({"name": "Credits"}))
    meter = state.create_meter(Params({"display_name": "Credits", "event_name": "meterline_credits",
                                       "default_aggregation": {"formula": "sum"}}))
    price = state.create_price(Params(decode_query(
        f"product={product['id']}&currency=usd&billing_scheme=tiered&tiers_mode=graduated"
        "&tiers[0][up_to]=10000000&tiers[0][unit_amount_decimal]=0&tiers[1][up_to]=inf"
        f"&tiers[1][unit_amount_decimal]=0.0001&recurring[interval]=month&recurring[usage_type]=metered"
        f"&recurring[meter]={meter['id']}&lookup_key=meterline_credits"
    )))
    seat = state.create_price(Params(decode_query(
        f"product={product['id']}&currency=usd&unit_amount=1000&recurring[interval]=month"
    )))
    subscription = state.create_subscription(Params({"customer": customer["id"], "items": [
        {"price": price["id"]}, {"price": seat["id"], "quantity": "2"}]}))
    return state, customer["id"], meter["id"], subscription["id"]


def meter_event(customer: str, identifier: str, value: str = "1500000", timestamp: float | None = None) -> Params:
    params = {"event_name": "meterline_credits", "identifier": identifier,
              "payload": {"stripe_customer_id": customer, "value": value}}
    if timestamp is not None:
        params["timestamp"] = str(int(timestamp))
    return Params(params)


def stream_event(customer: str, identifier: str, value: str = "1", event_name: str = "meterline_credits") -> dict:
    return {"event_name": event_name, "identifier": identifier,
            "payload": {"stripe_customer_id": customer, "value": value}}


def test_an_identifier_is_refused_for_24_hours_then_accepted_again(account, clock):
    state, customer, _, _ = account
    state.create_meter_event(meter_event(customer, "mtr_a"))
    clock.now += DAY - 1
    with pytest.raises(ApiError) as duplicate:
        state.create_meter_event(meter_event(customer, "mtr_a"))
    assert (duplicate.value.status, duplicate.value.code, duplicate.value.param, duplicate.value.should_retry) == (
        400, None, None, False)
    assert duplicate.value.message == "An event already exists with identifier mtr_a."
    clock.now += 1
    state.create_meter_event(meter_event(customer, "mtr_a"))
    assert [event["identifier"] for event in state.meter_event_log()["events"]] == ["mtr_a", "mtr_a"]
    assert state.meter_event_log()["duplicates"] == 1


@pytest.mark.parametrize(("offset", "code"), [
    (-35 * DAY, None), (-35 * DAY - 1, "timestamp_too_far_in_past"), (300, None), (301, "timestamp_in_future"),
])
def test_timestamp_window_is_35_days_back_and_5_minutes_ahead(account, clock, offset, code):
    state, customer, _, _ = account
    params = meter_event(customer, f"mtr_{offset}", timestamp=clock.now + offset)
    if code is None:
        assert state.create_meter_event(params)["timestamp"] == int(clock.now + offset)
        return
    with pytest.raises(ApiError) as refused:
        state.create_meter_event(params)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, code, "timestamp")
    assert state.meter_event_log()["count"] == 0


@pytest.mark.parametrize(("payload", "code", "param"), [
    ({"value": "1"}, "meter_event_no_customer_defined", "payload[stripe_customer_id]"),
    ({"stripe_customer_id": "cus_nobody", "value": "1"}, "meter_event_customer_not_found",
     "payload[stripe_customer_id]"),
    ({"stripe_customer_id": "CUSTOMER", "value": "lots"}, "meter_event_invalid_value", "payload[value]"),
    ({"stripe_customer_id": "CUSTOMER"}, "meter_event_value_not_found", "payload[value]"),
])
def test_v1_refuses_events_it_cannot_attribute_or_count(account, payload, code, param):
    state, customer, _, _ = account
    payload = {key: customer if value == "CUSTOMER" else value for key, value in payload.items()}
    with pytest.raises(ApiError) as refused:
        state.create_meter_event(Params({"event_name": "meterline_credits", "payload": payload}))
    assert (refused.value.code, refused.value.param) == (code, param)
    assert state.meter_event_log()["rejected"] == 1


def test_an_event_name_without_an_active_meter_is_refused(account):
    state, customer, meter, _ = account
    with pytest.raises(ApiError) as unknown:
        state.create_meter_event(Params({"event_name": "other", "payload": {"stripe_customer_id": customer,
                                                                             "value": "1"}}))
    assert unknown.value.code == "no_meter"
    state.set_meter_active(meter, False, Params({}))
    with pytest.raises(ApiError) as archived:
        state.create_meter_event(meter_event(customer, "mtr_b"))
    assert archived.value.code == "archived_meter"


def test_identifier_longer_than_100_characters_is_refused(account):
    state, customer, _, _ = account
    with pytest.raises(InvalidParam) as refused:
        state.create_meter_event(meter_event(customer, "x" * 101))
    assert refused.value.param == "identifier"


def test_idempotency_replays_the_first_answer_and_refuses_other_params():
    store = IdempotencyStore()
    assert store.begin("key", "A", now=0) is None
    with pytest.raises(ApiError) as in_progress:
        store.begin("key", "A", now=1)
    assert (in_progress.value.status, in_progress.value.code) == (409, "idempotency_key_in_use")
    store.finish("key", StoredResponse(200, '{"id":"x"}'))
    assert store.begin("key", "A", now=2) == StoredResponse(200, '{"id":"x"}')
    with pytest.raises(ApiError) as mismatch:
        store.begin("key", "B", now=3)
    assert (mismatch.value.status, mismatch.value.type) == (400, "idempotency_error")
    assert store.begin("key", "B", now=DAY) is None  # forgotten after 24 h: runs afresh


def test_stream_records_valid_events_skips_duplicates_and_reports_invalid_ones(account, emitted):
    state, customer, meter, _ = account
    state.create_meter_event(meter_event(customer, "seen_before"))
    emitted.clear()
    events = [stream_event(customer, f"ok_{index}") for index in range(3)]
    events += [stream_event(customer, "seen_before"), stream_event("cus_nobody", "bad_customer"),
               stream_event(customer, "bad_value", value="1,5"), stream_event(customer, "no_meter", event_name="x")]
    state.accept_meter_event_stream(Params({"events": events}))

    log = state.meter_event_log()
    assert [event["identifier"] for event in log["events"] if event["source"] == "v2"] == ["ok_0", "ok_1", "ok_2"]
    assert (log["duplicates"], log["rejected"]) == (1, 3)
    # reported as Stripe does, in thin events only (this state is in snapshot mode), the data fetched by id
    assert {event["type"] for event in emitted} == {"v1.billing.meter.error_report_triggered",
                                                    "v1.billing.meter.no_meter_found"}
    assert all(event["object"] == "v2.core.event" and "data" not in event for event in emitted)
    reports = {event["type"]: state.store.get("thin_event", event["id"]) for event in emitted}
    metered = reports["v1.billing.meter.error_report_triggered"]
    assert metered["related_object"]["id"] == meter
    assert sorted(error["code"] for error in metered["data"]["reason"]["error_types"]) == [
        "meter_event_customer_not_found", "meter_event_invalid_value"]
    nameless = reports["v1.billing.meter.no_meter_found"]["data"]
    assert nameless["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"] == "no_meter"


def test_stream_refuses_batches_over_100_events_and_bad_timestamps_synchronously(account):
    state, customer, _, _ = account
    with pytest.raises(InvalidParam):
        state.accept_meter_event_stream(Params({"events": [stream_event(customer, str(i)) for i in range(101)]}))
    with pytest.raises(InvalidParam) as bad_time:
        state.accept_meter_event_stream(Params({"events": [{**stream_event(customer, "t"), "timestamp": "yesterday"}]}))
    assert bad_time.value.param == "events[0][timestamp]"
    assert state.meter_event_log()["count"] == 0


def test_session_tokens_expire_after_15_minutes(account, clock):
    state = account[0]
    token = state.create_meter_event_session(Params({}))["authentication_token"]
    clock.now += 15 * 60 - 1
    state.check_session_token(token)
    clock.now += 1
    with pytest.raises(ApiError) as expired:
        state.check_session_token(token)
    assert (expired.value.status, expired.value.code) == (401, "billing_meter_event_session_expired")


def test_one_v1_call_at_a_time_per_customer_and_meter(account, clock):
    state, customer, _, _ = account
    raw = {"event_name": "meterline_credits", "payload": {"stripe_customer_id": customer, "value": "1"}}
    slot = state.claim_meter_event_slot(raw)
    with pytest.raises(ApiError) as busy:
        state.claim_meter_event_slot(raw)
    assert (busy.value.status, busy.value.code) == (429, "rate_limit")
    other = state.create_customer(Params({}))["id"]
    state.release_meter_event_slot(
        state.claim_meter_event_slot({**raw, "payload": {"stripe_customer_id": other}}))
    state.release_meter_event_slot(slot)
    state.release_meter_event_slot(state.claim_meter_event_slot(raw))
    lenient = EmulatorState(clock, strict_concurrency=False)
    assert lenient.claim_meter_event_slot(raw) is None


def test_faults_match_prefix_and_phase_and_run_out():
    faults = Faults()
    faults.add(1, 503, path_prefix="/v1/billing/meter_events")
    faults.add(1, 500, after_record=True)
    assert faults.take("/v1/customers", after_record=False) is None
    assert faults.take("/v1/billing/meter_events", after_record=False) == 503
    assert faults.take("/v1/billing/meter_events", after_record=False) is None
    assert faults.take("/v1/customers", after_record=True) == 500
    assert faults.take("/v1/customers", after_record=True) is None


def test_summaries_sum_the_window_and_refuse_unaligned_times(account, clock):
    state, customer, meter, _ = account
    hour = int(clock.now) - int(clock.now) % 3600
    for index, (offset, value) in enumerate([(-7200, "5"), (-3600, "7"), (-3590, "11"), (0, "13")]):
        state.create_meter_event(meter_event(customer, f"e{index}", value, timestamp=hour + offset))
    window = {"customer": customer, "start_time": str(hour - 7200), "end_time": str(hour)}
    summary = state.meter_event_summaries(meter, Params(window))
    assert [item["aggregated_value"] for item in summary["data"]] == [23]  # end_time is exclusive
    hourly = state.meter_event_summaries(meter, Params({**window, "value_grouping_window": "hour"}))
    assert [item["aggregated_value"] for item in hourly["data"]] == [5, 18]
    with pytest.raises(InvalidParam) as unaligned:
        state.meter_event_summaries(meter, Params({"customer": customer, "start_time": str(hour + 1),
                                                   "end_time": str(hour + 3600)}))
    assert unaligned.value.param == "start_time"


def test_invoice_preview_prices_usage_of_the_period_and_licensed_quantities(account, clock):
    state, customer, _, subscription = account
    state.create_meter_event(meter_event(customer, "u1", "12000000"))
    state.create_meter_event(meter_event(customer, "u2", "345678"))
    state.create_meter_event(meter_event(customer, "last_month", "99999999", timestamp=clock.now - 20 * DAY))
    invoice = state.preview_invoice(Params({"customer": customer, "subscription": subscription}))
    amounts = {line["quantity"]: line["amount"] for line in invoice["lines"]["data"]}
    assert amounts == {12_345_678: 235, 2: 2000}
    assert invoice["total"] == invoice["amount_due"] == 2235
    assert (invoice["period_start"], invoice["period_end"]) == month_period(clock.now)


def test_finalizing_a_period_stores_a_draft_invoice_and_emits_invoice_created(account, emitted):
    state, _, _, subscription = account
    invoice = state.finalize_period(subscription)
    assert state.retrieve("invoice", invoice["id"], Params({}))["status"] == "draft"
    assert emitted[-1]["type"] == "invoice.created" and emitted[-1]["data"]["object"]["id"] == invoice["id"]


def test_lookup_keys_are_unique_unless_transferred(account):
    state = account[0]
    product = state.create_product(Params({"name": "Other"}))["id"]
    params = {"product": product, "currency": "usd", "unit_amount": "5", "lookup_key": "meterline_credits"}
    with pytest.raises(InvalidParam) as taken:
        state.create_price(Params(params))
    assert taken.value.param == "lookup_key"
    with pytest.raises(InvalidParam):  # refused for another reason: the key must stay where it was
        state.create_price(Params({**params, "transfer_lookup_key": "true", "recurring": {"interval": "fortnight"}}))
    holder = state.list_prices(Params({"lookup_keys": ["meterline_credits"]}))["data"]
    assert [price["recurring"]["usage_type"] for price in holder] == ["metered"]
    moved = state.create_price(Params({**params, "transfer_lookup_key": "true"}))
    found = state.list_prices(Params({"lookup_keys": ["meterline_credits"]}))["data"]
    assert [price["id"] for price in found] == [moved["id"]]


@pytest.mark.parametrize("tiers", [
    [{"up_to": "10", "unit_amount": "1"}],
    [{"up_to": "inf", "unit_amount": "1"}, {"up_to": "10", "unit_amount": "1"}],
    [{"up_to": "10", "unit_amount": "1"}, {"up_to": "5", "unit_amount": "1"}, {"up_to": "inf", "unit_amount": "1"}],
    [{"up_to": "inf"}],
])
def test_tiers_must_ascend_end_with_inf_and_carry_an_amount(account, tiers):
    state = account[0]
    product = state.create_product(Params({"name": "Tiered"}))["id"]
    with pytest.raises(InvalidParam):
        state.create_price(Params({"product": product, "currency": "usd", "billing_scheme": "tiered",
                                   "tiers_mode": "graduated", "tiers": tiers}))


def test_lists_page_newest_first_with_starting_after(account):
    state = account[0]
    created = [state.create_customer(Params({"name": f"c{index}"}))["id"] for index in range(3)]
    first = state.list_customers(Params({"limit": "2"}))
    assert [customer["id"] for customer in first["data"]] == created[::-1][:2] and first["has_more"]
    rest = state.list_customers(Params({"limit": "2", "starting_after": first["data"][-1]["id"]}))
    assert len(rest["data"]) == 2 and not rest["has_more"]  # the last page holds c0 and the fixture's customer


def summary_values(state: EmulatorState, meter: str, customer: str, start: int, end: int, **extra: str) -> list:
    params = {"customer": customer, "start_time": str(start), "end_time": str(end), **extra}
    return [item["aggregated_value"] for item in state.meter_event_summaries(meter, Params(params))["data"]]


@pytest.mark.parametrize(("grouping", "start", "end", "param"), [
    ("hour", 1800, 3600, "start_time"), ("hour", 0, 5400, "end_time"),
    ("day", 3600, DAY, "start_time"), ("day", 0, DAY + 3600, "end_time"),
])
def test_grouped_summaries_need_bounds_on_the_window_s_boundaries(account, clock, grouping, start, end, param):
    state, customer, meter, _ = account
    midnight = int(clock.now) // DAY * DAY
    with pytest.raises(InvalidParam) as unaligned:
        summary_values(state, meter, customer, midnight + start, midnight + end, value_grouping_window=grouping)
    assert unaligned.value.param == param
    assert unaligned.value.message == (f"{param} must be aligned with {grouping} boundaries"
                                       f"{' (00:00 UTC)' if grouping == 'day' else ''} when value_grouping_window "
                                       f"is {grouping}.")


def test_summaries_leave_out_events_received_within_the_lag(account, clock):
    state, customer, meter, _ = account
    hour = int(clock.now) - int(clock.now) % 3600
    state.create_meter_event(meter_event(customer, "old", "5", timestamp=hour))
    state.set_summary_lag(300)
    clock.now += 200
    state.create_meter_event(meter_event(customer, "new", "7", timestamp=hour))  # the same hour, received later
    clock.now += 100
    assert summary_values(state, meter, customer, hour, hour + 3600) == [5]
    assert state.meter_events.aggregated(state.store.get("meter", meter), customer, hour, hour + 3600) == 12
    clock.now += 199
    assert summary_values(state, meter, customer, hour, hour + 3600) == [5]
    clock.now += 1
    assert summary_values(state, meter, customer, hour, hour + 3600, value_grouping_window="hour") == [12]
    state.reset()
    assert state.summary_lag() == 0


def test_a_forgotten_event_is_as_if_never_recorded(account, clock):
    state, customer, meter, subscription = account
    hour = int(clock.now) - int(clock.now) % 3600
    state.create_meter_event(meter_event(customer, "lost", "12000000", timestamp=hour))
    state.create_meter_event(meter_event(customer, "kept", "345678", timestamp=hour))
    assert state.forget_meter_event("lost")["forgotten"] is True
    assert summary_values(state, meter, customer, hour, hour + 3600) == [345678]
    invoice = state.preview_invoice(Params({"customer": customer, "subscription": subscription}))
    assert {line["quantity"] for line in invoice["lines"]["data"]} == {345678, 2}
    state.create_meter_event(meter_event(customer, "lost", "12000000", timestamp=hour))
    with pytest.raises(ApiError):  # the resend holds the identifier again, for its own 24 h
        state.create_meter_event(meter_event(customer, "lost", "12000000", timestamp=hour))
    assert summary_values(state, meter, customer, hour, hour + 3600) == [12_345_678]
    log = state.meter_event_log()
    assert [(event["identifier"], event["forgotten"]) for event in log["events"]] == [
        ("lost", True), ("kept", False), ("lost", False)]
    assert (log["count"], log["forgotten"], log["duplicates"]) == (3, 1, 1)
    with pytest.raises(ApiError) as missing:
        state.forget_meter_event("never")
    assert (missing.value.status, missing.value.param) == (404, "identifier")


def test_forgetting_an_identifier_recorded_twice_takes_the_newest_record_first(account, clock):
    state, customer, meter, _ = account
    state.create_meter_event(meter_event(customer, "again", "1"))
    clock.now += DAY
    state.create_meter_event(meter_event(customer, "again", "2"))  # its first 24 h are over: recorded twice
    window = (int(clock.now) // DAY * DAY - DAY, int(clock.now) // DAY * DAY + DAY)
    state.forget_meter_event("again")
    assert summary_values(state, meter, customer, *window, value_grouping_window="day") == [1, 0]
    state.forget_meter_event("again")
    assert summary_values(state, meter, customer, *window, value_grouping_window="day") == [0, 0]
    with pytest.raises(ApiError) as none_left:
        state.forget_meter_event("again")
    assert none_left.value.status == 404
    assert [event["forgotten"] for event in state.meter_event_log()["events"]] == [True, True]


def test_the_cycle_runs_only_when_something_falls_due_and_finalizes_after_the_grace(account, clock, emitted):
    state, customer, _, subscription = account
    start, end = month_period(clock.now)
    state.create_meter_event(meter_event(customer, "u1", "12000000"))
    emitted.clear()
    state.run_due_billing()
    assert emitted == [] and state.store.due_at == end  # nothing before the period ends: one comparison
    clock.now = end
    state.run_due_billing()
    assert [event["type"] for event in emitted] == ["customer.subscription.updated", "invoice.created"]
    draft = emitted[-1]["data"]["object"]
    assert (draft["total"], draft["period_start"], draft["period_end"]) == (200 + 2000, start, end)
    assert state.store.due_at == end + 3600 == draft["automatically_finalizes_at"]
    state.set_invoice_grace(60)  # for drafts made from now on; this one keeps its hour
    clock.now = end + 3599
    state.run_due_billing()
    assert state.retrieve("invoice", draft["id"], Params({}))["status"] == "draft"
    clock.now = end + 3600
    state.run_due_billing()
    assert [event["type"] for event in emitted[2:]] == ["invoice.finalized"]
    assert emitted[1]["data"]["object"]["status"] == "draft"  # what was sent is a snapshot, not the live object
    assert state.retrieve("subscription", subscription, Params({}))["items"]["data"][0]["current_period_start"] == end


def test_thin_mode_stores_a_v2_event_per_event_and_sends_the_notification(account, clock, emitted):
    state, _, _, subscription = account
    state.set_webhook_mode("thin")
    emitted.clear()
    invoice = state.finalize_period(subscription)
    [notification] = emitted
    assert set(notification) == {"id", "object", "type", "livemode", "created", "related_object"}  # no data
    assert (notification["type"], notification["related_object"]) == (
        "v1.invoice.created", {"id": invoice["id"], "type": "invoice", "url": f"/v1/invoices/{invoice['id']}"})
    stored = state.retrieve("thin_event", notification["id"], Params({}))
    assert state.retrieve("event", stored["snapshot_event"], Params({}))["type"] == "invoice.created"
    with pytest.raises(InvalidParam) as unknown:
        state.set_webhook_mode("fat")
    assert unknown.value.param == "mode"
    state.reset()
    assert state.webhook_mode() == "snapshot" and state.invoice_grace() == 3600

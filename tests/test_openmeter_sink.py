"""The OpenMeter sink: CloudEvents and answer mapping as plain values, then delivery to a real local server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from plugin.sinks.base import (
    DELIVERED,
    MeterEvent,
    Outcome,
    OutcomeKind,
    Sink,
    retry_after_seconds,
)
from plugin.sinks.openmeter import (
    BATCH_TYPE,
    SINGLE_TYPE,
    OpenMeterSink,
    classify,
    cloud_event,
    encode,
    transport_outcome,
    without_secret,
)
from tests.support.openmeter import OpenMeterServer, run_openmeter
from tests.support.processes import free_port

TOKEN = "om_test"
AT = datetime(2025, 3, 4, 5, 6, 7, 890_123, tzinfo=UTC)
RETRY, REJECTED = OutcomeKind.RETRY, OutcomeKind.REJECTED


def meter_event(identifier: str, value_ucr: int = 1_500_000, customer_id: str = "cus_1",
                occurred_at: datetime = AT) -> MeterEvent:
    return MeterEvent(identifier=identifier, customer_id=customer_id, value_ucr=value_ucr, occurred_at=occurred_at)


def problem(status: int, detail: str) -> bytes:
    return json.dumps({"type": "about:blank", "title": "T", "status": status, "detail": detail}).encode()


# ------------------------------------------------------------------ cloud_event


def test_cloud_event_carries_identifier_customer_and_credits_as_a_string():
    assert cloud_event(meter_event("led_1"), "meterline", "meterline.credits") == {
        "specversion": "1.0",
        "id": "led_1",
        "source": "meterline",
        "type": "meterline.credits",
        "subject": "cus_1",
        "time": "2025-03-04T05:06:07.890123Z",
        "data": {"credits_ucr": "1500000"},
    }


@pytest.mark.parametrize(
    ("occurred_at", "expected"),
    [
        (datetime(2025, 1, 1, tzinfo=UTC), "2025-01-01T00:00:00.000000Z"),
        (datetime(2025, 1, 1, 2, 30, tzinfo=timezone(timedelta(hours=2))), "2025-01-01T00:30:00.000000Z"),
        (datetime(2024, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-3))), "2025-01-01T02:00:00.000000Z"),
        (datetime(2025, 1, 1, 12, 0, 0, 5), "2025-01-01T12:00:00.000005Z"),  # naive: already UTC (SQLite)
    ],
)
def test_cloud_event_time_is_rfc3339_utc(occurred_at, expected):
    assert cloud_event(meter_event("e", occurred_at=occurred_at), "s", "t")["time"] == expected


@pytest.mark.parametrize("value_ucr", [1, 999_999, 2**53 + 1, 2**63 - 1])
def test_credits_keep_every_digit(value_ucr):
    data = cloud_event(meter_event("e", value_ucr=value_ucr), "s", "t")["data"]
    assert int(data["credits_ucr"]) == value_ucr
    assert int(json.loads(json.dumps(data))["credits_ucr"]) == value_ucr


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (meter_event("e", value_ucr=0), "positive int"),
        (meter_event("e", value_ucr=-5), "positive int"),
        (meter_event("e", value_ucr=True), "positive int"),
        (meter_event("e", value_ucr=1.5), "positive int"),  # type: ignore[arg-type]
        (meter_event(""), "no identifier"),
        (meter_event("e", customer_id=""), "no customer_id"),
    ],
)
def test_cloud_event_refuses_what_must_never_be_billed(event, message):
    with pytest.raises(ValueError, match=message):
        cloud_event(event, "s", "t")


def test_one_event_is_a_single_cloudevent_several_are_a_batch():
    one, two = ({"id": str(n)} for n in range(2))
    assert encode([one]) == (b'{"id":"0"}', SINGLE_TYPE)
    assert encode([one, two]) == (b'[{"id":"0"},{"id":"1"}]', BATCH_TYPE)


# ------------------------------------------------------------------ classify

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind", "uncertain", "retry_after", "in_reason"),
    [
        (204, {}, b"", OutcomeKind.DELIVERED, False, None, ""),
        (200, {}, b"{}", OutcomeKind.DELIVERED, False, None, ""),
        (202, {}, b"", OutcomeKind.DELIVERED, False, None, ""),
        (429, {"Retry-After": "7"}, problem(429, "slow down"), RETRY, False, 7.0, "slow down"),
        (429, {"retry-after": "Wed, 01 Jan 2025 12:00:30 GMT"}, b"", RETRY, False, 30.0, "HTTP 429"),
        (429, {}, b"", RETRY, False, None, "Too Many Requests"),
        (500, {}, problem(500, "boom"), RETRY, True, None, "boom"),
        (502, {}, b"<html>bad gateway</html>", RETRY, True, None, "<html>bad gateway</html>"),
        (503, {"Retry-After": "2"}, b"", RETRY, True, 2.0, "Service Unavailable"),
        (408, {}, b"", RETRY, True, None, "Request Timeout"),
        (400, {}, problem(400, "event 0: time is not RFC 3339"), REJECTED, False, None, "time is not RFC 3339"),
        (401, {}, problem(401, "invalid token"), REJECTED, False, None, "credentials"),
        (403, {}, problem(403, "forbidden"), REJECTED, False, None, "credentials"),
        (404, {}, b"not found", REJECTED, False, None, "base_url"),
        (415, {}, b"", REJECTED, False, None, "Unsupported Media Type"),
        (301, {"Location": "https://elsewhere"}, b"", REJECTED, False, None, "HTTP 301"),
    ],
)
def test_classify(status, headers, body, kind, uncertain, retry_after, in_reason):
    outcome = classify(status, headers, body, now=NOW)
    assert (outcome.kind, outcome.uncertain, outcome.retry_after) == (kind, uncertain, retry_after)
    assert in_reason in outcome.reason


def test_classify_reason_is_one_short_line():
    detail = "line one\nline two\r\n\tindented " + "x" * 1000
    reason = classify(400, {}, problem(400, detail)).reason
    assert "\n" not in reason and "\r" not in reason and "\t" not in reason
    assert "line one line two indented" in reason
    assert len(reason) <= 300


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        (None, NOW, None),
        ("", NOW, None),
        ("0", NOW, 0.0),
        ("120", None, 120.0),
        (" 1.5 ", None, 1.5),
        ("-3", None, 0.0),
        ("nan", None, None),
        ("soon", NOW, None),
        ("Wed, 01 Jan 2025 12:01:00 GMT", NOW, 60.0),
        ("Wed, 01 Jan 2025 11:00:00 GMT", NOW, 0.0),  # in the past: go now
        ("Wed, 01 Jan 2025 12:01:00 GMT", None, None),  # a date needs a clock
    ],
)
def test_retry_after_seconds(value, now, expected):
    assert retry_after_seconds(value, now) == expected


@pytest.mark.parametrize(
    ("error", "uncertain"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), False),
        (httpx.ConnectTimeout("timed out"), False),
        (httpx.PoolTimeout("no connection free"), False),
        (httpx.ReadTimeout(""), True),
        (httpx.WriteTimeout("timed out"), True),
        (httpx.ReadError("connection reset by peer"), True),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
    ],
)
def test_transport_outcome(error, uncertain):
    outcome = transport_outcome(error)
    assert (outcome.kind, outcome.uncertain) == (RETRY, uncertain)
    assert type(error).__name__ in outcome.reason


def test_without_secret_masks_the_token_only():
    outcome = Outcome(REJECTED, "invalid bearer token 'om_live_secret' for om_live")
    assert without_secret(outcome, "om_live_secret").reason == "invalid bearer token '[token]' for om_live"
    assert without_secret(outcome, None) is outcome


@pytest.mark.parametrize(
    "kwargs",
    [{"base_url": "openmeter.local"}, {"base_url": "ftp://openmeter.local"}, {"base_url": "http://x", "max_batch": 0},
     {"base_url": "http://x", "timeout": 0}, {"base_url": "http://x", "source": ""}],
)
def test_constructor_refuses_a_sink_that_could_never_deliver(kwargs):
    with pytest.raises(ValueError):
        OpenMeterSink(**kwargs)


# ------------------------------------------------------------------ against a real local OpenMeter


@pytest.fixture(scope="module")
def openmeter_server() -> Iterator[OpenMeterServer]:
    with run_openmeter(token=TOKEN) as server:
        yield server


@pytest.fixture
def openmeter(openmeter_server: OpenMeterServer) -> OpenMeterServer:
    openmeter_server.reset()
    return openmeter_server


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., OpenMeterSink]]:
    """Sinks built by a test, closed after it."""
    made: list[OpenMeterSink] = []

    def make(base_url: str, token: str | None = TOKEN, **kwargs) -> OpenMeterSink:
        sink = OpenMeterSink(base_url, token, **kwargs)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.aclose()


def kinds(outcomes) -> list[OutcomeKind]:
    return [outcome.kind for outcome in outcomes]


def test_the_sink_satisfies_the_protocol():
    sink: Sink = OpenMeterSink("http://127.0.0.1:1")
    assert (sink.name, sink.serial_per_customer, sink.max_batch, sink.dedupe_window) == ("openmeter", False, 100, None)
    assert OpenMeterSink("http://x", dedupe_window=timedelta(days=32)).dedupe_window == timedelta(days=32)


async def test_a_batch_is_delivered_in_one_call(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)
    events = [meter_event(f"led_{n}", value_ucr=n * 1_000_001, customer_id=f"cus_{n % 2}") for n in range(1, 4)]

    assert await sink.send(events) == [DELIVERED] * 3

    calls = openmeter.calls()
    assert [(call["content_type"], call["ids"], call["status"]) for call in calls] == [
        (BATCH_TYPE, ["led_1", "led_2", "led_3"], 204),
    ]
    assert openmeter.events() == [cloud_event(event, "meterline", "meterline.credits") for event in events]


async def test_a_single_event_goes_as_one_cloudevent(openmeter, make_sink):
    sink = make_sink(openmeter.base_url, source="meterline-eu", event_type="acme.credits")
    assert await sink.send([meter_event("led_1")]) == [DELIVERED]
    assert openmeter.calls()[0]["content_type"] == SINGLE_TYPE
    [recorded] = openmeter.events()
    assert (recorded["source"], recorded["type"]) == ("meterline-eu", "acme.credits")


async def test_an_empty_send_makes_no_call(openmeter, make_sink):
    assert await make_sink(openmeter.base_url).send([]) == []
    assert openmeter.calls() == []


async def test_more_than_max_batch_is_a_caller_bug(openmeter, make_sink):
    sink = make_sink(openmeter.base_url, max_batch=2)
    with pytest.raises(ValueError, match="max_batch"):
        await sink.send([meter_event(f"e{n}") for n in range(3)])
    assert openmeter.calls() == []


async def test_resending_the_same_identifiers_records_nothing_new(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)
    events = [meter_event(f"led_{n}") for n in range(3)]
    assert await sink.send(events) == [DELIVERED] * 3

    assert await sink.send(events) == [DELIVERED] * 3
    assert await sink.send(events[1:2]) == [DELIVERED]

    assert openmeter.stats() == {"events": 3, "duplicates": 4, "calls": 3}


async def test_a_server_error_is_an_uncertain_retry_then_recovers(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)
    events = [meter_event("led_1"), meter_event("led_2")]
    openmeter.fail_next(1, 500)

    failed = await sink.send(events)

    assert kinds(failed) == [RETRY, RETRY]
    assert all(outcome.uncertain for outcome in failed)
    assert "HTTP 500" in failed[0].reason
    assert openmeter.events() == []
    assert await sink.send(events) == [DELIVERED] * 2
    assert [event["id"] for event in openmeter.events()] == ["led_1", "led_2"]


async def test_a_rate_limit_is_a_certain_retry_with_the_servers_delay(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)
    openmeter.fail_next(1, 429, retry_after="7")

    [outcome] = await sink.send([meter_event("led_1")])

    assert (outcome.kind, outcome.uncertain, outcome.retry_after) == (RETRY, False, 7.0)
    assert openmeter.events() == []


@pytest.mark.parametrize("token", ["om_wrong_secret", "om_" + "long" * 100, None])
async def test_bad_credentials_are_rejected_without_leaking_the_token(openmeter, make_sink, token):
    sink = make_sink(openmeter.base_url, token=token)

    outcomes = await sink.send([meter_event("led_1"), meter_event("led_2")])

    assert kinds(outcomes) == [REJECTED, REJECTED]
    assert "HTTP 401" in outcomes[0].reason
    if token is not None:
        assert "invalid bearer token" in outcomes[0].reason  # the server quoted the token...
        assert all(token[:12] not in outcome.reason for outcome in outcomes)  # ...the sink masked it, even cut short
        assert len(outcomes[0].reason) <= 300
    assert openmeter.stats()["events"] == 0


async def test_one_refused_event_does_not_dead_letter_the_good_ones(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)
    openmeter.reject("led_bad")
    events = [meter_event("led_1"), meter_event("led_bad"), meter_event("led_3")]

    outcomes = await sink.send(events)

    assert kinds(outcomes) == [OutcomeKind.DELIVERED, REJECTED, OutcomeKind.DELIVERED]
    assert "HTTP 400" in outcomes[1].reason and "led_bad is refused" in outcomes[1].reason
    assert [event["id"] for event in openmeter.events()] == ["led_1", "led_3"]
    assert [(call["ids"], call["status"]) for call in openmeter.calls()] == [
        (["led_1", "led_bad", "led_3"], 400), (["led_1"], 204), (["led_bad"], 400), (["led_3"], 204),
    ]


async def test_splitting_stops_at_the_first_retry(openmeter, make_sink):
    """A refused batch, then the server fails while the events go one by one: the rest wait, unsent."""
    sink = make_sink(openmeter.base_url)
    openmeter.reject("led_bad")
    openmeter.fail_next(1, 503, after=2, retry_after="3")  # lets the batch and led_1 through
    events = [meter_event("led_1"), meter_event("led_bad"), meter_event("led_3"), meter_event("led_4")]

    outcomes = await sink.send(events)

    assert kinds(outcomes) == [OutcomeKind.DELIVERED, RETRY, RETRY, RETRY]
    assert [(outcome.uncertain, outcome.retry_after) for outcome in outcomes[1:]] == [
        (True, 3.0), (False, 3.0), (False, 3.0),
    ]
    assert "not sent" in outcomes[2].reason
    assert len(openmeter.calls()) == 3


async def test_an_event_that_must_never_be_billed_is_rejected_without_a_call(openmeter, make_sink):
    sink = make_sink(openmeter.base_url)

    outcomes = await sink.send([meter_event("led_1"), meter_event("led_zero", value_ucr=0), meter_event("led_3")])

    assert kinds(outcomes) == [OutcomeKind.DELIVERED, REJECTED, OutcomeKind.DELIVERED]
    assert "not sent" in outcomes[1].reason
    assert [call["ids"] for call in openmeter.calls()] == [["led_1", "led_3"]]


async def test_a_server_that_is_down_is_a_certain_retry(make_sink):
    sink = make_sink(f"http://127.0.0.1:{free_port()}")  # nothing listens there

    outcomes = await sink.send([meter_event("led_1"), meter_event("led_2")])

    assert kinds(outcomes) == [RETRY, RETRY]
    assert not any(outcome.uncertain for outcome in outcomes)
    assert "unreachable" in outcomes[0].reason


async def test_an_answer_lost_to_the_timeout_is_an_uncertain_retry(openmeter, make_sink):
    sink = make_sink(openmeter.base_url, timeout=0.3)
    openmeter.delay(1.0)  # records the event, then answers too late

    [outcome] = await sink.send([meter_event("led_1")])

    assert (outcome.kind, outcome.uncertain) == (RETRY, True)
    assert "ReadTimeout" in outcome.reason
    assert [event["id"] for event in openmeter.events()] == ["led_1"]  # why it is uncertain
    assert await sink.send([meter_event("led_1")]) == [DELIVERED]
    assert openmeter.stats()["duplicates"] == 1


async def test_a_borrowed_client_is_used_and_left_open(openmeter):
    async with httpx.AsyncClient() as client:
        sink = OpenMeterSink(openmeter.base_url + "/", TOKEN, client=client)
        assert await sink.send([meter_event("led_1")]) == [DELIVERED]
        await sink.aclose()
        assert not client.is_closed


# ------------------------------------------------------------------ the fake refuses what OpenMeter would


def valid_event(**changes) -> dict:
    event = cloud_event(meter_event("led_1"), "meterline", "meterline.credits")
    return {**event, **changes}


@pytest.mark.parametrize(
    ("event", "detail"),
    [
        (valid_event(specversion="0.3"), "specversion"),
        ({key: value for key, value in valid_event().items() if key != "source"}, "source is required"),
        (valid_event(subject=""), "subject is required"),
        (valid_event(time="yesterday"), "not RFC 3339"),
        (valid_event(time="2025-13-01T00:00:00Z"), "not RFC 3339"),
        (valid_event(data={"credits_ucr": 1500000}), "string of digits"),
        (valid_event(data={"credits_ucr": "1.5"}), "string of digits"),
        (valid_event(data={"credits_ucr": "-1"}), "string of digits"),
        (valid_event(data=None), "string of digits"),
    ],
)
def test_the_fake_refuses_a_whole_batch_for_one_bad_event(openmeter, event, detail):
    batch = [valid_event(id="led_ok"), event]
    response = httpx.post(
        f"{openmeter.base_url}/api/v1/events", content=json.dumps(batch),
        headers={"Content-Type": BATCH_TYPE, "Authorization": f"Bearer {TOKEN}"}, timeout=5,
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]
    assert openmeter.events() == []


def test_the_fake_wants_a_cloudevents_content_type(openmeter):
    response = httpx.post(f"{openmeter.base_url}/api/v1/events", json=valid_event(),
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert response.status_code == 415
    assert openmeter.events() == []


def test_relay_cli_delivers_to_openmeter_through_the_configured_sink(tmp_path, monkeypatch, capsys):
    """METERLINE_SINK=openmeter wires this sink into `meterline relay`; the ledger reaches OpenMeter once."""
    from datetime import UTC, datetime

    from plugin import runtime
    from plugin.cli import main
    from plugin.ledger import store
    from plugin.ledger.store import make_engine
    from plugin.rules.records import BillingRecord, LedgerRow

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    store.add_customer(engine, "om-acme", "pro")  # no Stripe id needed: OpenMeter's subject is our customer id
    store.write_records(engine, [
        BillingRecord(LedgerRow(id=f"mtr_om_{n}", customer_id="om-acme", model="m", credits_ucr=1000 + n,
                                created_at=datetime.now(UTC)))
        for n in range(150)
    ])
    with run_openmeter(token="om_cli") as server:
        for name, value in {"METERLINE_DATABASE_URL": url, "METERLINE_CONFIG": str(tmp_path / "none.yaml"),
                            "METERLINE_SINK": "openmeter", "METERLINE_OPENMETER_URL": server.base_url,
                            "METERLINE_OPENMETER_TOKEN": "om_cli"}.items():
            monkeypatch.setenv(name, value)
        runtime.reset_for_tests()
        try:
            assert main(["relay", "--once"]) == 0
            assert main(["relay", "--once"]) == 0  # nothing left: no resend
        finally:
            runtime.reset_for_tests()
        received = {event["id"]: event for event in server.events()}
        assert len(server.calls()) == 2  # 150 events in batches of 100
    out = capsys.readouterr().out
    assert "150 claimed: 150 delivered" in out and "0 claimed" in out
    assert set(received) == {f"mtr_om_{n}" for n in range(150)}
    assert received["mtr_om_7"]["subject"] == "om-acme" and received["mtr_om_7"]["data"] == {"credits_ucr": "1007"}
    engine.dispose()

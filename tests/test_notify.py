"""Notices: encoding as plain values, then delivery to a real SMTP server and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx
import pytest

from plugin.notify import (
    Notice,
    Notifier,
    NotifyError,
    SmtpConfig,
    email_message,
    post_webhook,
    send_email,
    shown_url,
    webhook_payload,
)
from tests.support.processes import free_port
from tests.support.smtp import receiving_mail
from tests.support.webhook import receiving_webhooks

PASSWORD = "s3cret-smtp-pass"
TOKEN = "xoxb-s3cret-token"
AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def soft_limit(customer_id: str | None = "cus_1") -> Notice:
    return Notice(
        kind="soft_limit",
        subject="cus_1 used 80% of its credits",
        text="Used 80.00 of 100.00 credits.\nThe period ends on 2025-03-31.",
        customer_id=customer_id,
        fields={"threshold": "0.8", "used": "80.00", "period_end": "2025-03-31"},
    )


# --------------------------------------------------------------------------- pure


def test_a_notice_keeps_its_own_copy_of_the_fields() -> None:
    facts = {"threshold": "0.8"}
    notice = Notice("soft_limit", "subject", "text", fields=facts)
    facts["threshold"] = "0.9"
    assert notice.fields == {"threshold": "0.8"}
    with pytest.raises(TypeError):
        notice.fields["threshold"] = "0.9"  # type: ignore[index]


@pytest.mark.parametrize("changes", [
    {"subject": "two\nlines"},
    {"subject": "carriage\rreturn"},
    {"kind": "soft\nlimit"},
    {"customer_id": "cus_1\r\nBcc: everyone@example.com"},
    {"subject": "  "},
    {"kind": ""},
])
def test_a_notice_refuses_what_would_break_a_mail_header(changes: dict[str, str]) -> None:
    values = {"kind": "soft_limit", "subject": "subject", "text": "text", "customer_id": "cus_1"} | changes
    with pytest.raises(ValueError):
        Notice(**values)


def test_the_smtp_password_stays_out_of_repr() -> None:
    config = SmtpConfig("mail.example.com", username="billing", password=PASSWORD)
    assert PASSWORD not in repr(config)
    assert PASSWORD not in repr(Notifier(smtp=config))


def test_a_username_without_a_password_is_refused() -> None:
    with pytest.raises(ValueError, match="without a password"):
        SmtpConfig("mail.example.com", username="billing")


def test_the_email_carries_the_notice_and_meterline_headers() -> None:
    message = email_message("billing@meter.example", ["a@example.com", "b@example.com"], soft_limit(), now=AT)
    assert message["Subject"] == "cus_1 used 80% of its credits"
    assert message["From"] == "billing@meter.example"
    assert message["To"] == "a@example.com, b@example.com"
    assert message["Date"] == "Tue, 04 Mar 2025 05:06:07 +0000"
    assert message["Message-ID"].endswith("@meter.example>")
    assert message["X-Meterline-Kind"] == "soft_limit"
    assert message["X-Meterline-Customer"] == "cus_1"
    assert message.get_content() == "Used 80.00 of 100.00 credits.\nThe period ends on 2025-03-31.\n"


def test_an_email_without_a_customer_has_no_customer_header() -> None:
    message = email_message("billing@meter.example", ["a@example.com"], soft_limit(customer_id=None), now=AT)
    assert "X-Meterline-Customer" not in message


@pytest.mark.parametrize("recipients", [[], [""], ["a@example.com\r\nBcc: b@example.com"]])
def test_recipients_no_server_should_see_are_refused(recipients: list[str]) -> None:
    with pytest.raises(ValueError):
        email_message("billing@meter.example", recipients, soft_limit(), now=AT)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T0/B0/" + TOKEN, "https://hooks.slack.com/…"),
    (f"http://127.0.0.1:8080/hook?token={TOKEN}", "http://127.0.0.1:8080/…"),
    (f"https://user:{TOKEN}@chat.example.com/", "https://chat.example.com"),
    ("https://chat.example.com", "https://chat.example.com"),
    ("not a url", "[URL without a host]"),
])
def test_a_shown_url_holds_no_secret(url: str, shown: str) -> None:
    assert shown_url(url) == shown
    assert TOKEN not in shown_url(url)


# --------------------------------------------------------------------------- email over real SMTP


def test_an_email_is_received_exactly_once_with_subject_body_recipients_and_headers() -> None:
    recipients = ["ops@example.com", "finance@example.com"]
    with receiving_mail() as mailbox:
        config = SmtpConfig(mailbox.host, mailbox.port, sender="billing@meter.example", timeout=2)
        send_email(config, recipients, soft_limit())
        [message] = mailbox.wait_for(1)
        [delivery] = mailbox.deliveries  # send_email returns after the server accepted: nothing else is coming
    assert delivery.mail_from == "billing@meter.example"
    assert delivery.rcpt_tos == recipients
    assert message["Subject"] == "cus_1 used 80% of its credits"
    assert message["To"] == "ops@example.com, finance@example.com"
    assert message["X-Meterline-Kind"] == "soft_limit"
    assert message["X-Meterline-Customer"] == "cus_1"
    assert message["Message-ID"]
    assert message.get_content() == "Used 80.00 of 100.00 credits.\nThe period ends on 2025-03-31.\n"


def test_an_email_logs_in_when_a_username_is_set() -> None:
    with receiving_mail(credentials={"billing": PASSWORD}) as mailbox:
        config = SmtpConfig(mailbox.host, mailbox.port, username="billing", password=PASSWORD, timeout=2)
        send_email(config, ["ops@example.com"], soft_limit())
        mailbox.wait_for(1)
    assert mailbox.logins == ["billing"]


def test_a_refused_login_is_a_notify_error_without_the_password() -> None:
    with receiving_mail(credentials={"billing": "the-right-one"}) as mailbox:
        config = SmtpConfig(mailbox.host, mailbox.port, username="billing", password=PASSWORD, timeout=2)
        with pytest.raises(NotifyError) as caught:
            send_email(config, ["ops@example.com"], soft_limit())
        assert mailbox.messages == []
    assert str(caught.value) == (
        f"email to 1 recipient(s) via 127.0.0.1:{mailbox.port} failed: SMTPAuthenticationError (535)"
    )
    assert PASSWORD not in str(caught.value)


def test_an_unreachable_smtp_server_is_a_notify_error_without_the_password() -> None:
    port = free_port()  # nothing listens there
    config = SmtpConfig("127.0.0.1", port, username="billing", password=PASSWORD, timeout=2)
    with pytest.raises(NotifyError) as caught:
        send_email(config, ["ops@example.com", "finance@example.com"], soft_limit())
    assert str(caught.value) == f"email to 2 recipient(s) via 127.0.0.1:{port} failed: ConnectionRefusedError"
    assert PASSWORD not in str(caught.value)


def test_starttls_refused_by_the_server_sends_nothing_in_clear() -> None:
    with receiving_mail() as mailbox:
        config = SmtpConfig(mailbox.host, mailbox.port, starttls=True, timeout=2)
        with pytest.raises(NotifyError, match="SMTPNotSupportedError"):
            send_email(config, ["ops@example.com"], soft_limit())
        assert mailbox.messages == []


# --------------------------------------------------------------------------- webhook over real HTTP


def test_a_webhook_receives_the_slack_compatible_body_word_for_word() -> None:
    with receiving_webhooks() as hooks:
        post_webhook(hooks.url + "/hook?channel=billing", soft_limit(), timeout=2)
        [body] = hooks.wait_for(1)
    assert body == {
        "text": "cus_1 used 80% of its credits\nUsed 80.00 of 100.00 credits.\nThe period ends on 2025-03-31.",
        "meterline": {
            "kind": "soft_limit",
            "customer_id": "cus_1",
            "subject": "cus_1 used 80% of its credits",
            "text": "Used 80.00 of 100.00 credits.\nThe period ends on 2025-03-31.",
            "fields": {"threshold": "0.8", "used": "80.00", "period_end": "2025-03-31"},
        },
    }
    assert body == webhook_payload(soft_limit())
    [call] = hooks.calls
    assert call.path == "/hook?channel=billing"
    assert call.headers["content-type"].startswith("application/json")


def test_a_webhook_answering_500_is_a_notify_error_naming_the_status() -> None:
    with receiving_webhooks(status=500) as hooks:
        with pytest.raises(NotifyError) as caught:
            post_webhook(hooks.url + "/hook", soft_limit(), timeout=2)
        hooks.wait_for(1)
    assert str(caught.value) == f"webhook {hooks.url}/… answered HTTP 500 Internal Server Error"


def test_a_token_in_the_webhook_url_never_reaches_the_error() -> None:
    with receiving_webhooks(status=403) as hooks:
        with pytest.raises(NotifyError) as caught:
            post_webhook(f"{hooks.url}/services/{TOKEN}?token={TOKEN}", soft_limit(), timeout=2)
        [call] = hooks.calls
    assert call.path == f"/services/{TOKEN}?token={TOKEN}"  # the token did reach the server
    assert "403" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_an_unreachable_webhook_is_a_notify_error_without_the_token() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook?token={TOKEN}"
    with pytest.raises(NotifyError, match="ConnectError") as caught:
        post_webhook(url, soft_limit(), timeout=2)
    assert TOKEN not in str(caught.value)


def test_a_borrowed_client_is_used_and_left_open() -> None:
    with receiving_webhooks() as hooks, httpx.Client() as client:
        post_webhook(hooks.url, soft_limit(), client=client, timeout=2)
        post_webhook(hooks.url, soft_limit(), client=client, timeout=2)
        assert len(hooks.wait_for(2)) == 2
        assert not client.is_closed


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "/relative/hook", f"https://[bad/{TOKEN}"])
def test_a_webhook_url_that_is_not_http_is_a_notify_error(url: str) -> None:
    with pytest.raises(NotifyError) as caught:
        post_webhook(url, soft_limit(), timeout=2)
    assert TOKEN not in str(caught.value)


# --------------------------------------------------------------------------- fan-out


def test_a_failing_email_does_not_stop_the_webhook_and_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    notifier = Notifier(smtp=SmtpConfig("127.0.0.1", port, username="billing", password=PASSWORD, timeout=2))
    with receiving_webhooks() as hooks, caplog.at_level(logging.WARNING, logger="meterline.notify"):
        failures = notifier.deliver(soft_limit(), emails=["ops@example.com"], webhooks=[f"{hooks.url}/hook?t={TOKEN}"])
        [body] = hooks.wait_for(1)
    assert body["meterline"]["kind"] == "soft_limit"
    assert failures == [f"email to 1 recipient(s) via 127.0.0.1:{port} failed: ConnectionRefusedError"]
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert failures[0] in caplog.text
    assert PASSWORD not in caplog.text and TOKEN not in caplog.text


def test_a_failing_webhook_does_not_stop_the_email_or_the_other_webhook() -> None:
    with receiving_mail() as mailbox, receiving_webhooks(status=502) as broken, receiving_webhooks() as working:
        notifier = Notifier(smtp=SmtpConfig(mailbox.host, mailbox.port, timeout=2))
        failures = notifier.deliver(
            soft_limit(), emails=["ops@example.com", "finance@example.com"], webhooks=[broken.url, working.url],
        )
        [message] = mailbox.wait_for(1)
        working.wait_for(1)
    assert message["To"] == "ops@example.com, finance@example.com"
    assert failures == [f"webhook {broken.url} answered HTTP 502 Bad Gateway"]


def test_every_channel_delivered_means_no_failures() -> None:
    with receiving_mail() as mailbox, receiving_webhooks() as hooks:
        notifier = Notifier(smtp=SmtpConfig(mailbox.host, mailbox.port, timeout=2))
        assert notifier.deliver(soft_limit(), emails=["ops@example.com"], webhooks=[hooks.url]) == []
        assert len(mailbox.wait_for(1)) == 1 and len(hooks.wait_for(1)) == 1


def test_emails_without_an_smtp_server_are_reported_not_dropped() -> None:
    assert Notifier().deliver(soft_limit(), emails=["ops@example.com"]) == [
        "email to 1 recipient(s) not sent: no SMTP server configured"
    ]


def test_nothing_to_deliver_to_is_not_a_failure() -> None:
    assert Notifier().deliver(soft_limit()) == []

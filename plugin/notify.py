"""How meterline tells people things: email over SMTP and a Slack-compatible webhook.

A `Notice` says what happened once; each channel only encodes and sends it. Every failure of a
channel is a `NotifyError` with one human line that never holds a password or a token: these
lines go to logs and alert tables. `Notifier` fans a notice out to every channel and reports the
ones that failed instead of raising, so a broken mail server never breaks billing.

Plain Python on purpose (no litellm): the CLI, the relay and the API all send notices.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from types import MappingProxyType
from typing import Any

import httpx

from plugin.sinks.base import one_line

log = logging.getLogger("meterline.notify")

LINE_BREAKS = ("\r", "\n")


class NotifyError(Exception):
    """One-line, human message; never contains passwords or tokens."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Notice:
    """One thing to tell people, whatever the channel.

    `subject`, `kind` and `customer_id` become mail headers, so line breaks are refused here, where
    the mistake is made, rather than at send time where it would only be a failed delivery.
    """

    kind: str
    """What happened, for machines: "soft_limit", "circuit_open"..."""
    subject: str
    """One line: the email Subject and the first line of the webhook text."""
    text: str
    """The body, plain text."""
    customer_id: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    """Extra facts (threshold, used, period_end...): sent as-is to webhooks for machines to read."""

    def __post_init__(self) -> None:
        if not self.kind or not self.subject.strip():
            raise ValueError("a notice needs a kind and a subject")
        for name in ("kind", "subject", "customer_id"):
            value = getattr(self, name)
            if value is not None and any(brk in value for brk in LINE_BREAKS):
                raise ValueError(f"notice {name} must be one line, got {value!r}")
        # A read-only copy: the notice is frozen, its facts must not change under the caller either.
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


@dataclass(frozen=True)
class SmtpConfig:
    """Where mail goes. The password is kept out of `repr` so a logged config cannot leak it."""

    host: str
    port: int = 25
    sender: str = "meterline@localhost"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False
    """Upgrade with STARTTLS (certificate verified) and fail rather than send in clear if refused."""
    timeout: float = 10.0
    """Seconds per socket operation, not for the whole exchange."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("SMTP host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"SMTP port must be 1-65535, got {self.port}")
        if self.timeout <= 0:
            raise ValueError("SMTP timeout must be positive")
        if self.username is not None and self.password is None:
            raise ValueError("SMTP username given without a password")


# --------------------------------------------------------------------------- pure: encoding


def email_message(sender: str, recipients: Sequence[str], notice: Notice, *, now: datetime) -> EmailMessage:
    """The mail for `notice`: one message to every recipient. The body is `notice.text` alone:
    the caller writes the facts into it for people; `fields` are for machines (webhooks).

    Raises ValueError for recipients no mail server should see (none, or with line breaks).
    """
    if not recipients:
        raise ValueError("no recipients")
    if any(not address.strip() or any(brk in address for brk in LINE_BREAKS) for address in recipients):
        raise ValueError("a recipient address is empty or has a line break")
    message = EmailMessage()
    message["Subject"] = notice.subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(now)
    # The sender's domain, not make_msgid's default: that one asks DNS for this host's name.
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "meterline")
    message["X-Meterline-Kind"] = notice.kind
    if notice.customer_id:
        message["X-Meterline-Customer"] = notice.customer_id
    message.set_content(notice.text)
    return message


def webhook_payload(notice: Notice) -> dict[str, Any]:
    """Slack reads `text`; Slack-compatible receivers (Mattermost, Rocket.Chat...) ignore the rest,
    while our own receivers read `meterline` without parsing the text back."""
    return {
        "text": f"{notice.subject}\n{notice.text}",
        "meterline": {
            "kind": notice.kind,
            "customer_id": notice.customer_id,
            "subject": notice.subject,
            "text": notice.text,
            "fields": dict(notice.fields),
        },
    }


def shown_url(url: str) -> str:
    """`url` safe to log: scheme, host and port only. Userinfo and query may hold tokens, and Slack,
    Discord and Teams put the secret in the path itself, so the path is cut to `/…` too."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "[unparsable URL]"
    if not parsed.host:
        return "[URL without a host]"
    port = f":{parsed.port}" if parsed.port is not None else ""
    rest = "/…" if parsed.path not in ("", "/") or parsed.query else ""
    return f"{parsed.scheme}://{parsed.host}{port}{rest}"


def failure_name(error: BaseException) -> str:
    """The error's class, with the SMTP reply code when the server gave one. Never `str(error)`:
    a server's reply may quote what it was sent."""
    code = getattr(error, "smtp_code", None)
    return f"{type(error).__name__} ({code})" if isinstance(code, int) else type(error).__name__


# --------------------------------------------------------------------------- I/O


def send_email(config: SmtpConfig, recipients: Sequence[str], notice: Notice) -> None:
    """Send `notice` as one message to every recipient; NotifyError on any failure."""
    failed = f"email to {len(recipients)} recipient(s) via {config.host}:{config.port} failed"
    try:
        message = email_message(config.sender, recipients, notice, now=datetime.now(UTC))
    except ValueError as error:
        raise NotifyError(one_line(f"{failed}: {error}")) from error
    try:
        with smtplib.SMTP(config.host, config.port, timeout=config.timeout) as smtp:
            if config.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.username is not None and config.password is not None:
                smtp.login(config.username, config.password)
            smtp.send_message(message, from_addr=config.sender, to_addrs=list(recipients))
    # smtplib's errors are OSErrors; ValueError covers a password or address that is not ASCII.
    except (OSError, ValueError) as error:
        raise NotifyError(one_line(f"{failed}: {failure_name(error)}")) from error


def post_webhook(url: str, notice: Notice, *, timeout: float = 5.0, client: httpx.Client | None = None) -> None:
    """POST `notice` as Slack-compatible JSON; NotifyError on anything but a 2xx.

    Redirects are not followed (a webhook that moved is a misconfiguration to see). `client` is
    borrowed, not closed.
    """
    shown = shown_url(url)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise NotifyError(f"webhook {shown} failed: {type(error).__name__}") from error
    if target.scheme not in ("http", "https") or not target.host:
        raise NotifyError(f"webhook {shown} is not an http(s) URL")
    body = json.dumps(webhook_payload(notice), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    try:
        if client is None:
            response = httpx.post(target, content=body, headers=headers, timeout=timeout)
        else:
            response = client.post(target, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        raise NotifyError(f"webhook {shown} failed: {type(error).__name__}") from error
    if not response.is_success:
        # No body in the message: a receiver may echo the URL, token included.
        raise NotifyError(one_line(f"webhook {shown} answered HTTP {response.status_code} {response.reason_phrase}"))


@dataclass
class Notifier:
    """Fans one notice out to every configured channel; returns which channels failed, never raises."""

    smtp: SmtpConfig | None = None
    webhook_timeout: float = 5.0

    def deliver(self, notice: Notice, *, emails: Sequence[str] = (), webhooks: Sequence[str] = ()) -> list[str]:
        """Try every channel, each independently of the others; one line per failure, [] when all went.

        Emails given with no SMTP configured count as a failure: silently dropping them would hide
        that nobody was told.
        """
        failures: list[str] = []
        if emails:
            if self.smtp is None:
                failures.append(f"email to {len(emails)} recipient(s) not sent: no SMTP server configured")
            else:
                failures.extend(self._attempt(send_email, self.smtp, emails, notice))
        if webhooks:
            with httpx.Client() as client:
                for url in webhooks:
                    failures.extend(
                        self._attempt(post_webhook, url, notice, timeout=self.webhook_timeout, client=client)
                    )
        for failure in failures:
            log.warning("%s notice not delivered: %s", notice.kind, failure)
        return failures

    @staticmethod
    def _attempt(send: Callable[..., None], *args: Any, **kwargs: Any) -> list[str]:
        """Run one channel; its failure message in a list, or an empty list."""
        try:
            send(*args, **kwargs)
        except NotifyError as error:
            return [str(error)]
        return []

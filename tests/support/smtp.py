"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd in its own thread), collecting what it receives.

    with receiving_mail() as mailbox:
        send_email(SmtpConfig(mailbox.host, mailbox.port), ["a@example.com"], notice)
        [message] = mailbox.wait_for(1)

Give `credentials` to offer AUTH (PLAIN/LOGIN, without TLS since this is loopback only); `logins` records
who authenticated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support.processes import free_port


@dataclass(frozen=True)
class Delivery:
    """One accepted mail: the SMTP envelope (who the server was told) and the parsed message."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class Mailbox:
    host: str
    port: int
    deliveries: list[Delivery] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    """Usernames that authenticated successfully, in order."""
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._arrived:
            return [delivery.message for delivery in self.deliveries]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[EmailMessage]:
        """The messages once at least `count` arrived; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.deliveries) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.deliveries)} of {count} message(s) after {timeout} s")
                self._arrived.wait(remaining)
            return [delivery.message for delivery in self.deliveries]

    # aiosmtpd calls these from its own thread, with its own names.

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # Line ends as a mail client shows them: SMTP carries CRLF, tests compare with "\n".
        message = message_from_bytes(envelope.content.replace(b"\r\n", b"\n"), policy=policy.default)
        delivery = Delivery(envelope.mail_from, list(envelope.rcpt_tos), message)
        with self._arrived:
            self.deliveries.append(delivery)
            self._arrived.notify_all()
        return "250 Message accepted for delivery"


@contextmanager
def receiving_mail(credentials: Mapping[str, str] | None = None) -> Iterator[Mailbox]:
    """An SMTP server on 127.0.0.1 and a free port until the block ends; `credentials` maps username -> password."""
    mailbox = Mailbox(host="127.0.0.1", port=free_port())
    options: dict[str, Any] = {}
    if credentials is not None:
        expected = dict(credentials)

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
            if not isinstance(auth_data, LoginPassword):
                return AuthResult(success=False, handled=False)
            username, password = auth_data.login.decode(), auth_data.password.decode()
            if expected.get(username) != password:
                return AuthResult(success=False, handled=False)
            with mailbox._arrived:
                mailbox.logins.append(username)
            return AuthResult(success=True)

        options = {"authenticator": authenticate, "auth_require_tls": False}
    controller = Controller(mailbox, hostname=mailbox.host, port=mailbox.port, ready_timeout=5.0, **options)
    controller.start()
    try:
        yield mailbox
    finally:
        controller.stop()

"""A real Postfix as smtpgate's client in proxy mode (issue 8, finding 15).

Debian's Postfix runs as a private instance (the ``postfix`` fixture,
tests/private_postfix.py: its own main.cf/master.cf, queue and data directories, loopback
only) whose relayhost is smtpgate in proxy mode; smtpgate relays to an aiosmtpd upstream that refuses
``bounce-me@``. Only ``bounce-me`` bounces; ``ok7`` is delivered once. Before per-recipient
proxying, both bounced and ``ok7`` was never delivered.
"""

from __future__ import annotations

import email
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from ..private_postfix import StartPostfix
from ..support import free_port, wait_for

MSG = (b"From: sender@client.test\r\nTo: bounce-me@example.net, ok7@example.net\r\n"
       b"Subject: through postfix\r\nMessage-Id: <pf1@client.test>\r\n\r\nhello\r\n")

class Upstream:
    """Refuses bounce-me@, records every message."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("bounce-me@"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued"






@pytest.fixture
def refusing_upstream() -> Iterator[tuple[Upstream, int]]:
    handler = Upstream()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="upstream.test",
                     decode_data=False)
    ctl.start()
    yield handler, port
    ctl.stop()


def test_postfix_client_only_refused_recipient_bounces(run_app, refusing_upstream,  # type: ignore[no-untyped-def]
                                                       postfix: StartPostfix) -> None:
    handler, up_port = refusing_upstream
    app = run_app({"relay": {"url": f"smtp://127.0.0.1:{up_port}", "timeout": 10},
                   "delivery": {"mode": "proxy"}})
    pf = postfix(relay_port=app.port, myhostname="client.test", mydomain="client.test",
                 myorigin="client.test", smtp_tls_security_level="none",
                 delay_warning_time="0")
    with smtplib.SMTP("127.0.0.1", pf.smtp_port, timeout=30) as s:
        refused = s.sendmail("sender@client.test",
                             ["bounce-me@example.net", "ok7@example.net"], MSG)
    assert refused == {}  # Postfix queued both; smtpgate sees them as Postfix relays

    def bounce_arrived() -> bool:
        return any(m[0] in ("", "<>") for m in handler.messages)

    assert wait_for(bounce_arrived, timeout=90), pf.log()
    pf.wait_log("removed", timeout=30)
    maillog = pf.log()

    delivered = [m for m in handler.messages if m[0] == "sender@client.test"]
    assert [m[1] for m in delivered] == [["ok7@example.net"]], handler.messages
    assert delivered[0][2].endswith(MSG.split(b"\r\n\r\n", 1)[1])

    bounces = [m for m in handler.messages if m[0] in ("", "<>")]
    assert len(bounces) == 1 and bounces[0][1] == ["sender@client.test"]
    report = email.message_from_bytes(bounces[0][2])
    status = next(p for p in report.walk()
                  if p.get_content_type() == "message/delivery-status").as_string()
    assert "Final-Recipient: rfc822; bounce-me@example.net" in status
    assert "ok7@example.net" not in status
    assert "Status: 5.1.1" in status

    bounced = [line for line in maillog.splitlines() if "status=bounced" in line]
    sent = [line for line in maillog.splitlines()
            if "status=sent" in line and "to=<ok7@example.net>" in line]
    assert len(bounced) == 1 and "to=<bounce-me@example.net>" in bounced[0], maillog
    assert len(sent) == 1, maillog


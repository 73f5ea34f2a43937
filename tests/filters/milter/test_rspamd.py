"""rspamd's proxy worker in milter mode through the milter client: GTUBE refused with
rspamd's reply, a clean message delivered with the headers rspamd asks for."""

from __future__ import annotations

import smtplib

import pytest

from ...support import Capture
from .daemons import rspamd_milter

CLEAN = (b"From: ann@client.test\r\nTo: bob@example.com\r\nSubject: clean\r\n"
         b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <r1@client.test>\r\n\r\n"
         b"Nothing to see here.\r\n")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def send(app, msg: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=60) as c:
        return c.sendmail("ann@client.test", ["bob@example.com"], msg)


def test_rspamd_milter_proxy(run_app, capture: Capture) -> None:
    with rspamd_milter() as d:
        app = run_app({"plugin": [{"use": "milter", "socket": d.socket, "name": "rspamd"}]},
                      deliver=capture)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            send(app, CLEAN.replace(b"Nothing to see here.", GTUBE))
        assert send(app, CLEAN) == {}
    assert exc.value.smtp_code == 554, d.log()
    assert exc.value.smtp_error.startswith(b"5.7.1 "), exc.value.smtp_error
    delivered = Capture.strip_received(capture.messages[0][1])
    assert b"X-Spamd-Result: default: False" in delivered, delivered
    assert b"X-Rspamd-Queue-Id: " in delivered

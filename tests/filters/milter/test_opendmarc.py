"""OpenDMARC (Debian ``opendmarc``) through the milter client: it reads the
Authentication-Results smtpgate's earlier milter (OpenDKIM) added, adds its own DMARC
result, and refuses a message whose From field holds two addresses (RejectMultiValueFrom).
Both daemons run without DNS (their own network namespace)."""

from __future__ import annotations

import smtplib

import pytest

from ...support import Capture
from .daemons import make_key, opendkim, opendmarc

MSG = (b"From: Ann <ann@example.com>\r\n"
       b"To: bob@example.org\r\n"
       b"Subject: dmarc\r\n"
       b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n"
       b"Message-ID: <d1@example.com>\r\n"
       b"\r\n"
       b"Hello.\r\n")


def send(app, msg: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=60) as c:
        return c.sendmail("ann@example.com", ["bob@example.org"], msg)


def test_opendmarc_after_opendkim(run_app, capture: Capture) -> None:
    key = make_key()
    with opendkim(key, mode="s") as dk, opendmarc() as dm:
        app = run_app({"plugin": [
            {"use": "milter", "socket": dk.socket, "name": "opendkim"},
            {"use": "milter", "socket": dm.socket, "name": "opendmarc"},
        ]}, deliver=capture)
        assert send(app, MSG) == {}
        with pytest.raises(smtplib.SMTPDataError) as exc:
            send(app, MSG.replace(b"From: Ann <ann@example.com>",
                                  b"From: ann@example.com, eve@example.net"))
    delivered = Capture.strip_received(capture.messages[0][1])
    # opendmarc inserts its result first, above opendkim's signature
    first, second = delivered.split(b"\r\n")[:2]
    assert first == (b"Authentication-Results: mx.test; dmarc=none (p=none dis=none) "
                     b"header.from=example.com"), dm.log()
    assert second.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), dk.log()
    assert exc.value.smtp_code == 550, dm.log()
    assert len(capture.messages) == 1

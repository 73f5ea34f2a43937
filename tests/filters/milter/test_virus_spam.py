"""clamav-milter (with the test's own clamd signatures) and spamass-milter (with the
test's spamd) through the milter client: EICAR and GTUBE refused, clean mail delivered
with the headers they add."""

from __future__ import annotations

import smtplib

import pytest

from tests.scanners.clamd_fixture import EICAR, ClamdProcess, clamd_server  # noqa: F401
from tests.scanners.spamd_fixture import spamd_instance, spamd_server_fixture  # noqa: F401

from ...support import Capture
from .daemons import clamav_milter, spamass_milter

CLEAN = (b"From: ann@client.test\r\nTo: bob@example.com\r\nSubject: clean\r\n"
         b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\nMessage-ID: <c1@client.test>\r\n\r\n"
         b"Nothing to see here.\r\n")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def virus_message() -> bytes:
    return (b"From: ann@client.test\r\nTo: bob@example.com\r\nSubject: virus\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + EICAR + b"\r\n")


def send(app, msg: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=60) as c:
        return c.sendmail("ann@client.test", ["bob@example.com"], msg)


def test_clamav_milter_rejects_eicar(run_app, capture: Capture,
                                     clamd_server: ClamdProcess) -> None:  # noqa: F811
    with clamav_milter(clamd_server.socket_path) as d:
        app = run_app({"plugin": [{"use": "milter", "socket": d.socket, "name": "clamav"}]},
                      deliver=capture)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            send(app, virus_message())
        assert send(app, CLEAN) == {}
    assert exc.value.smtp_code == 550, d.log()
    assert exc.value.smtp_error.startswith(b"5.7.1 Virus found: Smtpgate.Test.EICAR")
    assert len(capture.messages) == 1
    delivered = Capture.strip_received(capture.messages[0][1])
    assert b"X-Virus-Scanned: clamav-milter " in delivered
    assert b"X-Virus-Status: Clean" in delivered


def test_spamass_milter_rejects_gtube(run_app, capture: Capture,
                                      spamd_server: str) -> None:
    inst = spamd_instance(spamd_server)
    with spamass_milter(inst.socket_path) as d:
        app = run_app({"plugin": [{"use": "milter", "socket": d.socket, "name": "spamass"}]},
                      deliver=capture)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            send(app, CLEAN.replace(b"Nothing to see here.", GTUBE))
        assert send(app, CLEAN) == {}
    assert exc.value.smtp_code == 550, d.log()
    assert exc.value.smtp_error.startswith(b"5.7.1 Blocked by SpamAssassin")
    delivered = Capture.strip_received(capture.messages[0][1])
    assert b"X-Spam-Checker-Version: SpamAssassin" in delivered
    assert b"X-Spam-Status: No" in delivered

"""OpenDKIM (Debian ``opendkim``) through the milter client: it signs mail from an
internal host (the delivered message verifies with dkimpy against the test's key) and
verifies signed mail from outside (its Authentication-Results reaches the message)."""

from __future__ import annotations

import smtplib

import dkim
import pytest

from ...support import Capture
from .daemons import DkimKey, make_key, opendkim

MSG = (b"From: Ann <ann@example.com>\r\n"
       b"To: bob@example.org\r\n"
       b"Subject: signed by opendkim\r\n"
       b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n"
       b"Message-ID: <m1@example.com>\r\n"
       b"X-Folded: one\r\n\ttwo\r\n"
       b"\r\n"
       b"Hello,\r\nthis body is signed.\r\n")


@pytest.fixture(scope="module")
def key() -> DkimKey:
    return make_key()


def send(app, msg: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        c.sendmail("ann@example.com", ["bob@example.org"], msg)


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
def test_opendkim_signs(run_app, capture: Capture, key: DkimKey, canon: str) -> None:
    with opendkim(key, mode="s", canonicalization=canon) as d:
        app = run_app({"plugin": [{"use": "milter", "socket": d.socket, "name": "opendkim"}]},
                      deliver=capture)
        send(app, MSG)
    message = capture.messages[0][1]
    body = Capture.strip_received(message)
    assert body.startswith(b"DKIM-Signature: ")
    assert f"c={canon};".encode() in body.replace(b"\r\n\t", b" ")
    assert dkim.verify(message, dnsfunc=key.dnsfunc), d.log()
    # the signature covers the body: a changed body no longer verifies
    assert not dkim.verify(message.replace(b"is signed", b"is forged"), dnsfunc=key.dnsfunc)


def test_opendkim_verifies(run_app, capture: Capture, key: DkimKey) -> None:
    signed = dkim.sign(MSG, key.selector.encode(), key.domain.encode(), key.private_pem,
                       include_headers=[b"From", b"To", b"Subject", b"Date"]) + MSG
    # 127.0.0.1 is not internal here: opendkim verifies instead of signing
    with opendkim(key, mode="sv", internal="192.0.2.1") as d:
        app = run_app({"plugin": [{"use": "milter", "socket": d.socket, "name": "opendkim"}]},
                      deliver=capture)
        send(app, signed)
        send(app, signed.replace(b"this body is signed", b"this body was changed"))
    good = Capture.strip_received(capture.messages[0][1])
    bad = Capture.strip_received(capture.messages[1][1])
    assert good.startswith(b"Authentication-Results: mx.test;"), d.log()
    assert b"dkim=pass" in good.split(b"DKIM-Signature")[0]
    assert b"dkim=fail" in bad.split(b"DKIM-Signature")[0]

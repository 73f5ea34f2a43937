"""End-to-end sessions over loopback with real clients (smtplib, aiosmtplib, raw sockets)."""

from __future__ import annotations

import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import Capture

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello\r\n.dotline\r\n"


def test_smtplib_roundtrip_callable(run_app, capture: Capture) -> None:
    app = run_app(deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("client.test")
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8")
        assert s.has_extn("enhancedstatuscodes")
        assert int(s.esmtp_features["size"]) == 10485760
        refused = s.sendmail("a@example.org", ["b@example.com", "c@example.com"], MSG)
        assert refused == {}
    assert len(capture.messages) == 1
    env, message = capture.messages[0]
    assert env.mail_from == "a@example.org"
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert Capture.strip_received(message) == MSG
    received = message[: len(message) - len(MSG)]
    assert b"from client.test (unknown [127.0.0.1])" in received
    assert b"by mx.test (smtpgate) with ESMTP" in received
    assert received.count(b"Received:") == 1


def test_default_maildir_store(run_app, tmp_path: Path) -> None:
    app = run_app()
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        code, text = s.ehlo()
        s.sendmail("a@example.org", ["someone@example.com"], MSG)
    files = list((tmp_path / "mail" / "new").iterdir())
    assert len(files) == 1
    assert Capture.strip_received(files[0].read_bytes()) == MSG
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []


async def test_aiosmtplib_client(run_app, capture: Capture) -> None:
    app = run_app(deliver=capture)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False)
    await client.connect()
    errors, response = await client.sendmail("x@example.org", ["y@example.com"], MSG)
    assert errors == {}
    assert response.startswith("2.0.0")
    await client.quit()
    assert Capture.strip_received(capture.messages[0][1]) == MSG


def test_pipelined_batch_replies_in_order(run_app, raw, capture: Capture) -> None:
    app = run_app(deliver=capture)
    c = raw(app.port)
    assert c.greeting.startswith(b"220 mx.test")
    c.cmd("EHLO c.test")
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<bad>\r\n"
        b"RCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    assert c.read_reply() == b"250 2.1.0 Sender OK"
    assert c.read_reply() == b"250 2.1.5 Recipient OK"
    assert c.read_reply().startswith(b"501 5.1.3")
    assert c.read_reply() == b"250 2.1.5 Recipient OK"
    assert c.read_reply().startswith(b"354 ")
    c.send(b"Subject: x\r\n\r\n..x\r\n.\r\nQUIT\r\n")
    assert c.read_reply().startswith(b"250 2.0.0")
    assert c.read_reply() == b"221 2.0.0 Bye"
    env, message = capture.messages[0]
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert Capture.strip_received(message) == b"Subject: x\r\n\r\n.x\r\n"


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"FOO", b"500 5.5.1"),
        (b"MAIL FROM:<a@b.c>", b"503 5.5.1"),
        (b"RCPT TO:<a@b.c>", b"503 5.5.1"),
        (b"DATA", b"503 5.5.1"),
        (b"VRFY root", b"252 2.5.0"),
        (b"NOOP", b"250 2.0.0"),
        (b"HELP", b"214"),
        (b"EXPN list", b"502 5.5.1"),
        (b"HELO", b"501 5.5.4"),
        (b"MAIL\x00 FROM:<a@b.c>", b"500 5.5.2"),
        ("MAIL FRÖM:<a@b.c>".encode(), b"50"),
        (b"STARTTLS", b"502 5.5.1"),
        (b"AUTH PLAIN", b"502 5.5.1"),
    ],
)
def test_single_command_replies(run_app, raw, line: bytes, expected: bytes) -> None:
    app = run_app()
    c = raw(app.port)
    assert c.cmd(line).startswith(expected)
    assert c.cmd("QUIT") == b"221 2.0.0 Bye"


def test_size_declared_and_actual(run_app, raw, capture: Capture) -> None:
    app = run_app({"server": {"max_message_size": 1000}}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=1001").startswith(b"552 5.3.4")
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=999") == b"250 2.1.0 Sender OK"
    c.cmd("RCPT TO:<b@example.com>")
    assert c.cmd("DATA").startswith(b"354")
    c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100 + b".\r\n")
    assert c.read_reply().startswith(b"552 5.3.4")
    assert capture.messages == []
    # the session goes on
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")


def test_too_many_recipients(run_app, raw) -> None:
    app = run_app({"server": {"max_recipients": 2}}, deliver=lambda e, m: None)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<b1@example.com>").startswith(b"250")
    assert c.cmd("RCPT TO:<b2@example.com>").startswith(b"250")
    assert c.cmd("RCPT TO:<b3@example.com>").startswith(b"452 4.5.3")


def test_too_many_errors_closes(run_app, raw) -> None:
    app = run_app({"server": {"max_errors": 3}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    assert c.cmd("RCPT TO:<a@b.c>").startswith(b"503")
    assert c.cmd("RCPT TO:<a@b.c>").startswith(b"503")
    assert c.cmd("RCPT TO:<a@b.c>").startswith(b"503")
    assert c.read_reply().startswith(b"421 4.7.0")
    assert c.closed_by_peer()


def test_unknown_commands_limit(run_app, raw) -> None:
    app = run_app({"server": {"max_unknown_commands": 2, "max_errors": 100}})
    c = raw(app.port)
    assert c.cmd("XYZZY").startswith(b"500 5.5.1")
    assert c.cmd("XYZZY").startswith(b"500 5.5.1")
    assert c.cmd("XYZZY").startswith(b"500 5.5.1")
    assert c.read_reply().startswith(b"421")
    assert c.closed_by_peer()


def test_smuggling_one_message(run_app, raw, capture: Capture) -> None:
    app = run_app(deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<b@example.com>")
    c.cmd("DATA")
    c.send(
        b"Subject: s\r\n\r\nbody\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.com>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\n"
    )
    assert c.read_reply().startswith(b"550 5.6.11")
    assert c.cmd("QUIT").startswith(b"221")
    assert capture.messages == []


def test_ipv6_listener(run_app, raw, capture: Capture) -> None:
    import socket

    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    app = run_app({"server": {"listen": ["127.0.0.1:0", "[::1]:0"]}}, deliver=capture)
    ports = {h: p for h, p in app.addresses}
    assert set(ports) == {"127.0.0.1", "::1"}
    with smtplib.SMTP("::1", ports["::1"]) as s:
        s.sendmail("a@example.org", ["b@example.com"], MSG)
    assert b"[IPv6:::1]" in capture.messages[0][1].split(b"\r\n\r\n")[0]

"""Relaying to real upstreams (aiosmtpd capture, Postfix smtp-sink), connection limits,
timeouts and graceful shutdown."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.support import Capture

MSG = b"From: a@example.org\r\nSubject: relay\r\n\r\nline\r\n.leading dot\r\n"


class UpstreamHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, list[str]]] = []
        self.reject_rcpt: set[str] = set()
        self.data_reply: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject_rcpt:
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.content, envelope.mail_options)
        )
        return "250 2.0.0 Queued upstream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream() -> Iterator[tuple[UpstreamHandler, int]]:
    handler = UpstreamHandler()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="upstream.test",
                     data_size_limit=50_000_000, enable_SMTPUTF8=True, decode_data=False)
    ctl.start()
    yield handler, port
    ctl.stop()


def relay_cfg(port: int) -> dict:
    return {"relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 5},
            "delivery": {"mode": "proxy"}}


def test_relay_to_upstream_byte_exact(run_app, upstream) -> None:
    handler, port = upstream
    app = run_app(relay_cfg(port))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("c.test")
        s.mail("a@example.org", ["BODY=8BITMIME"])
        s.rcpt("b@example.com")
        code, text = s.data(MSG)
    assert code == 250
    assert b"Queued upstream" in text
    mail_from, rcpts, content, options = handler.messages[0]
    assert (mail_from, rcpts) == ("a@example.org", ["b@example.com"])
    assert "BODY=8BITMIME" in options
    assert Capture.strip_received(content) == MSG


def test_upstream_refuses_one_recipient_only_that_one_refused(run_app, upstream) -> None:
    """Proxy mode forwards each RCPT (issue 8 finding 15): the upstream's refusal is the
    client's reply to that RCPT; the message goes to the accepted recipient."""
    handler, port = upstream
    handler.reject_rcpt.add("nobody@example.com")
    app = run_app(relay_cfg(port))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt("b@example.com")[0] == 250
        code, text = s.rcpt("nobody@example.com")
        assert (code, text) == (550, b"5.1.1 No such mailbox")
        code, text = s.data(MSG)
    assert code == 250
    assert [m[1] for m in handler.messages] == [["b@example.com"]]


def test_upstream_data_5xx_and_4xx_passed_back(run_app, upstream) -> None:
    handler, port = upstream
    app = run_app(relay_cfg(port))
    for reply, code, enhanced in (
        ("554 5.7.1 Spam rejected upstream", 554, b"5.7.1"),
        ("451 4.3.0 Upstream busy", 451, b"4.3.0"),
    ):
        handler.data_reply = reply
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.ehlo()
            s.mail("a@example.org")
            s.rcpt("b@example.com")
            got_code, text = s.data(MSG)
        assert got_code == code
        assert text.startswith(enhanced)
    assert handler.messages == []


def test_upstream_down_is_4xx(run_app, raw, tmp_path: Path) -> None:
    app = run_app(relay_cfg(free_port()))
    c = raw(app.port)
    c.cmd("EHLO c.test")
    reply = c.cmd("MAIL FROM:<a@example.org>")  # proxy mode: the upstream is tried at MAIL
    assert reply.startswith(b"451 4.4.1 Connection to 127.0.0.1:"), reply
    assert reply.endswith(b"failed: connection refused"), reply
    # nothing stored as sent: no Maildir fallback
    assert not (tmp_path / "mail" / "new").exists() or not list((tmp_path / "mail" / "new").iterdir())


def test_plain_relay_url_credentials_never_in_replies(run_app, raw, caplog) -> None:
    app = run_app({"relay": {"url": f"plain://user:TopSecret%21@127.0.0.1:{free_port()}",
                             "timeout": 2}, "delivery": {"mode": "proxy"}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    reply = c.cmd("MAIL FROM:<a@example.org>")  # proxy mode: the upstream is tried at MAIL
    assert reply.startswith(b"451")
    assert b"TopSecret" not in reply
    assert "TopSecret" not in caplog.text


@pytest.mark.skipif(not Path("/usr/sbin/smtp-sink").exists(), reason="postfix smtp-sink missing")
def test_relay_to_postfix_smtp_sink(run_app, tmp_path: Path) -> None:
    port = free_port()
    import tempfile

    # smtp-sink writes as user nobody, who cannot enter pytest's 0700 tmp_path.
    dump = Path(tempfile.mkdtemp(prefix="smtpgate-sink-", dir="/tmp"))
    dump.chmod(0o777)
    proc = subprocess.Popen(
        ["/usr/sbin/smtp-sink", "-u", "nobody", "-d", f"{dump}/%M.", f"127.0.0.1:{port}", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        app = run_app(relay_cfg(port))
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.ehlo()
            refused = s.sendmail("a@example.org", ["b@example.com"], MSG)
        assert refused == {}
        files = list(dump.iterdir())
        assert len(files) == 1
        assert b"Subject: relay" in files[0].read_bytes()
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


def test_connection_limit_per_ip(run_app, raw) -> None:
    # limit_exceptions = []: 127.0.0.1 (a local network) is otherwise exempt
    app = run_app({"server": {"max_connections_per_ip": 2, "limit_exceptions": []}})
    a = raw(app.port)
    b = raw(app.port)
    assert a.greeting.startswith(b"220") and b.greeting.startswith(b"220")
    c = raw(app.port)
    assert c.greeting.startswith(b"421 4.7.0")
    assert c.closed_by_peer()
    a.cmd("QUIT")
    time.sleep(0.2)
    d = raw(app.port)
    assert d.greeting.startswith(b"220")


def test_total_connection_limit(run_app, raw) -> None:
    app = run_app({"server": {"max_connections": 1}})
    a = raw(app.port)
    assert a.greeting.startswith(b"220")
    b = raw(app.port)
    assert b.greeting.startswith(b"421 4.7.0")


def test_command_timeout(run_app, raw) -> None:
    app = run_app({"server": {"command_timeout": 0.3}})
    c = raw(app.port)
    t0 = time.monotonic()
    assert c.read_reply() == b"421 4.4.2 Timeout exceeded, closing connection"
    assert 0.2 < time.monotonic() - t0 < 3
    assert c.closed_by_peer()


def test_data_timeout(run_app, raw, capture) -> None:
    app = run_app({"server": {"command_timeout": 5, "data_timeout": 0.3}}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<b@example.com>")
    c.cmd("DATA")
    c.send(b"Subject: partial\r\n\r\nhalf a message")
    assert c.read_reply().startswith(b"421 4.4.2")
    assert capture.messages == []


def test_client_vanishes_mid_data(run_app, raw, capture) -> None:
    app = run_app(deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<b@example.com>")
    c.cmd("DATA")
    c.send(b"Subject: partial\r\n\r\nhalf a message\r\n")
    c.close()
    time.sleep(0.2)
    assert capture.messages == []
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        assert s.noop()[0] == 250


def test_graceful_shutdown_finishes_transaction_in_flight(run_app, raw) -> None:
    delivered: list[bytes] = []

    async def slow_delivery(envelope, message):
        await asyncio.sleep(0.5)
        delivered.append(message)

    app = run_app(deliver=slow_delivery)
    port = app.port
    idle = raw(app.port)
    busy = raw(app.port)
    busy.cmd("EHLO c.test")
    busy.cmd("MAIL FROM:<a@example.org>")
    busy.cmd("RCPT TO:<b@example.com>")
    busy.cmd("DATA")
    busy.send(MSG + b".\r\n")
    time.sleep(0.1)  # the delivery is now in flight
    stopper = threading.Thread(target=app.stop_thread, kwargs={"timeout": 5})
    stopper.start()
    assert busy.read_reply().startswith(b"250")  # finished, not cut off
    assert busy.read_reply().startswith(b"421 4.3.2")
    assert idle.read_reply().startswith(b"421 4.3.2")
    stopper.join(10)
    assert len(delivered) == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_swaks_default_maildir(run_app, tmp_path: Path) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed")
    app = run_app()
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{app.port}", "--to", "someone@example.com",
         "--from", "me@example.org", "--header", "Subject: swaks test"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<-  250 2.0.0 Message stored as" in out.stdout
    files = list((tmp_path / "mail" / "new").iterdir())
    assert len(files) == 1
    assert b"Subject: swaks test" in files[0].read_bytes()

"""Queue mode end to end: retries, per-recipient outcomes, DSN bounces, ETRN, backpressure."""

from __future__ import annotations

import email
import os
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

MSG = b"From: sender@example.org\r\nSubject: queued test\r\nMessage-Id: <q1@example.org>\r\n\r\nbody\r\n"


class Upstream:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reject: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK queued upstream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream(port: int) -> tuple[Controller, Upstream]:
    handler = Upstream()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="upstream.test",
                     decode_data=False, data_size_limit=50_000_000)
    ctl.start()
    return ctl, handler


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def queue_cfg(spool: Path, port: int, **queue: object) -> dict:
    return {
        "relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 3},
        "delivery": {"mode": "queue"},
        "queue": {"path": str(spool), "min_backoff": 0.3, "max_backoff": 1,
                  "scan_interval": 0.05, **queue},
    }


def spool_empty(spool: Path) -> bool:
    return all(not os.listdir(spool / d) for d in ("incoming", "deferred", "messages", "tmp"))


@pytest.fixture
def upstream_port() -> Iterator[int]:
    yield free_port()


def test_upstream_down_then_up(run_app, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    app = run_app(queue_cfg(spool, upstream_port))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo()
        assert s.has_extn("dsn") and s.has_extn("etrn")
        s.mail("sender@example.org")
        s.rcpt("rcpt@example.com")
        code, text = s.data(MSG)
    assert code == 250 and text.startswith(b"2.0.0 Queued as ")
    qid = text.split()[-1].decode()
    assert (spool / "messages" / qid).exists()
    assert wait_for(lambda: (spool / "deferred" / f"{qid}.json").exists())
    ctl, handler = start_upstream(upstream_port)
    try:
        assert wait_for(lambda: len(handler.messages) == 1)
        mail_from, rcpts, content = handler.messages[0]
        assert (mail_from, rcpts) == ("sender@example.org", ["rcpt@example.com"])
        assert content.endswith(MSG) and content.startswith(b"Received: from ")
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()


def test_one_recipient_5xx_gets_dsn(run_app, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    ctl, handler = start_upstream(upstream_port)
    handler.reject.add("bad@example.com")
    try:
        app = run_app(queue_cfg(spool, upstream_port))
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.ehlo()
            s.mail("sender@example.org", ["RET=HDRS", "ENVID=env42"])
            s.rcpt("good@example.com")
            s.rcpt("bad@example.com", ["NOTIFY=FAILURE", "ORCPT=rfc822;bad@example.com"])
            code, _ = s.data(MSG)
        assert code == 250
        assert wait_for(lambda: len(handler.messages) == 2)
        delivered = [m for m in handler.messages if m[0] == "sender@example.org"]
        bounces = [m for m in handler.messages if m[0] in ("", "<>")]
        assert len(delivered) == 1 and delivered[0][1] == ["good@example.com"]
        assert len(bounces) == 1 and bounces[0][1] == ["sender@example.org"]
        dsn = email.message_from_bytes(bounces[0][2])
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        parts = list(dsn.walk())
        status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
        text = status.as_string()
        assert "Final-Recipient: rfc822; bad@example.com" in text or \
               "Final-Recipient: rfc822;bad@example.com" in text
        assert "Status: 5.1.1" in text and "Action: failed" in text
        assert "Original-Envelope-Id: env42" in text
        headers = next(p for p in parts if p.get_content_type() == "text/rfc822-headers")
        payload = headers.get_payload(decode=True) or b""
        assert isinstance(headers, Message) and b"Subject: queued test" in payload
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()


def test_null_sender_never_bounced(run_app, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    ctl, handler = start_upstream(upstream_port)
    handler.reject.add("bad@example.com")
    try:
        app = run_app(queue_cfg(spool, upstream_port))
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.ehlo()
            s.mail("<>")
            s.rcpt("bad@example.com")
            assert s.data(MSG)[0] == 250
        assert wait_for(lambda: spool_empty(spool))
        time.sleep(0.3)
        assert handler.messages == []
    finally:
        ctl.stop()


def test_etrn_flushes_deferred_mail(run_app, raw, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    app = run_app(queue_cfg(spool, upstream_port, min_backoff=3600, max_backoff=3600))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.sendmail("sender@example.org", ["x@example.com"], MSG)
    assert wait_for(lambda: len(os.listdir(spool / "deferred")) == 1)
    ctl, handler = start_upstream(upstream_port)
    try:
        c = raw(app.port)
        c.cmd("EHLO c.test")
        assert c.cmd("ETRN example.com") == b"250 2.0.0 Queuing for node example.com started"
        assert wait_for(lambda: len(handler.messages) == 1)
        assert c.cmd("ETRN bad..node").startswith(b"501")
    finally:
        ctl.stop()


def test_etrn_refused_from_other_networks(run_app, raw, tmp_path: Path) -> None:
    cfg = queue_cfg(tmp_path / "spool", free_port(), etrn_networks=["10.0.0.0/8"])
    app = run_app(cfg)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    assert c.cmd("ETRN example.com").startswith(b"459 4.7.1")


def test_recovery_after_restart(run_app, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    app = run_app(queue_cfg(spool, upstream_port, min_backoff=3600, max_backoff=3600))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        for i in range(3):
            s.sendmail("sender@example.org", [f"r{i}@example.com"], MSG)
    app.stop_thread(timeout=2)
    (spool / "tmp" / "LEFTOVER.msg").write_bytes(b"half")
    ctl, handler = start_upstream(upstream_port)
    try:
        run_app(queue_cfg(spool, upstream_port, min_backoff=3600, max_backoff=3600))
        # deferred for an hour: nothing due until flushed by the CLI
        subprocess.run([os.sys.executable, "-m", "smtpgate", "queue", "flush", "--spool",
                        str(spool)], check=True, capture_output=True, timeout=60)
        assert wait_for(lambda: len(handler.messages) == 3)
        assert sorted(m[1][0] for m in handler.messages) == [
            "r0@example.com", "r1@example.com", "r2@example.com"]
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()


def test_disk_full_backpressure_on_tmpfs(run_app, raw, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        app = run_app(queue_cfg(spool, free_port(), min_free_space=2 * 1024 * 1024))
        c = raw(app.port)
        c.cmd("EHLO c.test")
        assert c.cmd("MAIL FROM:<a@example.org>") == b"452 4.3.1 Insufficient system storage"
        app.stop_thread(timeout=2)
        # No floor: the file system itself fills up; the message is refused, never acked.
        app2 = run_app(queue_cfg(spool, free_port(), min_free_space=0))
        c2 = raw(app2.port)
        c2.cmd("EHLO c.test")
        assert c2.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        c2.cmd("RCPT TO:<b@example.com>")
        c2.cmd("DATA")
        c2.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500 + b".\r\n")
        reply = c2.read_reply()
        assert reply.startswith((b"452 4.3.1", b"451 4.3.0")), reply
        assert os.listdir(spool / "tmp") == [] and os.listdir(spool / "messages") == []
        app2.stop_thread(timeout=2)
    finally:
        # Lazy: the run_app fixture stops the servers (and their delivery processes,
        # which hold the spool's lock files) only after this test returns.
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_delay_warning_dsn_queued(run_app, tmp_path: Path) -> None:
    from smtpgate.queue.store import QueueStore

    spool = tmp_path / "spool"
    app = run_app(queue_cfg(spool, free_port(), delay_warning=0.2, min_backoff=0.2,
                            max_backoff=0.3))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.sendmail("sender@example.org", ["late@example.com"], MSG)
    store = QueueStore(spool)

    def delay_dsn() -> list[bytes]:
        return [store.read_message(e.id) for e in store.entries() if e.mail_from == ""]

    assert wait_for(lambda: len(delay_dsn()) == 1, timeout=10)
    time.sleep(1.0)
    assert len(delay_dsn()) == 1  # only one delay notice per recipient
    dsn = email.message_from_bytes(delay_dsn()[0])
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Action: delayed" in text and "Will-Retry-Until:" in text
    original = [e for e in store.entries() if e.mail_from == "sender@example.org"]
    assert len(original) == 1 and original[0].recipients[0].state == "pending"


def test_expired_message_bounces(run_app, tmp_path: Path, upstream_port: int) -> None:
    spool = tmp_path / "spool"
    app = run_app(queue_cfg(spool, upstream_port, max_lifetime=0.5, min_backoff=0.2,
                            max_backoff=0.2))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.sendmail("sender@example.org", ["never@example.com"], MSG)
    time.sleep(1.0)
    ctl, handler = start_upstream(upstream_port)
    try:
        assert wait_for(lambda: any(m[0] in ("", "<>") for m in handler.messages), timeout=10)
        bounce = next(m for m in handler.messages if m[0] in ("", "<>"))
        assert b"Status: 4.4.7" in bounce[2]
        assert not any(m[1] == ["never@example.com"] for m in handler.messages)
    finally:
        ctl.stop()


def test_delivery_process_restarts_and_finds_the_spool(run_app, tmp_path: Path,
                                                       upstream_port: int) -> None:
    from smtpgate.queue.runner import RemoteQueue

    spool = tmp_path / "spool"
    ctl, handler = start_upstream(upstream_port)
    try:
        app = run_app(queue_cfg(spool, upstream_port))
        assert isinstance(app.queue, RemoteQueue)
        child = app.queue._process
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.sendmail("sender@example.org", ["one@example.com"], MSG)
        assert wait_for(lambda: len(handler.messages) == 1)
        child.kill()
        child.join(5)
        # Committed while no delivery process runs: the next submit restarts it, and the
        # restarted process (no clean-up: the server may be committing) finds the message.
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.sendmail("sender@example.org", ["two@example.com"], MSG)
        assert wait_for(lambda: len(handler.messages) == 2, timeout=30)
        assert app.queue._process is not None and app.queue._process.pid != child.pid
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()


def test_in_process_delivery_option(run_app, tmp_path: Path, upstream_port: int) -> None:
    from smtpgate.queue.manager import QueueManager

    ctl, handler = start_upstream(upstream_port)
    try:
        app = run_app(queue_cfg(tmp_path / "spool", upstream_port, delivery_process=False))
        assert isinstance(app.queue, QueueManager)
        with smtplib.SMTP("127.0.0.1", app.port) as s:
            s.sendmail("sender@example.org", ["x@example.com"], MSG)
        assert wait_for(lambda: len(handler.messages) == 1)
    finally:
        ctl.stop()

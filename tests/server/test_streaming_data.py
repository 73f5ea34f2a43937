"""Long messages stream to a file as they arrive (DATA and BDAT), in every delivery mode.

A message longer than ``[server] message_buffer_size`` is written to an unnamed temporary
file while it is received (in queue mode in the spool's ``tmp/``); plugins see it through the
same Transaction API (header edits do not load it); it reaches the spool, the Maildir or the
upstream byte for byte. A size limit crossed mid-stream gives ``552 5.3.4`` and leaves
nothing behind; so does a client that vanishes in the middle.
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from smtpgate.envelope import Envelope
from smtpgate.queue.store import QueueStore
from tests.e2e.e2e_support import RawClient, capture_upstream, split_received

MB = 1024 * 1024


def _message(size: int, subject: str = "streamed") -> bytes:
    head = (f"From: a@example.org\r\nTo: b@example.net\r\nSubject: {subject}\r\n"
            "Message-ID: <stream@example.org>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n"
    body = bytearray()
    n = 0
    while len(body) < size:
        # Lines starting with a dot exercise dot-stuffing across piece boundaries.
        body += (b"." if n % 97 == 0 else b"") + line
        n += 1
    return head + bytes(body)


def _spool_files(spool: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(spool / d)) for d in ("tmp", "messages", "incoming", "deferred")
            if (spool / d).is_dir()}


def _queue_cfg(spool: Path, **server: Any) -> dict[str, Any]:
    # The relay is a closed port: messages stay in the spool (deferred) for inspection.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    return {
        "server": {"message_buffer_size": 64 * 1024, **server},
        "relay": {"url": f"smtp://127.0.0.1:{dead}", "timeout": 2},
        "delivery": {"mode": "queue"},
        "queue": {"path": str(spool), "min_backoff": 3600, "delivery_process": False},
    }


def _expect(c: RawClient, *codes: int) -> None:
    for code in codes:
        got = c.reply()
        assert got[0] == code, (code, got)


def _stored(spool: Path, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = os.listdir(spool / "messages")
        if names:  # the message part of its queue file, size and CRC-32 checked
            return QueueStore(spool, create=False).read_message(names[0])
        time.sleep(0.05)
    raise AssertionError("no message in the spool")


def test_50mb_message_streams_into_the_spool_byte_exact(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    app = run_app(_queue_cfg(spool, max_message_size=60 * MB))
    msg = _message(50 * MB)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=60) as c:
        c.ehlo("client.test")
        refused = c.sendmail("a@example.org", ["b@example.net"], msg)
        assert refused == {}
        assert c.noop()[0] == 250
    split_received(_stored(spool), msg)
    assert os.listdir(spool / "tmp") == []  # the receiving file had no name


def test_header_edits_on_a_long_message_reach_the_spool(run_app, tmp_path: Path) -> None:
    """A data hook sees the long message through the usual API; its header edits are
    applied without loading the body, and the body arrives unchanged."""
    spool = tmp_path / "spool"
    seen: dict[str, Any] = {}

    def data_hook(session: Any, tx: Any) -> None:
        seen["size"] = tx.size
        seen["subject"] = tx.get_header("Subject")
        seen["file_backed"] = not isinstance(tx.source(), bytes)
        tx.add_header("X-Checked", "yes")
        tx.remove_header("Message-ID")

    app = run_app(_queue_cfg(spool, max_message_size=20 * MB))
    app.hooks.register("data", data_hook)
    msg = _message(3 * MB, subject="big one")
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.sendmail("a@example.org", ["b@example.net"], msg) == {}
    assert seen == {"size": len(msg), "subject": "big one", "file_backed": True}
    expected = msg.replace(b"Message-ID: <stream@example.org>\r\n\r\n",
                           b"X-Checked: yes\r\n\r\n", 1)
    assert expected != msg
    split_received(_stored(spool), expected)


@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
def test_size_limit_crossed_mid_stream_leaves_nothing(run_app, tmp_path: Path,
                                                      bdat: bool) -> None:
    spool = tmp_path / "spool"
    app = run_app(_queue_cfg(spool, max_message_size=1 * MB))
    msg = _message(3 * MB)
    c = RawClient(app.port)
    try:
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        _expect(c, 250, 250, 250)
        if bdat:
            # 1.5 MB chunks: the first is over the limit by itself (552 5.3.4 at once, the
            # chunk is read and dropped), the LAST one then gets 503 (after a failure).
            half = len(msg) // 2
            c.send(b"BDAT %d\r\n" % half + msg[:half])
            first = c.reply()
            c.send(b"BDAT %d LAST\r\n" % (len(msg) - half) + msg[half:])
            last = c.reply()
            assert (first[0], first[1][:5], last[0]) == (552, "5.3.4", 503), (first, last)
        else:
            c.send(b"DATA\r\n")
            _expect(c, 354)
            c.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            code, text = c.reply()
            assert (code, text[:5]) == (552, "5.3.4"), (code, text)
        c.send(b"RSET\r\nNOOP\r\n")
        _expect(c, 250, 250)
    finally:
        c.close()
    assert _spool_files(spool) == {"tmp": [], "messages": [], "incoming": [], "deferred": []}


def test_bare_lf_after_the_first_pieces_is_refused(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    app = run_app(_queue_cfg(spool, max_message_size=10 * MB))
    msg = _message(2 * MB) + b"bare\nline\r\n" + _message(1 * MB)
    c = RawClient(app.port)
    try:
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
               b"DATA\r\n")
        _expect(c, 250, 250, 250, 354)
        c.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        code, text = c.reply()
        assert (code, text[:6]) == (550, "5.6.11"), (code, text)
    finally:
        c.close()
    assert _spool_files(spool) == {"tmp": [], "messages": [], "incoming": [], "deferred": []}


def test_client_vanishing_mid_message_leaves_nothing(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    app = run_app(_queue_cfg(spool, max_message_size=10 * MB))
    c = RawClient(app.port)
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
           b"DATA\r\n")
    _expect(c, 250, 250, 250, 354)
    c.send(_message(2 * MB))
    c.close()
    time.sleep(0.3)
    # The server is fine and the next client is served.
    with smtplib.SMTP("127.0.0.1", app.port, timeout=10) as s:
        assert s.noop()[0] == 250
    assert _spool_files(spool) == {"tmp": [], "messages": [], "incoming": [], "deferred": []}


def test_bdat_chunks_stream_to_a_maildir(run_app, tmp_path: Path) -> None:
    app = run_app({"server": {"message_buffer_size": 4096}})
    msg = _message(700 * 1024) + b"no final CRLF"
    c = RawClient(app.port)
    try:
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        _expect(c, 250, 250, 250)
        pos = 0
        for size in (1, 5000, 123_457, 300_000):
            c.send(b"BDAT %d\r\n" % size + msg[pos : pos + size])
            _expect(c, 250)
            pos += size
        c.send(b"BDAT %d LAST\r\n" % (len(msg) - pos) + msg[pos:])
        _expect(c, 250)
    finally:
        c.close()
    new = tmp_path / "mail" / "new"
    [name] = os.listdir(new)
    split_received((new / name).read_bytes(), msg)


def test_long_message_to_a_python_callable_and_through_proxy_mode(run_app) -> None:
    got: list[bytes] = []

    def deliver(envelope: Envelope, message: bytes) -> None:
        assert isinstance(message, bytes)
        got.append(message)

    msg = _message(2 * MB)
    app = run_app({"server": {"message_buffer_size": 8192, "max_message_size": 5 * MB}},
                  deliver=deliver)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.sendmail("a@example.org", ["b@example.net"], msg) == {}
    split_received(got[0], msg)

    with capture_upstream() as up:
        proxy = run_app({
            "server": {"message_buffer_size": 8192, "max_message_size": 5 * MB},
            "relay": {"url": up.url, "timeout": 30},
            "delivery": {"mode": "proxy"},
        })
        with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as c:
            assert c.sendmail("a@example.org", ["b@example.net"], msg) == {}
        [cap] = up.handler.take()
        split_received(cap.content, msg)

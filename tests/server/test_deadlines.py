"""Deadlines, not idle timers (issue 8, findings 12 and 13; Postfix
``smtpd_per_request_deadline`` and ``smtpd_min_data_rate``).

* A whole command line must arrive within ``command_timeout``, counted from when the
  server starts waiting for it; bytes of a partial line do not extend it.
* DATA/BDAT: the deadline starts at ``data_timeout`` and each read of N bytes extends it
  by N / ``min_data_rate`` seconds (never past ``data_timeout`` from that read);
  ``min_data_rate = 0`` keeps ``data_timeout`` as an idle timeout.
* Expiry: ``421 4.4.2`` and close, logged.

Before the fix both timeouts restarted on every byte: clients trickling 1 byte/s held
their connections for ever (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import threading
import time

from ..support import Capture

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: deadline\r\n\r\nbody\r\n"
TIMEOUT_421 = b"421 4.4.2 Timeout exceeded, closing connection\r\n"
SLOW = 50  # slow clients per phase
CAP = 12  # bytes a slow client sends at most, one a second: far past the 2 s deadlines


async def _reply(r: asyncio.StreamReader) -> bytes:
    line = await asyncio.wait_for(r.readline(), 15)
    while line[3:4] == b"-":
        line = await asyncio.wait_for(r.readline(), 15)
    return line


async def _slow_client(port: int, in_data: bool) -> tuple[int, bytes, bytes]:
    """Trickle one byte a second into a command line (or into DATA) until the server
    answers; returns (bytes trickled, the reply, what followed it before EOF)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await _reply(r)).startswith(b"220")
        trickle = b"NOOP " + b"x" * CAP
        if in_data:
            for cmd, expect in ((b"EHLO slow.test", b"250 "), (b"MAIL FROM:<a@example.org>",
                                b"250 "), (b"RCPT TO:<b@example.com>", b"250 "),
                                (b"DATA", b"354 ")):
                w.write(cmd + b"\r\n")
                assert (await _reply(r)).startswith(expect)
            trickle = b"Subject: slow\r\n\r\n" + b"x" * CAP
        sent = 0
        for i in range(CAP):
            try:
                w.write(trickle[i : i + 1])
                await w.drain()
            except ConnectionError:
                break
            sent += 1
            try:
                line = await asyncio.wait_for(r.readline(), 1.0)
            except TimeoutError:
                continue
            except ConnectionError:
                return sent, b"<reset>", b""
            try:
                rest = await asyncio.wait_for(r.read(), 15)
            except ConnectionResetError:  # the server closed with our last byte unread
                rest = b""
            return sent, line, rest
        return sent, b"", b""
    finally:
        w.close()


def _send_normal(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("normal.test")
        s.mail("a@example.org")
        s.rcpt("b@example.com")
        return s.data(MSG)


async def test_slow_clients_are_cut_off_by_the_deadlines(
    run_app, capture: Capture, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="smtpgate.session")
    app = run_app({"server": {"command_timeout": 2, "data_timeout": 2, "min_data_rate": 500}},
                  deliver=capture)
    slow = [asyncio.create_task(_slow_client(app.port, in_data=i % 2 == 1))
            for i in range(2 * SLOW)]
    await asyncio.sleep(0.5)  # the slow clients are trickling
    code, text = await asyncio.to_thread(_send_normal, app.port)
    assert (code, text[:5]) == (250, b"2.0.0")
    results = await asyncio.gather(*slow)
    for sent, line, rest in results:
        assert line == TIMEOUT_421, (sent, line)
        assert sent < CAP  # cut off while still trickling
        assert rest == b""  # and the connection closed
    assert len(capture.messages) == 1  # only the normal client's message
    text_log = caplog.text
    assert text_log.count("command deadline exceeded") == SLOW
    assert text_log.count("data deadline exceeded") == SLOW


def test_each_command_has_its_own_deadline(run_app, raw) -> None:
    """The deadline is per command line, not per session: a client that sends each
    command promptly is never cut off, however long the session lasts."""
    app = run_app({"server": {"command_timeout": 1}})
    c = raw(app.port)
    for _ in range(4):  # 1.6 s in all, each command well within 1 s
        time.sleep(0.4)
        assert c.cmd("NOOP").startswith(b"250")
    assert c.cmd("QUIT").startswith(b"221")


def _data_in_pieces(port: int, pieces: list[bytes], pause: float) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    f = sock.makefile("rb")
    try:
        assert f.readline().startswith(b"220")
        sock.sendall(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                     b"DATA\r\n")
        assert [f.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        for piece in pieces:
            time.sleep(pause)
            try:
                sock.sendall(piece)
            except OSError:
                break
        try:
            sock.sendall(b".\r\n")
        except OSError:
            pass
        return f.readline()
    finally:
        f.close()
        sock.close()


def test_min_data_rate_zero_keeps_the_idle_timeout(run_app, capture: Capture) -> None:
    app = run_app({"server": {"data_timeout": 1, "min_data_rate": 0}}, deliver=capture)
    pieces = [b"Subject: idle\r\n", b"\r\n", b"one\r\n", b"two\r\n", b"three\r\n"]
    reply = _data_in_pieces(app.port, pieces, 0.35)  # 1.75 s in all, no pause of 1 s
    assert reply.startswith(b"250 2.0.0"), reply
    assert capture.messages[0][1].endswith(b"one\r\ntwo\r\nthree\r\n")


def test_min_data_rate_cuts_off_a_slow_data_phase(run_app, capture: Capture) -> None:
    """The same pieces at a rate far under min_data_rate: the data deadline passes."""
    app = run_app({"server": {"data_timeout": 1, "min_data_rate": 500}}, deliver=capture)
    pieces = [b"Subject: idle\r\n", b"\r\n", b"one\r\n", b"two\r\n", b"three\r\n"]
    reply = _data_in_pieces(app.port, pieces, 0.4)
    assert reply == TIMEOUT_421
    assert capture.messages == []


def test_fast_data_may_take_longer_than_data_timeout(run_app, capture: Capture) -> None:
    """At more than min_data_rate each read extends the deadline: a transfer longer
    than data_timeout completes."""
    app = run_app({"server": {"data_timeout": 1, "min_data_rate": 1000,
                              "max_message_size": 1_000_000}}, deliver=capture)
    line = b"y" * 78 + b"\r\n"
    pieces = [b"Subject: fast\r\n\r\n"] + [line * 50] * 6  # 4 KB every 0.25 s
    reply = _data_in_pieces(app.port, pieces, 0.25)  # 1.75 s in all
    assert reply.startswith(b"250 2.0.0"), reply
    assert capture.messages[0][1].count(line) == 300


def test_bdat_chunk_is_a_data_request(run_app, capture: Capture) -> None:
    """A BDAT chunk trickled under min_data_rate is cut off like DATA (RFC 3030)."""
    app = run_app({"server": {"data_timeout": 1, "min_data_rate": 500}}, deliver=capture)
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=15)
    f = sock.makefile("rb")
    try:
        assert f.readline().startswith(b"220")
        sock.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                     b"BDAT 100 LAST\r\n")
        assert [f.readline()[:3] for _ in range(2)] == [b"250", b"250"]
        reply = b""
        sock.settimeout(0.5)
        for _ in range(CAP):  # one byte every half second, far under 500 bytes/s
            sock.sendall(b"z")
            try:
                reply = sock.recv(200)
                break
            except TimeoutError:
                continue
        assert reply == TIMEOUT_421, reply
        assert capture.messages == []
    finally:
        f.close()
        sock.close()


def test_overlong_command_line_is_answered_once_then_closed(run_app) -> None:
    """100 MB without CRLF (finding 13): one 500 reply when the line passes its limit,
    then 421 and close once no CRLF came within the bound (64 KiB) past it."""
    app = run_app()
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sent = 0
    stop = threading.Event()

    def flood() -> None:
        nonlocal sent
        chunk = b"NOOP " + b"x" * (1 << 20)
        try:
            while sent < 100 << 20 and not stop.is_set():
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass

    t = threading.Thread(target=flood)
    t.start()
    replies = []
    try:
        while line := f.readline():
            replies.append(line)
    except OSError:
        pass
    stop.set()
    t.join(60)
    f.close()
    sock.close()
    assert len(replies) == 2, replies
    assert replies[0].startswith(b"500 5.5.2"), replies
    assert replies[1].startswith(b"421 4."), replies
    assert sent < 100 << 20  # the server stopped reading long before the end


def test_client_that_reads_no_replies_is_cut_off(run_app, caplog) -> None:
    """Pipelined commands whose replies are never read (a write-side slowloris): once
    the replies fill the buffers, the client has command_timeout to read, then the
    connection is aborted."""
    import select

    caplog.set_level(logging.INFO, logger="smtpgate.session")
    app = run_app({"server": {"command_timeout": 1}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", app.port))
    sock.sendall(b"HELP\r\n" * 50_000)  # ~600 KB in, megabytes of replies out
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    events = []
    for _ in range(100):  # wait up to 10 s for the reset, reading nothing
        events = [ev for _, ev in poller.poll(100) if ev & (select.POLLERR | select.POLLHUP)]
        if events:
            break
    sock.close()
    assert events, "the server still holds the connection"
    assert "read none of our replies for 1s: aborting" in caplog.text

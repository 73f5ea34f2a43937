"""Implicit TLS (RFC 8314) and STARTTLS (RFC 3207) under both event loops (issue 8,
findings 2 and 17).

Finding 2: under uvloop every implicit-TLS handshake timed out whenever the client's
ClientHello was already readable when the connection was accepted (uvloop starts reading
right after ``connection_made``, so the bytes reached the SMTP session instead of the TLS
layer). The tests make that happen every time by keeping the server's loop busy while
the client connects and sends its ClientHello, as on a loaded server.

Finding 17: ``returning true from eof_received() has no effect when using ssl`` was
logged at WARNING for every TLS client that half-closed (e.g. a pipelined QUIT followed
by the client's close, as Postfix's smtp client does).
"""

from __future__ import annotations

import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from smtpgate.app import Smtpgate

from ..support import Capture

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: tls\r\n\r\nbody\r\n"


def _tls_cfg(cert_files: dict[str, str], **listener: Any) -> dict[str, Any]:
    return {
        "tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
        "listener": [{"address": "127.0.0.1:0", "tls": "implicit", **listener}],
    }


@contextmanager
def busy_loop(app: Smtpgate, seconds: float = 0.5) -> Iterator[None]:
    """Keep the server's event loop busy for ``seconds`` while the body runs: the
    client's connection waits in the listen backlog with its first bytes (the
    ClientHello) already sent, so they are readable when the server accepts it."""
    started = threading.Event()

    async def block() -> None:
        started.set()
        time.sleep(seconds)  # blocks the loop thread on purpose

    t = threading.Thread(target=app.run_sync, args=(block(),))
    t.start()
    started.wait(5)
    try:
        yield
    finally:
        t.join()


def _session_ended(caplog: pytest.LogCaptureFixture, count: int) -> bool:
    return sum(1 for r in caplog.records
               if r.name == "smtpgate.session" and r.getMessage().startswith("session id=")
               ) >= count


def _wait_sessions(caplog: pytest.LogCaptureFixture, count: int) -> None:
    for _ in range(500):  # the server thread logs the end of each session
        if _session_ended(caplog, count):
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} sessions ended: {caplog.text}")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING]


def test_implicit_tls_smtplib_when_client_hello_is_waiting(
    run_app, capture: Capture, cert_files, client_tls, caplog
) -> None:
    caplog.set_level(logging.INFO)
    app = run_app(_tls_cfg(cert_files), deliver=capture)
    port = app.addresses[1][1]
    for _ in range(3):
        with busy_loop(app):
            with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=15) as s:
                assert s.ehlo("c.test")[0] == 250
                assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
                s.sendmail("a@example.org", ["b@example.com"], MSG)
    assert len(capture.messages) == 3
    assert all(b"with ESMTPS" in m.split(b"\r\n\r\n")[0] for _, m in capture.messages)
    _wait_sessions(caplog, 3)
    assert "TLS handshake" not in caplog.text
    assert _warnings(caplog) == []


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_implicit_tls_openssl_s_client_when_client_hello_is_waiting(
    run_app, cert_files, caplog
) -> None:
    caplog.set_level(logging.INFO)
    app = run_app(_tls_cfg(cert_files))
    port = app.addresses[1][1]
    with busy_loop(app):
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
             "-CAfile", cert_files["ca"], "-verify_return_error", "-servername", "mx.test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        time.sleep(0.2)  # s_client connects and sends its ClientHello meanwhile
    out, _ = proc.communicate(b"EHLO openssl.test\r\nQUIT\r\n", timeout=30)
    assert b"220 mx.test" in out, out
    assert b"250-mx.test Hello openssl.test" in out
    assert b"221 2.0.0" in out
    _wait_sessions(caplog, 1)
    assert _warnings(caplog) == []


@pytest.mark.parametrize("same_segment", [True, False], ids=["same-segment", "separate"])
def test_implicit_tls_after_proxy_header(
    run_app, capture: Capture, cert_files, client_tls, same_segment: bool
) -> None:
    """PROXY v1 header (HAProxy spec), then TLS from the first byte after it."""
    cfg = _tls_cfg(cert_files, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    app = run_app({**cfg, "relay": {"relay_domains": ["example.com"]}}, deliver=capture)
    port = app.addresses[1][1]
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 465\r\n"
    if same_segment:
        with busy_loop(app):  # header and ClientHello are read together
            sock.sendall(header)
            tls = client_tls.wrap_socket(sock, server_hostname="mx.test")
    else:
        sock.sendall(header)
        time.sleep(0.1)
        tls = client_tls.wrap_socket(sock, server_hostname="mx.test")
    f = tls.makefile("rb")
    assert f.readline().startswith(b"220 mx.test")
    tls.sendall(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    lines = [f.readline() for _ in range(12)]
    assert lines[-2:] == [b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n"], lines
    tls.sendall(b"DATA\r\n")
    assert f.readline().startswith(b"354")
    tls.sendall(MSG + b".\r\nQUIT\r\n")
    assert f.readline().startswith(b"250 2.0.0")
    assert f.readline().startswith(b"221")
    tls.close()
    (env, message), = capture.messages
    assert b"192.0.2.7" in message.split(b"\r\n\r\n")[0]


def _starttls_half_close(port: int, client_tls: ssl.SSLContext) -> bytes:
    """STARTTLS, a message, then a pipelined QUIT and the client's half-close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO c.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    return _tls_dialogue(client_tls.wrap_socket(sock, server_hostname="mx.test"), ehlo=True)


def _tls_dialogue(tls: ssl.SSLSocket, *, ehlo: bool) -> bytes:
    f = tls.makefile("rb")
    if not ehlo:
        assert f.readline().startswith(b"220")
    tls.sendall(b"EHLO c.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    tls.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    tls.sendall(MSG + b".\r\n")
    assert f.readline().startswith(b"250 2.0.0")
    tls.sendall(b"QUIT\r\n")
    # Half-close at the TCP level without waiting for the 221 (like Postfix's smtp
    # client); what still comes (the 221, the close_notify) is read raw until EOF.
    tls.shutdown(socket.SHUT_WR)
    rest = b""
    try:
        while chunk := tls.recv(4096):
            rest += chunk
    except (OSError, ValueError):
        pass
    tls.close()
    return rest


def test_starttls_half_close_logs_no_warning(
    run_app, capture: Capture, cert_files, client_tls, caplog
) -> None:
    caplog.set_level(logging.INFO)
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]}},
                  deliver=capture)
    for _ in range(3):
        _starttls_half_close(app.port, client_tls)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=15) as s:  # and an ordinary client
        s.starttls(context=client_tls)
        s.sendmail("a@example.org", ["b@example.com"], MSG)
    _wait_sessions(caplog, 4)
    assert len(capture.messages) == 4
    assert _warnings(caplog) == []


def test_implicit_tls_half_close_logs_no_warning(
    run_app, capture: Capture, cert_files, client_tls, caplog
) -> None:
    caplog.set_level(logging.INFO)
    app = run_app(_tls_cfg(cert_files), deliver=capture)
    port = app.addresses[1][1]
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        _tls_dialogue(client_tls.wrap_socket(sock, server_hostname="mx.test"), ehlo=False)
    _wait_sessions(caplog, 3)
    assert len(capture.messages) == 3
    assert _warnings(caplog) == []


def test_plain_half_close_still_gets_pipelined_replies(run_app, capture: Capture) -> None:
    """Without TLS the transport stays open after the client's half-close, so the
    replies to a pipelined batch still arrive (eof_received returns True there)."""
    app = run_app(deliver=capture)
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=15)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO c.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    sock.sendall(MSG + b".\r\nQUIT\r\n")
    sock.shutdown(socket.SHUT_WR)
    assert f.readline().startswith(b"250 2.0.0")
    assert f.readline().startswith(b"221 2.0.0")
    assert f.readline() == b""
    sock.close()
    assert len(capture.messages) == 1


async def test_server_in_the_test_loop_implicit_tls_and_starttls(
    request: pytest.FixtureRequest, tmp_path, cert_files, client_tls, caplog
) -> None:
    """The app started inside pytest-asyncio's loop, which is the stdlib loop or uvloop
    (``pytest_asyncio_loop_factories`` in tests/conftest.py): both TLS modes work and
    a client's half-close logs no WARNING."""
    import asyncio

    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    expected = "uvloop" if request.node.name.endswith("[uvloop]") else "asyncio"
    assert type(loop).__module__.split(".")[0] == expected
    captured: list[bytes] = []
    app = Smtpgate({
        "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"]},
        "maildir": {"path": str(tmp_path / "mail")},
        "tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
        "listener": [{"address": "127.0.0.1:0", "tls": "implicit"}],
    }, deliver=lambda envelope, message: captured.append(message))
    await app.start()
    try:
        plain_port, tls_port = app.addresses[0][1], app.addresses[1][1]

        async def dialogue(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"EHLO c.test\r\n")
            while not (await r.readline()).startswith(b"250 "):
                pass
            w.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            assert [(await r.readline())[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            w.write(MSG + b".\r\nQUIT\r\n")
            assert (await r.readline()).startswith(b"250 2.0.0")
            w.close()  # without waiting for the 221

        r, w = await asyncio.open_connection("127.0.0.1", tls_port, ssl=client_tls,
                                             server_hostname="mx.test")
        assert (await r.readline()).startswith(b"220 mx.test")
        await dialogue(r, w)
        r, w = await asyncio.open_connection("127.0.0.1", plain_port)
        assert (await r.readline()).startswith(b"220 mx.test")
        w.write(b"EHLO c.test\r\n")
        while not (await r.readline()).startswith(b"250 "):
            pass
        w.write(b"STARTTLS\r\n")
        assert (await r.readline()).startswith(b"220 2.0.0")
        await w.start_tls(client_tls, server_hostname="mx.test")
        await dialogue(r, w)
        for _ in range(500):
            if _session_ended(caplog, 2):
                break
            await asyncio.sleep(0.01)
    finally:
        await app.stop(1)
    assert len(captured) == 2
    assert _warnings(caplog) == []


class _BioClient:
    """A TLS client over memory BIOs: decides exactly which bytes go in one segment."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="mx.test")
        self.buf = b""

    def handshake_then(self, first: bytes) -> None:
        """Complete the handshake, then send its last flight (the client's Finished in
        TLS 1.3) and ``first`` in a single segment."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.out.pending:
                    self.sock.sendall(self.out.read())
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.inc.write(data)
        self.obj.write(first)
        self.sock.sendall(self.out.read())

    def readline(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                self.buf += self.obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed; buffered={self.buf!r}")
            self.inc.write(data)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"


def test_starttls_first_command_in_the_segment_of_the_client_finished(
    run_app, cert_files, client_tls
) -> None:
    """TLS 1.3: the client's Finished and its EHLO arrive together; the TLS layer hands
    the EHLO over as soon as the handshake completes. It must be answered (it was taken
    for plaintext sent before the handshake and dropped: the client waited for ever)."""
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]}})
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        client_tls.maximum_version = version
        sock = socket.create_connection(("127.0.0.1", app.port), timeout=15)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220")
        sock.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 2.0.0")
        tls = _BioClient(sock, client_tls)
        tls.handshake_then(b"EHLO c.test\r\n")
        assert tls.readline().startswith(b"250-mx.test Hello c.test")
        assert tls.obj.version() == version.name.replace("v1_", "v1.")
        f.close()
        sock.close()

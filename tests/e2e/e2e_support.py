"""Helpers of the real-input end-to-end tests: the corpus, a capture upstream, clients.

Entry points: :data:`CORPUS` / :data:`ROWS` (the message corpus named by ``MAIL_CORPUS``),
:func:`client_wire_message`, :func:`assert_one_received_then`, :class:`CaptureUpstream`
(aiosmtpd), :func:`running_gate` (smtpgate in a thread), :class:`RawClient` (a socket
SMTP client that writes exactly the bytes given). RFC 5321 §4.5.2 (dot-stuffing),
§4.5.3.1.6 (text line length), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from smtpgate.app import Smtpgate
from tests.support import CORPUS  # noqa: E402

MANIFEST = CORPUS / "MANIFEST.tsv"

#: One dict per corpus file (the MANIFEST.tsv columns); empty when the corpus is missing.
ROWS: list[dict[str, str]] = (
    list(csv.DictReader(MANIFEST.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
    if MANIFEST.is_file()
    else []
)
ROW_IDS = [r["file"] for r in ROWS]

requires_corpus = pytest.mark.skipif(not ROWS, reason=f"mail corpus not found at {CORPUS}")

SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"

#: smtplib's ``_fix_eols``: CRLF, bare LF and bare CR all become CRLF.
_EOL = re.compile(rb"\r\n|\n|\r(?!\n)")

#: The RFC 5321 §4.5.3.1.6 text line limit without the CRLF (1000 octets in all).
MAX_TEXT = 998


def read_message(row: dict[str, str]) -> bytes:
    """The raw bytes of one corpus file (read-only; never copied into the repository)."""
    return (CORPUS / row["file"]).read_bytes()


def notes(row: dict[str, str]) -> set[str]:
    """The ``notes`` column of a manifest row as a set of feature names."""
    return {n for n in row["notes"].split(",") if n}


def client_wire_message(raw: bytes) -> bytes:
    """The message as a real client transmits it (before dot-stuffing).

    Every line ending (CRLF, bare LF, bare CR) becomes CRLF, as smtplib's ``_fix_eols``
    does, and a final CRLF is added when missing (smtplib ``data()``; RFC 5321 §4.1.1.4).

    Args:
        raw: the message file's bytes.

    Returns:
        The bytes the server must reconstruct after dot-unstuffing.
    """
    msg = _EOL.sub(b"\r\n", raw)
    if not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    return msg


def header_block(msg: bytes) -> bytes:
    """The header section of a CRLF message (everything before the first empty line)."""
    if msg.startswith(b"\r\n"):
        return b""
    return msg.split(b"\r\n\r\n", 1)[0]


def mail_options_for(msg: bytes) -> list[str]:
    """MAIL FROM parameters a correct client uses: BODY=8BITMIME for 8-bit data
    (RFC 6152), plus SMTPUTF8 when the header section itself is 8-bit (RFC 6531/6532)."""
    opts: list[str] = []
    if not msg.isascii():
        opts.append("BODY=8BITMIME")
        if not header_block(msg).isascii():
            opts.append("SMTPUTF8")
    return opts


def longest_line(msg: bytes) -> int:
    """Octets of the longest line of a CRLF message, CRLF not counted."""
    return max(len(line) for line in msg.split(b"\r\n"))


def split_received(delivered: bytes, expected: bytes) -> bytes:
    """Check ``delivered`` is exactly one prepended ``Received:`` field plus ``expected``.

    Args:
        delivered: the message as it reached the capture.
        expected: the message the client sent (after dot-unstuffing).

    Returns:
        The Received header block (``Received: ...CRLF``, folded lines start with TAB).

    Raises:
        AssertionError: anything else was added, removed or changed.
    """
    assert delivered.endswith(expected), _diff_hint(delivered, expected)
    head = delivered[: len(delivered) - len(expected)]
    assert head.startswith(b"Received: "), head[:200]
    assert head.endswith(b"\r\n"), head[-200:]
    lines = head[:-2].split(b"\r\n")
    assert all(line.startswith(b"\t") for line in lines[1:]), head
    assert b"\n" not in head.replace(b"\r\n", b"") and b"\r" not in head.replace(b"\r\n", b"")
    return head


def assert_one_received_then(delivered: bytes, expected: bytes) -> bytes:
    """:func:`split_received` plus: the header names this server (``by mx.test``)."""
    head = split_received(delivered, expected)
    assert b"by mx.test" in head, head
    return head


def _diff_hint(delivered: bytes, expected: bytes) -> str:
    """A short description of where two messages first differ (for assertion messages)."""
    # Compare from the end, since the delivered copy has a header in front.
    a, b = delivered[::-1], expected[::-1]
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    pos = len(expected) - n
    return (
        f"delivered {len(delivered)} bytes, expected suffix of {len(expected)} bytes; "
        f"first difference (from the end) at expected offset {pos}: "
        f"expected {expected[max(0, pos - 40) : pos + 40]!r} "
        f"got {delivered[max(0, len(delivered) - n - 40) : len(delivered) - n + 40]!r}"
    )


# --------------------------------------------------------------------------- upstream


@dataclass
class Captured:
    """One transaction recorded by the capture upstream."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    content: bytes


@dataclass
class CaptureHandler:
    """aiosmtpd handler that records (mail_from, rcpt_tos, content bytes) of every message."""

    messages: list[Captured] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes | bytearray)
        with self.lock:
            self.messages.append(
                Captured(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    list(envelope.mail_options),
                    bytes(content),
                )
            )
        return "250 2.0.0 Ok: captured"

    def take(self) -> list[Captured]:
        """Return and forget everything captured so far."""
        with self.lock:
            out, self.messages = self.messages, []
        return out


class LongLineSMTP(SMTP):
    """aiosmtpd with its DATA line limit raised.

    Stock aiosmtpd 1.4.6 refuses any DATA line over ``line_length_limit = 1001``
    octets with ``500 Line too long``; a capture for ``max_line_length = 0`` runs
    must take lines of any length.
    """

    line_length_limit = 64 * 1024 * 1024


class CaptureController(Controller):
    """aiosmtpd Controller using :class:`LongLineSMTP` unless ``stock=True``."""

    def __init__(self, handler: CaptureHandler, *, stock: bool = False, **kw: Any) -> None:
        self.stock = stock
        super().__init__(handler, **kw)

    def factory(self) -> SMTP:
        cls = SMTP if self.stock else LongLineSMTP
        return cls(self.handler, **self.SMTP_kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CaptureUpstream:
    """A running capture upstream: ``port`` and ``handler`` (its recorded messages)."""

    controller: CaptureController
    handler: CaptureHandler

    @property
    def port(self) -> int:
        return int(self.controller.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


@contextmanager
def capture_upstream(*, stock: bool = False) -> Iterator[CaptureUpstream]:
    """Run an aiosmtpd capture on 127.0.0.1: 8-bit clean, SMTPUTF8, 64 MiB SIZE."""
    handler = CaptureHandler()
    controller = CaptureController(
        handler,
        stock=stock,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="capture.test",
        data_size_limit=64 * 1024 * 1024,
        decode_data=False,
        enable_SMTPUTF8=True,
    )
    controller.start()
    try:
        yield CaptureUpstream(controller, handler)
    finally:
        controller.stop(no_assert=True)


# --------------------------------------------------------------------------- smtpgate


#: The event loop :func:`running_gate` runs smtpgate in (``server.use_uvloop``); the
#: autouse ``_gate_loop`` fixture of ``tests/e2e/conftest.py`` sets it per test.
LOOP_KIND = "uvloop"


@contextmanager
def running_gate(
    *,
    relay_url: str | None = None,
    maildir: Path | None = None,
    deliver: Any = None,
    **server: Any,
) -> Iterator[Smtpgate]:
    """Run smtpgate in a background thread on a free loopback port.

    Args:
        relay_url: ``relay.url`` (e.g. the capture's ``smtp://127.0.0.1:PORT``).
        maildir: ``maildir.path`` when delivering locally.
        deliver: a callable delivery (``(envelope, message) -> None``).
        server: extra ``[server]`` keys (``max_line_length=0`` ...); the event loop is
            :data:`LOOP_KIND` unless ``use_uvloop`` is given.
    """
    cfg: dict[str, Any] = {
        "server": {
            "hostname": "mx.test",
            "listen": ["127.0.0.1:0"],
            "max_message_size": 20_000_000,
            "shutdown_timeout": 2,
            "use_uvloop": LOOP_KIND == "uvloop",
            **server,
        },
    }
    if relay_url is not None:
        cfg["relay"] = {"url": relay_url, "timeout": 30}
        cfg["delivery"] = {"mode": "proxy"}  # synchronous: the reply is the upstream's
    if maildir is not None:
        cfg["maildir"] = {"path": str(maildir)}
    app = Smtpgate(cfg, deliver=deliver) if deliver is not None else Smtpgate(cfg)
    app.start_thread()
    try:
        yield app
    finally:
        app.stop_thread()


def smtplib_send(port: int, msg: bytes, opts: list[str]) -> tuple[int, bytes]:
    """Send ``msg`` (already CRLF) with ``smtplib.sendmail``; return the final reply.

    smtplib dot-stuffs, adds the final CRLF if missing and (server offers SIZE) adds
    ``SIZE=``. Refusals at MAIL or DATA come back as ``(code, text)`` too.
    """
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        try:
            refused = smtp.sendmail(SENDER, [RECIPIENT], msg, mail_options=opts)
        except smtplib.SMTPSenderRefused as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPDataError as exc:
            err = exc.smtp_error
            return exc.smtp_code, err if isinstance(err, bytes) else err.encode()
        assert refused == {}
        return 250, b""


# --------------------------------------------------------------------------- raw client


class RawClient:
    """A minimal SMTP client over a socket that writes exactly the bytes it is given.

    Args:
        port: smtpgate's port on 127.0.0.1.
        timeout: socket timeout, seconds.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        code, text = self.reply()
        assert code == 220, (code, text)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed; pending {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: ``(code, text)`` with lines joined by LF."""
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> tuple[int, str]:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def send_chunked(self, data: bytes, sizes: list[int], pause: float = 0.0) -> None:
        """Write ``data`` in pieces of the given sizes (cycled), pausing between writes."""
        pos, i = 0, 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            self.sock.sendall(data[pos : pos + n])
            pos += n
            i += 1
            if pause:
                time.sleep(pause)

    def envelope(self, mail_from: str = SENDER, rcpt: str = RECIPIENT, opts: str = "") -> None:
        """EHLO, MAIL, RCPT, DATA; asserts 250/250/250/354."""
        code, text = self.cmd("EHLO client.test")
        assert code == 250, (code, text)
        code, text = self.cmd(f"MAIL FROM:<{mail_from}>{opts}")
        assert code == 250, (code, text)
        code, text = self.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, (code, text)
        code, text = self.cmd("DATA")
        assert code == 354, (code, text)


def which(name: str, *extra: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (smtp-sink lives there)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", *extra):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None

"""Helpers for the queue crash-safety tests (tests/queue/test_crash.py).

Entry points: :class:`GateProcess` (smtpgate ``serve`` as a killable subprocess),
:class:`CaptureUpstream` (an aiosmtpd relay recording every accepted message, with
slow/refusing modes), :func:`make_message` / :func:`dot_stuff` (RFC 5321 §4.5.2),
:func:`snapshot_spool` (the committed state of a spool after a crash, docs/queue.md),
:func:`strip_received`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

SENDER = "sender@client.test"
_SERIAL_RE = re.compile(rb"\r\nX-Serial: (\d+)\r\n")
_QUEUED_RE = re.compile(rb"^250 2\.0\.0 Queued as ([0-9A-F]+)")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``pred()`` until it is true or ``timeout`` seconds passed; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------- messages


def make_message(rng: Random, serial: int, size: int, tag: str = "crash") -> bytes:
    """A unique RFC 5322 message of about ``size`` bytes (CRLF line ends, ASCII).

    The body is random base64 text plus lines that need dot-stuffing (a lone ``.``
    and lines starting with ``.``), so transparency bugs show up as corruption.
    """
    head = (
        f"From: <{SENDER}>\r\n"
        f"To: <rcpt@example.com>\r\n"
        f"Subject: {tag} message {serial}\r\n"
        f"Message-Id: <{serial}.{rng.getrandbits(48):012x}@{tag}.test>\r\n"
        f"X-Serial: {serial}\r\n"
        "\r\n"
    ).encode()
    body_len = max(1, size - len(head))
    lines = base64.encodebytes(rng.randbytes(body_len * 3 // 4 + 1)).splitlines()
    out: list[bytes] = []
    for i, line in enumerate(lines):
        if i % 41 == 7:
            out.append(b"." + line[:20])
        if i % 97 == 13:
            out.append(b".")
        out.append(line)
    return head + b"\r\n".join(out) + f"\r\n-- end of {serial}\r\n".encode()


def dot_stuff(message: bytes) -> bytes:
    """The DATA wire form of ``message`` (which ends in CRLF): stuffed, plus ``.CRLF``."""
    assert message.endswith(b"\r\n")
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def serial_of(data: bytes) -> int | None:
    """The ``X-Serial`` header value of a message (``None`` without one)."""
    m = _SERIAL_RE.search(data)
    return int(m.group(1)) if m else None


def queued_id(reply: bytes) -> str | None:
    """The queue id from ``250 2.0.0 Queued as ID`` (``None`` for any other reply)."""
    m = _QUEUED_RE.match(reply)
    return m.group(1).decode() if m else None


def strip_received(message: bytes) -> bytes:
    """Remove the one ``Received:`` header smtpgate prepends (with its folded lines).

    Raises:
        AssertionError: the message does not start with smtpgate's Received header.
    """
    assert message.startswith(b"Received: from "), message[:120]
    i = message.index(b"\r\n")
    while message[i + 2 : i + 3] in (b"\t", b" "):
        i = message.index(b"\r\n", i + 2)
    header = message[: i + 2]
    assert b"by mx.test (smtpgate)" in header, header
    return message[i + 2 :]


# --------------------------------------------------------------------------- upstream


@dataclass
class Delivery:
    """One message the capture upstream accepted (recorded when its DATA was complete).

    Attributes:
        serial: X-Serial of the content (``None``: not one of ours).
        rcpts: the recipients the upstream accepted for it.
        mail_from: the reverse-path.
        content: the bytes received (smtpgate's Received header included).
        gen: the smtpgate process generation current when it was recorded.
        started: time.monotonic() when DATA was complete.
        replied: time.monotonic() just before the 250 was written (``None``: never,
            the connection died while the upstream was still "processing").
    """

    serial: int | None
    rcpts: tuple[str, ...]
    mail_from: str
    content: bytes
    gen: int
    started: float
    replied: float | None = None


class _CountingSMTP(SMTP):
    def __init__(self, owner: CaptureUpstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._owner._conn_delta(+1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._owner._conn_delta(-1)


class _Controller(Controller):
    def __init__(self, owner: CaptureUpstream, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        return _CountingSMTP(self._owner, self.handler, **self.SMTP_kwargs)


class CaptureUpstream:
    """The next hop: an aiosmtpd server in a thread recording every accepted message.

    Modes (attribute ``mode``, changeable at any time from the test thread):
    ``"accept"``; ``"slow"`` (sleep ``delay`` seconds after the final dot before the 250 —
    the message counts as accepted when the dot arrived, like a real MTA that writes it
    to disk first); ``"refuse_rcpt"`` (451 to every RCPT); ``"refuse_net"`` (451 to
    recipients in example.net only: partial deliveries); ``"refuse_data"`` (451 after
    the final dot, nothing recorded).

    Args:
        port: TCP port on 127.0.0.1 (0: pick a free one).
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.mode = "accept"
        self.delay = 0.3
        self.generation = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._open = 0
        self._in_data = 0
        self._ctl: _Controller | None = None

    # handler hooks (run in the controller's event loop thread)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mode == "refuse_rcpt" or (
            self.mode == "refuse_net" and address.endswith("@example.net")
        ):
            with self._lock:
                self.refused += 1
            return "451 4.7.1 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Any, envelope: Any
    ) -> str:
        if self.mode == "refuse_data":
            with self._lock:
                self.refused += 1
            return "451 4.3.0 Temporarily unable to accept"
        content = bytes(envelope.content)
        rec = Delivery(serial_of(content), tuple(envelope.rcpt_tos), envelope.mail_from,
                       content, self.generation, time.monotonic())
        with self._lock:
            self._deliveries.append(rec)
            self._in_data += 1
        try:
            if self.mode == "slow":
                await asyncio.sleep(self.delay)
            rec.replied = time.monotonic()
        finally:
            with self._lock:
                self._in_data -= 1
        return "250 2.0.0 OK captured"

    def _conn_delta(self, d: int) -> None:
        with self._lock:
            self._open += d

    # test-thread API

    def start(self) -> None:
        """Start listening on 127.0.0.1:``port``."""
        self._ctl = _Controller(self, hostname="127.0.0.1", port=self.port,
                                server_hostname="upstream.test", decode_data=False,
                                data_size_limit=50_000_000, ready_timeout=10)
        self._ctl.start()

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._ctl is not None:
            self._ctl.stop()
            self._ctl = None

    @property
    def deliveries(self) -> list[Delivery]:
        """A copy of everything accepted so far, in arrival order."""
        with self._lock:
            return list(self._deliveries)

    @property
    def in_data(self) -> int:
        """Accepted messages whose 250 has not been written yet (slow mode)."""
        with self._lock:
            return self._in_data

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no connection is open (after a kill: everything the dead process
        sent has been processed, so later records belong to the next generation)."""
        def idle() -> bool:
            with self._lock:
                return self._open == 0
        return wait_for(idle, timeout, 0.01)


# --------------------------------------------------------------------------- smtpgate


def write_config(path: Path, port: int, upstream_port: int, spool: Path) -> None:
    """The queue-mode configuration file from the issue (fast retries, no disk floor)."""
    path.write_text(
        "[server]\n"
        'hostname = "mx.test"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        "[relay]\n"
        f'url = "smtp://127.0.0.1:{upstream_port}"\n'
        "timeout = 5\n"
        "[delivery]\n"
        'mode = "queue"\n'
        "[queue]\n"
        f'path = "{spool}"\n'
        "min_backoff = 0.2\n"
        "max_backoff = 1\n"
        "scan_interval = 0.1\n"
        "min_free_space = 0\n"
    )


class GateProcess:
    """``python -m smtpgate serve -c CONFIG`` in its own session (process group).

    Args:
        config: the configuration file.
        port: the listening port written in it.
        log_path: stdout and stderr of every run are appended here.
    """

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        """Start the process; do not wait for it to listen."""
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            log.write(f"---- start #{self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpgate", "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Wait until the port accepts connections (recovery is finished by then).

        Raises:
            AssertionError: the process died or did not listen in time (log tail included).
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"smtpgate exited with {self.proc.returncode}:\n"
                                     + self.log_tail())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("smtpgate did not listen:\n" + self.log_tail()) from None
                time.sleep(0.02)

    def start(self) -> None:
        """Spawn and wait until listening."""
        self.spawn()
        self.wait_listening()

    def kill(self) -> float:
        """SIGKILL the whole process group and reap it; returns time.monotonic() right
        after the signal was sent (nothing the process receives later is acted on)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        ts = time.monotonic()
        self.proc.wait(timeout=10)
        self.proc = None
        return ts

    def freeze(self) -> None:
        """SIGSTOP the process group and wait until every thread is stopped, so the
        spool can be inspected in exactly the state a kill would leave."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        task_dir = Path(f"/proc/{self.proc.pid}/task")

        def stopped() -> bool:
            try:
                for t in task_dir.iterdir():
                    stat = (t / "stat").read_text()
                    if stat[stat.rindex(")") + 2] not in "Tt":
                        return False
            except (FileNotFoundError, ProcessLookupError):
                return False
            return True

        assert wait_for(stopped, 5.0, 0.001), "smtpgate did not stop on SIGSTOP"

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Kill the process group if still running (always safe to call)."""
        if self.proc is not None:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process log (for assertion messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def queue_list(config: Path) -> list[dict[str, Any]]:
    """``smtpgate queue list --json -c CONFIG`` parsed."""
    out = subprocess.run(
        [sys.executable, "-m", "smtpgate", "queue", "list", "--json", "-c", str(config)],
        capture_output=True, timeout=30, check=True,
    )
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


# --------------------------------------------------------------------------- spool


@dataclass
class SpoolSnapshot:
    """The committed state of a spool (taken while no process runs on it).

    Attributes:
        pending: serial → recipients still pending in its committed envelope (the
            envelope with the highest ``seq`` when a crash left two, as recovery does).
        qids: serial → queue id of committed messages.
        tmp: names in ``tmp/``.
        orphans: serial (or the id when unreadable) of ``messages/<id>`` files
            without an envelope (no envelope file and no intact trailer).
        missing_message: ids of envelopes whose message file is missing.
        corrupt: names in ``corrupt/``.
        duplicate_envelopes: ids with envelopes in two states.
    """

    pending: dict[int, set[str]] = field(default_factory=dict)
    qids: dict[int, str] = field(default_factory=dict)
    tmp: list[str] = field(default_factory=list)
    orphans: list[int | str] = field(default_factory=list)
    missing_message: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    duplicate_envelopes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing queued and nothing left over."""
        return not (self.pending or self.tmp or self.orphans or self.missing_message)


_HEADER = re.compile(rb"#smtpgate-queue-file 2 ([0-9]{12})\n")
_TRAILER = re.compile(rb"\n#smtpgate-envelope ([0-9]{10}) ([0-9a-f]{8})\n\Z")


def embedded_envelope(data: bytes) -> dict[str, Any] | None:
    """The envelope stored in a queue file (docs/queue.md: header, message, envelope,
    trailer), ``None`` when the file is not intact (never committed)."""
    h = _HEADER.match(data)
    m = _TRAILER.search(data)
    if h is None or m is None:
        return None
    size, n = int(h.group(1)), int(m.group(1))
    if h.end() + size + n != m.start():
        return None
    raw = data[m.start() - n : m.start()]
    if zlib.crc32(raw) != int(m.group(2), 16):
        return None
    env: dict[str, Any] = json.loads(raw)
    return env


def snapshot_spool(spool: Path) -> SpoolSnapshot:
    """Read a spool's committed state (layout of docs/queue.md)."""
    snap = SpoolSnapshot()
    best: dict[str, dict[str, Any]] = {}
    for state in ("incoming", "deferred", "hold"):
        d = spool / state
        for name in sorted(os.listdir(d)) if d.is_dir() else []:
            if not name.endswith(".json"):
                continue
            data = json.loads((d / name).read_bytes())
            qid = name[: -len(".json")]
            if qid in best:
                snap.duplicate_envelopes.append(qid)
                if data["seq"] <= best[qid]["seq"]:
                    continue
            best[qid] = data
    messages = set(os.listdir(spool / "messages")) if (spool / "messages").is_dir() else set()
    for qid in sorted(messages - set(best)):
        # A queue file without an envelope file: its own envelope (after the message,
        # before the trailer) is current, when the trailer is intact (committed).
        embedded = embedded_envelope((spool / "messages" / qid).read_bytes())
        if embedded is not None:
            best[qid] = embedded
    for qid, data in best.items():
        if qid not in messages:
            snap.missing_message.append(qid)
            continue
        serial = serial_of((spool / "messages" / qid).read_bytes())
        assert serial is not None, f"spool message {qid} has no X-Serial"
        snap.qids[serial] = qid
        snap.pending[serial] = {r["address"] for r in data["recipients"]
                                if r["state"] == "pending"}
    for qid in sorted(messages - set(best)):
        serial = serial_of((spool / "messages" / qid).read_bytes())
        snap.orphans.append(serial if serial is not None else qid)
    for sub, target in (("tmp", snap.tmp), ("corrupt", snap.corrupt)):
        if (spool / sub).is_dir():
            target.extend(sorted(os.listdir(spool / sub)))
    return snap

"""Client-side latency of the end of DATA: one session, messages sent one after another.

Entry points: :func:`measure` (used by bench.py) and
``python bench/latency.py --port N [--count 200] [--size 4096]`` against any server on
127.0.0.1. The time of one message runs from sending its last body chunk with the
terminating ``CRLF.CRLF`` to reading the complete reply (RFC 5321 §4.1.1.4, §4.2).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from typing import BinaryIO

SENDER = "bench@client.test"
RECIPIENT = "sink@bench.test"


class SmtpReplyError(Exception):
    """The server answered something other than the expected reply."""


def _reply(f: BinaryIO, expect: bytes, what: str) -> bytes:
    """Read one (multi-line) reply; raise SmtpReplyError unless it starts with ``expect``."""
    while True:
        line = f.readline()
        if not line:
            raise SmtpReplyError(f"{what}: connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            break
    if not line.startswith(expect):
        raise SmtpReplyError(f"{what}: {line.decode(errors='replace').strip()}")
    return line


def message(size: int) -> bytes:
    """A message like smtp-source's: a few headers, then ``size`` bytes of 80-byte lines.

    Returns:
        the DATA payload without the final ``.CRLF`` (no line starts with a dot).
    """
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency probe\r\n\r\n").encode()
    line = b"La" * 39 + b"\r\n"  # 80 bytes
    body = line * (size // len(line)) + b"x" * (size % len(line))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body


def measure(port: int, count: int = 200, size: int = 4096, warmup: int = 10) -> list[float]:
    """Send ``warmup + count`` messages sequentially over one session; time each DATA end.

    Args:
        port: server port on 127.0.0.1.
        count: messages timed.
        size: body bytes per message (headers add ~80).
        warmup: messages sent first and not timed.

    Returns:
        ``count`` latencies in seconds (end of DATA sent -> 2xx reply read).

    Raises:
        SmtpReplyError: any reply other than 220/250/354 (the message was not accepted).
        OSError: connection problems.
    """
    payload = message(size)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _reply(f, b"220", "greeting")
        s.sendall(b"EHLO client.test\r\n")
        _reply(f, b"250", "EHLO")
        out: list[float] = []
        for i in range(warmup + count):
            s.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
            _reply(f, b"250", "MAIL")
            s.sendall(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
            _reply(f, b"250", "RCPT")
            s.sendall(b"DATA\r\n")
            _reply(f, b"354", "DATA")
            s.sendall(payload[:-1024])
            t0 = time.perf_counter()
            s.sendall(payload[-1024:] + b".\r\n")
            _reply(f, b"250", f"end of DATA (message {i + 1})")
            if i >= warmup:
                out.append(time.perf_counter() - t0)
        s.sendall(b"QUIT\r\n")
        _reply(f, b"221", "QUIT")
    return out


def send_one(port: int, body: str) -> str:
    """Send one message with ``body`` (CRLF lines, no leading dots); return the DATA-end reply.

    Returns:
        the last line of the reply to the end of DATA, e.g. ``"554 5.7.1 Virus found: ..."``.

    Raises:
        SmtpReplyError: greeting, EHLO, MAIL, RCPT or DATA not accepted.
        OSError: connection problems.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        _reply(f, b"220", "greeting")
        for cmd, code in ((b"EHLO client.test", b"250"), (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
                          (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"), (b"DATA", b"354")):
            s.sendall(cmd + b"\r\n")
            _reply(f, code, cmd.decode())
        head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: probe\r\n\r\n"
        s.sendall((head + body).encode() + b".\r\n")
        line = _reply(f, b"", "end of DATA")
        s.sendall(b"QUIT\r\n")
    return line.decode(errors="replace").strip()


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs (linear interpolation, like numpy's default)."""
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    """CLI: print median and p95 of the DATA-end latency in ms."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)
    xs = measure(args.port, args.count, args.size)
    print(f"{len(xs)} messages: median {1000 * statistics.median(xs):.2f} ms, "
          f"p95 {1000 * percentile(xs, 95):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

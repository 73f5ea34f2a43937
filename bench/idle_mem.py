"""Resident memory per idle SMTP connection after EHLO, measured from /proc.

Entry points: :func:`measure` (used by bench.py) and
``python bench/idle_mem.py --pid PID --port PORT [--conns 1000]`` for a server already
running on 127.0.0.1. Opens N connections, reads each 220 greeting, sends EHLO and
reads the whole 250 reply (RFC 5321 §4.1.1.1), then reads the server's VmRSS.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _read_reply(f: BinaryIO) -> bytes:
    """Read one (multi-line) SMTP reply; return its last line. Raises on EOF."""
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if len(line) < 4 or line[3:4] != b"-":
            return line


def open_ehlo(port: int, n: int) -> list[socket.socket]:
    """Open n connections to 127.0.0.1:port, each greeted and past EHLO (250).

    Raises:
        ConnectionError: a connection was refused, closed, or got a non-2xx reply.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            f = s.makefile("rb")
            greet = _read_reply(f)
            if not greet.startswith(b"220"):
                raise ConnectionError(f"connection {i}: greeting {greet!r}")
            s.sendall(b"EHLO client.test\r\n")
            last = _read_reply(f)
            if not last.startswith(b"250"):
                raise ConnectionError(f"connection {i}: EHLO reply {last!r}")
            f.close()  # the socket stays open; only the buffered reader goes
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def measure(pid: int, port: int, conns: int = 1000, warmup: int = 50) -> float:
    """KiB of server RSS per idle connection after EHLO.

    Warms the server up with ``warmup`` EHLO+QUIT sessions first (so lazy imports and
    first-use caches are not counted), then reads VmRSS, holds ``conns`` connections
    after EHLO, waits 0.5 s, reads VmRSS again and closes them.

    Returns:
        (RSS after - RSS before) / conns, in KiB.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < conns + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, conns + 1024), hard))
    for s in open_ehlo(port, warmup):
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
        s.close()
    time.sleep(0.5)
    before = vm_rss_kib(pid)
    socks = open_ehlo(port, conns)
    try:
        time.sleep(0.5)
        after = vm_rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / conns


def main(argv: list[str] | None = None) -> int:
    """CLI: print KiB per idle connection for a running server."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pid", type=int, required=True, help="server process id")
    ap.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    ap.add_argument("--conns", type=int, default=1000)
    args = ap.parse_args(argv)
    print(f"{measure(args.pid, args.port, args.conns):.2f} KiB/conn")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the test suite: a capture delivery, a raw SMTP client, config merging."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpgate.envelope import Envelope


class Capture:
    """A deliver= callable that records (envelope, message bytes)."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    def __call__(self, envelope: Envelope, message: bytes) -> None:
        self.messages.append((envelope, message))

    @staticmethod
    def strip_received(message: bytes) -> bytes:
        assert message.startswith(b"Received: "), message[:80]
        i = message.index(b"\r\n")
        while message[i + 2 : i + 3] == b"\t":
            i = message.index(b"\r\n", i + 2)
        return message[i + 2 :]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out



class RawClient:
    """A line-level SMTP client over a plain socket, for byte-exact dialogues."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.read_reply()

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered={self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_reply(self) -> bytes:
        """One complete (possibly multi-line) reply, lines joined with CRLF."""
        lines = [self.read_line()]
        while len(lines[-1]) >= 4 and lines[-1][3:4] == b"-":
            lines.append(self.read_line())
        return b"\r\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes | str) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()


def _find_corpus() -> Path:
    """The shared message corpus: ``$MAIL_CORPUS``, else ``shared/corpus`` beside the repo."""
    env = os.environ.get("MAIL_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "corpus"


CORPUS = _find_corpus()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` at the time of the call."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds passed; its last answer (a bound
    on waiting, never an assertion on time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())

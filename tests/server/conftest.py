"""Fixtures for server tests: an in-process smtpgate on a free port, capture deliveries,
throw-away TLS certificates (trustme), a raw line-level SMTP client."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpgate.app import Smtpgate
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


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


@pytest.fixture
def capture() -> Capture:
    return Capture()


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[Callable[..., Smtpgate]]:
    """Start smtpgate in a thread: ``run_app({"relay": {...}}, deliver=...)``."""
    apps: list[Smtpgate] = []

    def start(cfg: dict[str, Any] | None = None, **kwargs: Any) -> Smtpgate:
        base = {
            "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"]},
            "maildir": {"path": str(tmp_path / "mail")},
        }
        app = Smtpgate(_merge(base, cfg or {}), **kwargs)
        app.start_thread()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop_thread(timeout=2)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx.test", "localhost", "127.0.0.1")
    chain = d / "chain.pem"
    key = d / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    both = d / "both.pem"
    both.write_bytes(cert.private_key_pem.bytes() + chain.read_bytes())
    cafile = d / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return {"chain": str(chain), "key": str(key), "both": str(both), "ca": str(cafile)}


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


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


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
        c = RawClient(port, host, timeout)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()

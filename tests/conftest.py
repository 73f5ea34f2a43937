"""Fixtures for the whole suite: an in-process smtpgate on a free port, capture deliveries,
throw-away TLS certificates (trustme), a raw line-level SMTP client."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpgate.app import Smtpgate

from .support import Capture, RawClient, merge


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
        app = Smtpgate(merge(base, cfg or {}), **kwargs)
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

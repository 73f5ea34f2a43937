"""Fixtures for delivery tests: an aiosmtpd capture upstream (plain, STARTTLS, implicit
TLS, AUTH, DSN-capable) on a free loopback port, and a trustme CA."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

USER = "relayuser"
PASSWORD = "s3cr:t/p@ss w%rd"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    content: bytes
    tls: bool
    session: int


@dataclass
class CaptureHandler:
    """Records every transaction; can refuse senders, recipients or the data."""

    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    refuse_mail: str | None = None
    data_reply: str | None = None
    messages: list[Captured] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)
    ehlo_count: int = 0
    rset_count: int = 0
    commands: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        with self.lock:
            self.ehlo_count += 1
        session.host_name = hostname
        if getattr(server, "advertise_dsn", False):
            responses.insert(-1, "250-DSN")
        return responses

    async def handle_RSET(self, server: SMTP, session: Any, envelope: Any) -> str:
        with self.lock:
            self.rset_count += 1
        return "250 OK"

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.sessions.add(id(session))
            self.commands.append(f"MAIL {address}")
        if self.refuse_mail:
            return self.refuse_mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.commands.append(f"RCPT {address}")
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        with self.lock:
            self.messages.append(
                Captured(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    list(envelope.mail_options),
                    list(envelope.rcpt_options),
                    bytes(envelope.original_content),
                    tls,
                    id(session),
                )
            )
        return "250 2.0.0 Ok: queued as CAPTURE1"


class DsnSMTP(SMTP):
    """aiosmtpd that advertises DSN and accepts its parameters (it records them)."""

    advertise_dsn = True

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None:
            for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(key, None)
        return result


class CaptureController(Controller):
    def __init__(self, handler: CaptureHandler, *, dsn: bool = False, **kwargs: Any) -> None:
        self.dsn = dsn
        kwargs.setdefault("hostname", "127.0.0.1")
        kwargs.setdefault("server_hostname", "capture.test")
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        cls = DsnSMTP if self.dsn else SMTP
        return cls(self.handler, **self.SMTP_kwargs)


@dataclass
class Upstream:
    controller: CaptureController
    handler: CaptureHandler

    @property
    def host(self) -> str:
        return str(self.controller.hostname)

    @property
    def port(self) -> int:
        return int(self.controller.port)

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


StartUpstream = Callable[..., Upstream]


@pytest.fixture
def start_upstream() -> Iterator[StartUpstream]:
    """Start capture upstreams: ``start_upstream(dsn=False, **aiosmtpd_kwargs)``."""
    started: list[CaptureController] = []

    def start(*, dsn: bool = False, handler: CaptureHandler | None = None, **kw: Any) -> Upstream:
        handler = handler or CaptureHandler()
        host = kw.get("hostname", "127.0.0.1")
        controller = CaptureController(handler, dsn=dsn, port=free_port(host), **kw)
        controller.start()
        started.append(controller)
        return Upstream(controller, handler)

    yield start
    for controller in started:
        controller.stop(no_assert=True)


@pytest.fixture
def upstream(start_upstream: StartUpstream) -> Upstream:
    return start_upstream()


@dataclass
class Pki:
    ca: trustme.CA
    cafile: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    path: Path = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return Pki(ca, str(path), ctx)


def authenticator(
    server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)

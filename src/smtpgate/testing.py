"""Testing smtpgate plugins and configurations with pytest (docs/testing.md).

A pytest plugin, registered through the ``pytest11`` entry point ``smtpgate``: installing
smtpgate makes these fixtures available in every test suite of the environment.

Fixtures:
    ``smtpgate_server``: a factory ``start(config=None, *, deliver=None,
        authenticator=None, relay_to=None) -> RunningServer`` that starts an in-process
        smtpgate (in a background thread, on a free loopback port) with the given
        configuration and stops it when the test ends.
    ``capture_upstream``: a :class:`CaptureUpstream`, an SMTP server on a free loopback
        port that records every message relayed to it (what a test of a relay
        configuration asserts on), and can refuse chosen recipients.

Helpers that need no sockets, for running one plugin's hooks directly:
    :func:`make_session`, :func:`make_transaction` and :class:`PluginHarness` (builds the
    chain a configuration describes and runs one stage of it, as a session would).

Everything here uses smtpgate's own public API (:class:`smtpgate.app.Smtpgate`,
:class:`smtpgate.hooks.HookRunner`); nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from .app import DeliverFunc, Smtpgate
from .auth import Authenticator
from .config import Config, config_from_mapping, load_config
from .delivery import Delivery
from .envelope import Envelope, Recipient, SessionInfo
from .hooks import HookResult, HookRunner, Stage, Transaction, accept
from .plugins import load_plugins
from .reply import Reply

__all__ = [
    "CaptureUpstream",
    "CapturedMessage",
    "PluginHarness",
    "RunningServer",
    "capture_upstream",
    "make_session",
    "make_transaction",
    "smtpgate_server",
]

_ids = itertools.count(1)

ConfigSource = Config | Mapping[str, Any] | str | os.PathLike[str] | None


# --------------------------------------------------------------------------------------------
# Building sessions and transactions without sockets
# --------------------------------------------------------------------------------------------


def make_session(
    peer_ip: str = "192.0.2.1",
    *,
    helo: str | None = "client.example",
    esmtp: bool = True,
    tls_version: str | None = None,
    auth_user: str | None = None,
    peer_port: int = 40000,
    hostname: str = "mx.test",
    **fields: Any,
) -> SessionInfo:
    """A :class:`~smtpgate.envelope.SessionInfo` as a session would have built it.

    Args:
        peer_ip: the client's address (``192.0.2.1``, TEST-NET-1, by default: not a
            local network, so relay control treats it as an outside client).
        helo: the HELO/EHLO name already given (``None``: before HELO).
        esmtp: True after EHLO, False after HELO.
        tls_version: e.g. ``"TLSv1.3"`` for a session with TLS on.
        auth_user: the authenticated identity (RFC 4954), ``None`` if none.
        peer_port: the client's TCP port.
        hostname: smtpgate's own host name.
        fields: any other :class:`SessionInfo` attribute (``local_ip``, ``notes`` ...).
    """
    return SessionInfo(
        session_id=f"T{next(_ids):06d}", peer_ip=peer_ip, peer_port=peer_port,
        local_ip="127.0.0.1", local_port=25, hostname=hostname, helo_name=helo,
        esmtp=esmtp, tls_version=tls_version, auth_user=auth_user, **fields,
    )


def make_transaction(
    mail_from: str = "sender@example.org",
    recipients: Sequence[str] = (),
    message: bytes | None = None,
    *,
    mail_params: Mapping[str, str | None] | None = None,
) -> Transaction:
    """A :class:`~smtpgate.hooks.Transaction` at the point the arguments describe.

    Args:
        mail_from: the reverse-path (``""`` for ``<>``).
        recipients: forward-paths already accepted (what ``rcpt`` hooks of later
            recipients and the data stages see).
        message: the message (CRLF lines, not dot-stuffed) for the ``headers``/``data``/
            ``queue`` stages; ``None`` before the end of data. LF-only lines are turned
            into CRLF, as a client's would arrive.
        mail_params: ESMTP MAIL parameters, keys upper-case (``{"SIZE": "1234"}``).
    """
    envelope = Envelope(mail_from=mail_from, mail_params=dict(mail_params or {}),
                        rcpt_to=[Recipient(r) for r in recipients])
    tx = Transaction(envelope, f"TX{next(_ids):06d}")
    if message is not None:
        if b"\r\n" not in message and b"\n" in message:
            message = message.replace(b"\n", b"\r\n")
        tx.message = message
    return tx


class PluginHarness:
    """The plugin chain of a configuration, run stage by stage without a server.

    The chain is built exactly as ``smtpgate serve`` builds it (the built-in plugins the
    configuration implies, relay control among them, then the ``[[plugin]]`` tables), so
    a verdict here is the verdict a session would get from the chain. What the session
    does around the chain (the protocol checks, the reply sent, the delivery) is not
    run: test that with the ``smtpgate_server`` fixture.

    Args:
        config: a :class:`~smtpgate.config.Config`, a mapping with the TOML structure
            (``{"plugin": [{"module": "my_plugin", "option": 1}]}``), or a TOML file path.
        base_dir: directory that relative paths in a mapping are resolved against.

    Attributes:
        config: the configuration.
        hooks: the :class:`~smtpgate.hooks.HookRunner` holding the chain.
        provided: the objects the plugins provided (``registry.provide``), e.g.
            ``provided["relay"]``, the relay policy.

    Raises:
        ConfigError: the configuration or a plugin's options are invalid (every problem
            listed, as ``check-config`` would list them).
    """

    def __init__(self, config: ConfigSource = None, *,
                 base_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = _load(config, base_dir)
        self.hooks = HookRunner(
            timeout=self.config.hooks.timeout,
            decision_level=logging.getLevelName(self.config.log.decisions))
        self.provided = load_plugins(self.config, self.hooks)

    def chain(self, stage: Stage | str) -> list[str]:
        """The plugins with a hook at ``stage``, in the order they run (a hook registered
        in code, not by a plugin, by its hook name)."""
        return [h.plugin or h.name for h in self.hooks.hooks(stage)]

    async def arun(self, stage: Stage | str, *args: Any) -> HookResult:
        """Run ``stage``'s chain with the stage's arguments (docs/plugins.md "Stages":
        ``mail(session, transaction)``, ``rcpt(session, transaction, recipient)``, ...).

        Returns:
            The deciding :class:`~smtpgate.hooks.HookResult` (CONT when every hook had
            no opinion); the stage's default reply is filled in for a denial without one.
        """
        if Stage(stage) is Stage.RCPT and len(args) == 3 and isinstance(args[2], str):
            args = (args[0], args[1], Recipient(args[2]))
        return await self.hooks.run(stage, *args)

    def run(self, stage: Stage | str, *args: Any) -> HookResult:
        """:meth:`arun` from synchronous code (a new event loop for the call).

        For ``rcpt`` the recipient may be given as a string.
        """
        return asyncio.run(self.arun(stage, *args))


def _load(config: ConfigSource, base_dir: str | os.PathLike[str] | None = None) -> Config:
    if config is None:
        return Config.default()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    return config_from_mapping(config, base_dir=base_dir)


# --------------------------------------------------------------------------------------------
# Servers on loopback
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunningServer:
    """An smtpgate started by the ``smtpgate_server`` fixture.

    Attributes:
        app: the running :class:`~smtpgate.app.Smtpgate` (``app.relay``, ``app.hooks``,
            ``app.admin``, ``app.chain_addresses`` ...).
        host: the loopback address it listens on.
        port: its first SMTP port (the first milter or policy port when it has no SMTP
            listener).
    """

    app: Smtpgate
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for :class:`smtplib.SMTP` or a raw socket."""
        return (self.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (seconds for transactions in flight); the fixture does it
        at the end of the test when not done before."""
        self.app.stop_thread(timeout=timeout)


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """One message as the :class:`CaptureUpstream` received it.

    Attributes:
        sender: the reverse-path (``""`` for ``<>``).
        recipients: the forward-paths it accepted.
        data: the message bytes exactly as the relaying server sent them (CRLF lines,
            dot-unstuffed), without any header of the capture server.
        helo: the HELO/EHLO name the relaying server gave.
        tls_version: the TLS version of the connection, ``None`` without TLS.
        mail_params: ESMTP MAIL parameters (``SIZE``, ``BODY``, ...).
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    helo: str | None
    tls_version: str | None
    mail_params: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def email(self) -> EmailMessage:
        """The message parsed by the standard :mod:`email` package."""
        message = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(message, EmailMessage)
        return message

    def header(self, name: str) -> str | None:
        """The first ``name`` header field's value, ``None`` when absent."""
        value = self.email[name]
        return None if value is None else str(value)


class CaptureUpstream:
    """An SMTP server on a free loopback port that records what is relayed to it.

    It is an smtpgate itself (so it speaks ESMTP, PIPELINING, 8BITMIME, SIZE and
    CHUNKING like a real MTA) whose ``queue`` stage takes every message into
    :attr:`messages` instead of delivering it. Point a configuration at :attr:`url`
    (``[relay] url``) to test what your smtpgate relays.

    Args:
        hostname: the name in its greeting.

    Attributes:
        messages: the :class:`CapturedMessage` list, in arrival order.
        refused: ``{recipient address (lower case): Reply}``: recipients it refuses at
            RCPT with that reply (set with :meth:`refuse`).
    """

    def __init__(self, hostname: str = "upstream.test") -> None:
        self.messages: list[CapturedMessage] = []
        self.refused: dict[str, Reply] = {}
        self._arrived = threading.Condition()
        self.app = Smtpgate({"server": {"hostname": hostname, "listen": ["127.0.0.1:0"],
                                        "max_connections_per_ip": 1000},
                             "relay": {"local_networks": ["127.0.0.0/8", "::1"]}})
        self.app.hook(Stage.RCPT)(self._rcpt)
        self.app.hook(Stage.QUEUE)(self._queue)

    def _rcpt(self, _session: SessionInfo, _tx: Transaction, recipient: Recipient
              ) -> HookResult | Reply:
        reply = self.refused.get(recipient.address.lower())
        # An OK skips relay control: the capture server takes mail for any domain.
        return accept() if reply is None else reply

    def _queue(self, session: SessionInfo, tx: Transaction) -> HookResult:
        captured = CapturedMessage(
            sender=tx.mail_from, recipients=tuple(r.address for r in tx.recipients),
            data=tx.raw, helo=session.helo_name, tls_version=session.tls_version,
            mail_params=dict(tx.mail_params))
        with self._arrived:
            self.messages.append(captured)
            self._arrived.notify_all()
        return accept(f"Captured as {len(self.messages)}")

    def start(self) -> None:
        """Start listening (the fixture does it)."""
        self.app.start_thread()

    def stop(self) -> None:
        """Stop (the fixture does it at the end of the test)."""
        self.app.stop_thread(timeout=2.0)

    @property
    def port(self) -> int:
        """Its TCP port on 127.0.0.1."""
        return self.app.port

    @property
    def url(self) -> str:
        """``smtp://127.0.0.1:PORT``, for ``[relay] url``."""
        return f"smtp://127.0.0.1:{self.port}"

    def refuse(self, address: str, reply: Reply | str = "550 5.1.1 No such user") -> None:
        """Refuse ``address`` at RCPT with ``reply`` (``"550 5.1.1 text"`` or a Reply;
        a 4xx reply makes a temporary failure)."""
        if isinstance(reply, str):
            code, enhanced, text = reply.split(" ", 2)
            reply = Reply(int(code), enhanced, text)
        self.refused[address.lower()] = reply

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[CapturedMessage]:
        """Wait until at least ``count`` messages arrived; return them all.

        Args:
            count: messages to wait for (in total, counting those already there).
            timeout: seconds.

        Raises:
            TimeoutError: fewer than ``count`` arrived within ``timeout`` (the message
                says how many did).
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} message(s) arrived "
                                   f"at the capture upstream within {timeout:g}s")
            return list(self.messages)


def _with_test_defaults(data: Mapping[str, Any], tmp: Path,
                        relay_to: CaptureUpstream | None) -> dict[str, Any]:
    """The mapping with a free loopback port, and files under ``tmp``, where not given."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v
                           for k, v in data.items()}
    server = out.setdefault("server", {})
    server.setdefault("listen", [] if out.get("listener") else ["127.0.0.1:0"])
    server.setdefault("hostname", "mx.test")
    out.setdefault("maildir", {}).setdefault("path", str(tmp / "mail"))
    out.setdefault("queue", {}).setdefault("path", str(tmp / "queue"))
    out.setdefault("capture", {}).setdefault("database", str(tmp / "capture.sqlite"))
    if relay_to is not None:
        out.setdefault("relay", {})["url"] = relay_to.url
    return out


@pytest.fixture
def capture_upstream() -> Iterator[CaptureUpstream]:
    """A running :class:`CaptureUpstream` (stopped after the test)."""
    upstream = CaptureUpstream()
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


StartServer = Callable[..., RunningServer]


@pytest.fixture
def smtpgate_server(tmp_path: Path) -> Iterator[StartServer]:
    """A factory that starts smtpgate in process; every server it started is stopped
    after the test.

    ``start(config=None, *, deliver=None, authenticator=None, relay_to=None)``:

    - ``config``: a mapping with the TOML structure, a TOML file path, or a
      :class:`~smtpgate.config.Config`. For a mapping, what it leaves out is filled
      for a test: ``server.listen = ["127.0.0.1:0"]`` (a free port; ``[]`` when the
      mapping has ``[[listener]]`` tables, which then give every address),
      ``server.hostname = "mx.test"``, the Maildir, queue and capture paths under the
      test's ``tmp_path``.
    - ``deliver``: a :class:`~smtpgate.delivery.Delivery` or a callable
      ``(envelope, message: bytes)`` receiving each accepted message instead of the
      configured delivery.
    - ``authenticator``: an :class:`~smtpgate.auth.Authenticator` or a callable
      ``(username, password) -> bool``; enables AUTH.
    - ``relay_to``: a :class:`CaptureUpstream`: sets ``relay.url`` to it.

    Returns a :class:`RunningServer` (``.port``, ``.app``). Raises
    :class:`~smtpgate.errors.ConfigError` for an invalid configuration, as ``serve`` would.
    """
    started: list[RunningServer] = []

    def start(config: ConfigSource = None, *,
              deliver: Delivery | DeliverFunc | None = None,
              authenticator: Authenticator | Callable[..., Any] | None = None,
              relay_to: CaptureUpstream | None = None) -> RunningServer:
        if config is None or isinstance(config, Mapping):
            cfg = config_from_mapping(_with_test_defaults(config or {}, tmp_path, relay_to),
                                      base_dir=tmp_path)
        else:
            cfg = _load(config)
            if relay_to is not None:
                from dataclasses import replace
                cfg = replace(cfg, relay=replace(cfg.relay, url=relay_to.url))
        app = Smtpgate(cfg, deliver=deliver, authenticator=authenticator)
        app.start_thread()
        bound = app.addresses or [(h, p) for _, h, p in app.chain_addresses]
        host, port = bound[0]
        server = RunningServer(app=app, host=host, port=port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()

"""The embeddable server: configuration + hooks + policy + delivery, started and stopped.

Entry point: :class:`Smtpgate`. ``await app.start()`` / ``await app.stop()`` inside an
event loop, or ``app.start_thread()`` / ``app.stop_thread()`` from synchronous code
(like aiosmtpd's Controller or tcllib ``::smtpd::start``/``::smtpd::stop``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import Authenticator, CallableAuthenticator, FailureLimiter, UsersFileAuthenticator
from .config import Config, ListenAddress, ListenerConfig, config_from_mapping
from .delivery import CallableDelivery, Delivery, make_delivery
from .envelope import SessionInfo
from .errors import ConfigError
from .hooks import HookRunner, Stage, load_callable
from .policy import RelayPolicy
from .protocol import ProtocolConfig
from .queue.delivery import QueueDelivery
from .queue.manager import QueueManager
from .queue.runner import RemoteQueue
from .queue.store import QueueStore
from .reply import Reply
from .scanners.stage import ScannerSet
from .server import ServerContext, SmtpServer, server_tls_context

log = logging.getLogger("smtpgate")

DeliverFunc = Callable[..., Any]


class Smtpgate:
    """An smtpgate server instance.

    Args:
        config: a :class:`~smtpgate.config.Config` (``load_config(path)``), a mapping
            with the TOML structure (``{"server": {"listen": ["127.0.0.1:0"]}}``), or
            ``None`` for the embedded defaults (127.0.0.1:2525, Maildir delivery).
        deliver: deliver accepted messages to this instead of the configured relay
            or Maildir: a :class:`~smtpgate.delivery.Delivery`, or a callable
            ``(envelope, message: bytes) -> None | Reply`` (sync or async; see
            :class:`~smtpgate.delivery.local.CallableDelivery`).
        authenticator: check AUTH credentials with this instead of ``auth.users_file``:
            an :class:`~smtpgate.auth.Authenticator` or a callable
            ``(username, password[, session]) -> bool``. Enables AUTH.

    Attributes:
        hooks: the :class:`~smtpgate.hooks.HookRunner`; register with
            :meth:`hook` or ``app.hooks.register(stage, func)``.
        relay: the :class:`~smtpgate.policy.RelayPolicy`; change relay domains and
            local networks at run time (nssmtpd ``ns_smtpd relay|local ...``).
        scanners: the :class:`~smtpgate.scanners.stage.ScannerSet` from ``[[scanner]]``
            (``check_spam``, ``check_virus``, ``train_spam``, ``spam_version``, ``virus_version``).
        config: the configuration in force.

    Raises:
        ConfigError: invalid configuration (every problem listed), unloadable hook or
            TLS files.
    """

    def __init__(
        self,
        config: Config | dict[str, Any] | None = None,
        *,
        deliver: Delivery | DeliverFunc | None = None,
        authenticator: Authenticator | Callable[..., Any] | None = None,
    ) -> None:
        if config is None:
            config = Config.default()
        elif isinstance(config, dict):
            config = config_from_mapping(config)
        self.config = config
        hooks_cfg = config.hooks
        self.hooks = HookRunner(timeout=hooks_cfg.timeout)
        self.helo_rules: Any = None
        if config.helo_rules:
            from .policy.helo_rules import HeloRules

            self.helo_rules = HeloRules.from_config(list(config.helo_rules))
        self.address_checks = [load_callable(spec, "hooks.address_check")
                               for spec in hooks_cfg.address_check]
        for stage in Stage:
            for spec in getattr(hooks_cfg, stage.value, ()):
                self.hooks.register(stage, load_callable(spec, f"hooks.{stage.value}"), name=spec)
        self.relay = RelayPolicy(config.relay.relay_domains, config.relay.local_networks)
        self._delivery_arg = deliver
        self.delivery: Delivery | None = None
        self.authenticator = self._make_authenticator(authenticator)
        self.tls_context = (
            server_tls_context(
                config.tls.certificate,
                config.tls.key,
                cafile=config.tls.cafile,
                capath=config.tls.capath,
                ciphers=config.tls.ciphers,
                min_version=config.tls.min_version,
            )
            if config.tls.certificate
            else None
        )
        self.scanners = ScannerSet.from_config(config.scanners, config.server.hostname)
        # 1-minute load average reader (ZMailer -L); replace it in tests to fake the load.
        self.load_average: Any = None
        self.server: SmtpServer | None = None
        self.queue: QueueManager | RemoteQueue | None = None
        self._background: set[asyncio.Task[int]] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    def _make_authenticator(
        self, authenticator: Authenticator | Callable[..., Any] | None
    ) -> Authenticator | None:
        auth = self.config.auth
        if authenticator is not None:
            if hasattr(authenticator, "authenticate"):
                return authenticator
            return CallableAuthenticator(authenticator)
        if auth.authenticator:
            return CallableAuthenticator(load_callable(auth.authenticator, "auth.authenticator"))
        if auth.users_file:
            return UsersFileAuthenticator(auth.users_file)
        return None

    @property
    def delivery_mode(self) -> str:
        """``"queue"``, ``"proxy"`` or ``"local"`` (see docs/queue.md)."""
        return "local" if self._delivery_arg is not None else self.config.delivery_mode

    async def _start_queue(self) -> QueueDelivery:
        from .queue.runner import RemoteQueue, build_manager

        cfg = self.config
        q = cfg.queue
        store = QueueStore(q.path, fsync=q.fsync)
        if q.delivery_process:
            # Postfix-style split: this process only commits; a child recovers and delivers.
            self.queue = RemoteQueue(cfg)
        else:
            self.queue = build_manager(cfg)
        await self.queue.start()  # recovery happens before the listeners open
        return QueueDelivery(store, self.queue, q.min_free_space)

    def _current_load(self) -> float:
        if self.load_average is None:
            from .policy.loadavg import LoadAverage

            self.load_average = LoadAverage()
        return float(self.load_average.current())

    async def _address_check(self, session: SessionInfo, address: str, kind: str) -> Reply | None:
        """Run the ``[hooks] address_check`` callables (HELO-rule flags f/t, VRFY, EXPN).

        Each gets ``(session, address, kind)`` with kind ``"mail"``, ``"rcpt"``, ``"vrfy"``
        or ``"expn"`` and returns None/True (fine), False (550 5.1.1), a Reply or a
        HookResult. An exception is logged and gives 451 4.3.0.
        """
        from .hooks import HookResult

        for check in self.address_checks:
            try:
                result = check(session, address, kind)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                log.exception("address_check failed for %r", address)
                return Reply(451, "4.3.0", "Address verification failed, try again later")
            if result is False:
                return Reply(550, "5.1.1", f"<{address}>: address rejected")
            if isinstance(result, Reply) and result.code >= 400:
                return result
            if isinstance(result, HookResult) and result.verdict.is_denial:
                return result.reply or Reply(550, "5.1.1", f"<{address}>: address rejected")
        return None

    def _overloaded(self) -> Reply | None:
        """421 4.3.2 while the 1-minute load average is above ``server.max_load_average``."""
        limit = self.config.server.max_load_average
        if self._current_load() > limit:
            return Reply(421, "4.3.2", "System overloaded, try again later")
        return None

    def _etrn(self, node: str, session: SessionInfo) -> Reply:
        from ipaddress import ip_address, ip_network

        allowed = False
        try:
            ip = ip_address(session.peer_ip)
            allowed = any(ip in ip_network(n, strict=False)
                          for n in self.config.queue.etrn_networks)
        except ValueError:
            allowed = False
        if not allowed or self.queue is None:
            return Reply(459, "4.7.1", f"Node {node} not allowed: ETRN not permitted from here")
        task = asyncio.get_running_loop().create_task(self.queue.flush_matching(node))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return Reply(250, "2.0.0", f"Queuing for node {node} started")

    def _make_delivery(self) -> Delivery:
        arg = self._delivery_arg
        if arg is None:
            cfg = self.config
            return make_delivery(
                cfg.relay.url or None,
                maildir_path=cfg.maildir.path,
                timeout=cfg.relay.timeout,
                helo_name=cfg.server.hostname,
                cafile=cfg.relay.cafile or None,
            )
        if hasattr(arg, "deliver") and not inspect.isroutine(arg):
            return arg  # type: ignore[return-value]
        return CallableDelivery(arg)

    def hook(
        self, stage: Stage | str, *, priority: int = 0
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a hook: ``@app.hook("rcpt")`` (see :mod:`smtpgate.hooks`)."""

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.hooks.register(stage, func, priority=priority)
            return func

        return register

    def protocol_config(self, listener: ListenerConfig | None = None) -> ProtocolConfig:
        """The sans-IO core settings for one listener (``None``: a ``[server] listen`` entry)."""
        s = self.config.server
        off = set(s.disable_extensions)
        mechanisms = tuple(self.config.auth.mechanisms) if self.authenticator else ()
        if "AUTH" in off:
            mechanisms = ()
        tls_mode = listener.tls if listener else "starttls"
        queue = self.delivery_mode == "queue"
        return ProtocolConfig(
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_line_length=s.max_line_length,
            max_command_line=s.max_command_line,
            max_errors=s.max_errors,
            max_unknown_commands=s.max_unknown_commands,
            normalize_bare_line_endings=s.bare_line_endings == "normalize",
            tls_available=(self.tls_context is not None and tls_mode == "starttls"
                           and "STARTTLS" not in off),
            tls_active=tls_mode == "implicit",
            auth_mechanisms=mechanisms,
            auth_require_tls=self.config.auth.require_tls,
            dsn=self.delivery_mode in ("queue", "proxy") and self.config.queue.dsn
            and "DSN" not in off,
            etrn=queue and "ETRN" not in off,
            eightbitmime="8BITMIME" not in off,
            pipelining="PIPELINING" not in off,
            enhanced_status_codes="ENHANCEDSTATUSCODES" not in off,
            chunking="CHUNKING" not in off,
            binarymime="BINARYMIME" not in off and "CHUNKING" not in off,
            deliverby="DELIVERBY" not in off,
            ehlo="EHLO" not in off,
            smtputf8=s.smtputf8 and "SMTPUTF8" not in off,
            lmtp=listener is not None and listener.protocol == "lmtp",
            require_auth=listener is not None and listener.require_auth,
            expn=s.expn,
            **({"help_text": s.help_text} if s.help_text else {}),
        )

    def _context(self, delivery: Delivery, listener: ListenerConfig | None = None) -> ServerContext:
        s = self.config.server
        a = self.config.auth
        from ipaddress import ip_network

        tarpit = None
        if s.tarpit_initial > 0:
            from .policy.tarpit import Tarpit

            tarpit = Tarpit(s.tarpit_initial, s.tarpit_exponent, s.tarpit_max).delay
        return ServerContext(
            protocol=self.protocol_config(listener),
            implicit_tls=listener is not None and listener.tls == "implicit",
            proxy_protocol=listener is not None and listener.proxy_protocol,
            trusted_proxies=tuple(ip_network(n, strict=False)
                                  for n in (listener.trusted_proxies if listener else ())),
            tarpit=tarpit,
            overloaded=self._overloaded if s.max_load_average > 0 else None,
            multiline_replies=s.multiline_replies,
            received_tls_peer=s.received_tls_peer,
            vrfy_enabled=s.vrfy,
            expn_enabled=s.expn,
            max_error_recipients=s.max_error_recipients,
            helo_rules=self.helo_rules,
            address_check=self._address_check if self.address_checks else None,
            load_average=self._current_load,
            hooks=self.hooks,
            relay=self.relay,
            delivery=delivery,
            authenticator=self.authenticator,
            auth_limiter=FailureLimiter(a.max_failures, a.failure_window),
            tls_context=self.tls_context,
            greeting=s.greeting,
            command_timeout=s.command_timeout,
            data_timeout=s.data_timeout,
            received_tls=s.received_tls,
            received_auth=s.received_auth,
            scanners=self.scanners if self.scanners else None,
        )

    # ---------------------------------------------------------------- asyncio

    async def start(self) -> None:
        """Bind the listeners and start accepting connections (returns once listening).

        Raises:
            OSError: an address cannot be bound.
        """
        ctx_extra = await self._prepare_delivery()
        s = self.config.server
        specs: list[tuple[str, int, ServerContext]] = []
        targets: list[tuple[ListenAddress, ListenerConfig | None]] = [(a, None) for a in s.listen]
        targets += [(lc.listen, lc) for lc in self.config.listeners]
        delivery = self.delivery
        assert delivery is not None
        for addr, listener in targets:
            if listener is not None and listener.tls == "implicit" and self.tls_context is None:
                raise ConfigError(f"listener {listener.address}: tls = \"implicit\" needs "
                                  "[tls] certificate")
            ctx = self._context(delivery, listener)
            for key, value in ctx_extra.items():
                setattr(ctx, key, value)
            specs.append((addr.host, addr.port, ctx))
        self.server = SmtpServer(
            specs,
            max_connections=s.max_connections,
            max_connections_per_ip=s.max_connections_per_ip,
            backlog=s.listen_backlog,
            rcvbuf=s.tcp_rcvbuf,
            sndbuf=s.tcp_sndbuf,
        )
        await self.server.start()

    async def _prepare_delivery(self) -> dict[str, Any]:
        """Set up :attr:`delivery` (starting the queue in queue mode); context extras."""
        if self.delivery_mode == "queue":
            queue_delivery = await self._start_queue()
            self.delivery = queue_delivery
            return {"mail_check": queue_delivery.storage_reply, "etrn": self._etrn}
        self.delivery = self._make_delivery()
        return {}

    async def run_stdio(
        self, *, inetd: bool = False, client_ip: str | None = None, protocol: str = "smtp"
    ) -> None:
        """Run one session on stdin/stdout (ZMailer -i BSMTP, -n inetd, -T policy test).

        Args:
            inetd: stdin is a connected socket.
            client_ip: behave as if the client had this address (policy test).
            protocol: ``"smtp"`` or ``"lmtp"``.
        """
        from .server.stdio import run_stdio_session

        extra = await self._prepare_delivery()
        listener = ListenerConfig(address="127.0.0.1:0", protocol=protocol, tls="none")
        delivery = self.delivery
        assert delivery is not None
        ctx = self._context(delivery, listener)
        for key, value in extra.items():
            setattr(ctx, key, value)
        if client_ip is None and not inetd:
            client_ip = "127.0.0.1"  # a batch on stdin comes from this host: local submission
        try:
            await run_stdio_session(ctx, inetd=inetd, client_ip=client_ip)
        finally:
            if self.delivery is not None:
                await self.delivery.aclose()
                self.delivery = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bound listener (port 0 resolved)."""
        return self.server.bound_addresses if self.server else []

    @property
    def port(self) -> int:
        """The port of the first listener (handy with ``listen = ["127.0.0.1:0"]``)."""
        return self.addresses[0][1]

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: stop accepting, finish transactions in flight, close delivery.

        Args:
            timeout: seconds for transactions in flight; default ``server.shutdown_timeout``.
        """
        if self.server is not None:
            try:
                await self.server.close(
                    self.config.server.shutdown_timeout if timeout is None else timeout
                )
            except OSError:
                pass
            self.server = None
        if self.delivery is not None:
            await self.delivery.aclose()
            self.delivery = None

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Start, then run until ``stop`` is set (or the task is cancelled), then stop."""
        await self.start()
        try:
            if stop is None:
                await asyncio.Event().wait()
            else:
                await stop.wait()
        finally:
            await self.stop()

    # ------------------------------------------------------------- threading

    def start_thread(self, timeout: float = 10.0) -> None:
        """Run the server in a background thread with its own event loop.

        Returns once the listeners are bound.

        Raises:
            OSError / ConfigError: whatever :meth:`start` raised in the thread.
            RuntimeError: already started, or the thread did not start within ``timeout``.
        """
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def runner() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=runner, name="smtpgate", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("smtpgate did not start in time")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop_thread(self, timeout: float | None = None) -> None:
        """Stop a server started with :meth:`start_thread` (graceful, see :meth:`stop`)."""
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self.stop(timeout), loop)
        fut.result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._thread_loop = None

    def run_sync(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on the server thread's loop (for relay/local changes from threads)."""
        if self._thread_loop is None:
            raise RuntimeError("not running in a thread")
        return asyncio.run_coroutine_threadsafe(coro, self._thread_loop).result()  # type: ignore[arg-type]

"""The embeddable server: configuration + hooks + policy + delivery, started and stopped.

Entry point: :class:`Smtpgate`. ``await app.start()`` / ``await app.stop()`` inside an
event loop, or ``app.start_thread()`` / ``app.stop_thread()`` from synchronous code
(like aiosmtpd's Controller or tcllib ``::smtpd::start``/``::smtpd::stop``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .admin import AdminServer
from .auth import Authenticator, CallableAuthenticator, FailureLimiter, UsersFileAuthenticator
from .config import Config, ListenAddress, ListenerConfig, LogConfig, config_from_mapping
from .delivery import CallableDelivery, Delivery, make_delivery
from .envelope import SessionInfo
from .errors import ConfigError
from .hooks import HookRunner, Stage, load_callable
from .milter.server import MilterServer
from .plugins import load_plugins
from .policy import RelayPolicy
from .protocol import ProtocolConfig
from .queue.delivery import QueueDelivery, QueueScheduler
from .queue.store import DELIVERY_LOCK, QueueStore, SpoolOwnership
from .reply import Reply
from .scanners.stage import ScannerSet
from .server import ServerContext, SmtpServer, server_tls_context
from .server.policy_server import PolicyServer
from .server.stdio import StdioOutcome

log = logging.getLogger("smtpgate")

DeliverFunc = Callable[..., Any]


class WorkerControl(Protocol):
    """What the admin API of a supervisor (``server.workers > 1``) asks of its worker
    processes (:class:`smtpgate.server.workers.WorkerPool`)."""

    async def sessions(self) -> list[dict[str, Any]]:
        """Every worker's live sessions (``GET /api/sessions`` items)."""
        ...

    async def kill(self, session_id: str) -> bool:
        """Kill a session wherever it runs; False when no worker had it."""
        ...

    def relay_change(self, op: str, value: str) -> None:
        """Apply a run-time relay change in every worker."""

    def reload(self, cfg: Config | None = None) -> None:
        """Make every worker reload the configuration file; ``cfg``: what the supervisor
        now runs (a worker started later starts with it)."""


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
        self.hooks = HookRunner(timeout=config.hooks.timeout,
                                decision_level=logging.getLevelName(config.log.decisions))
        provided = load_plugins(config, self.hooks)
        relay = provided.get("relay")
        self.relay: RelayPolicy | None = relay if isinstance(relay, RelayPolicy) else None
        scanners = provided.get("scanners")
        self.scanners: ScannerSet | None = scanners if isinstance(scanners, ScannerSet) else None
        self._delivery_arg = deliver
        self._authenticator_arg = authenticator
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
        self.server: SmtpServer | None = None
        self.admin: AdminServer | None = None
        # server.workers > 1: the supervisor's handle on its workers, for the admin API
        self.workers: WorkerControl | None = None
        self.chain_servers: list[MilterServer | PolicyServer] = []  # [[listener]] milter/policy
        self.queue: QueueScheduler | None = None
        self._ownership: SpoolOwnership | None = None
        self._delivery_lock: SpoolOwnership | None = None
        self._ctx_extra: dict[str, Any] = {}
        self._code_hooks: list[tuple[Stage | str, Callable[..., Any], int]] = []
        self._background: set[asyncio.Task[int]] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        #: When :meth:`start` was called (epoch seconds; 0.0 before), for ``/api/info``.
        self.started = 0.0
        #: How :meth:`reload_file` reads the configuration again; ``None``: the file
        #: :attr:`config` came from (``config.source``). The CLI sets it to re-apply its
        #: command-line overrides.
        self.config_loader: Callable[[], Config] | None = None
        #: Applies a changed ``[log]`` at a reload (``serve`` and its workers set it to
        #: :func:`smtpgate.logs.setup_logging` with their process tag; may raise
        #: OSError). ``None``: the program embedding smtpgate owns logging, and a
        #: reload leaves it alone (the queue delivery process still follows ``[log]``).
        self.log_setup: Callable[[LogConfig], None] | None = None
        self._reload_lock: asyncio.Lock | None = None

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
        """``"queue"``, ``"proxy"``, ``"capture"`` or ``"local"`` (see docs/queue.md,
        docs/operations.md)."""
        return "local" if self._delivery_arg is not None else self.config.delivery_mode

    async def _start_queue(
        self, *, owner: bool, notify: Callable[[str], None] | None = None
    ) -> QueueDelivery:
        """Open the spool. As its ``owner`` (a server), take the spool's ownership lock and
        start what recovers and delivers; otherwise (``inetd``, ``bsmtp``,
        ``policy-test``) only commit into it and leave delivery to the owner.

        Args:
            owner: take the spool's ownership and run its delivery.
            notify: (not ``owner``) tell the owner about each committed message ID this
                way instead of through its flush file (a ``server.workers`` worker).

        Raises:
            SpoolBusyError: ``owner`` and another running server owns the spool.
            QueueError: the spool cannot be created or locked.
        """
        from .queue.runner import RemoteQueue, SpoolDrop, build_manager

        cfg = self.config
        q = cfg.queue
        store = QueueStore(q.path, fsync=q.fsync)
        scheduler: QueueScheduler
        if not owner and notify is not None:
            from .server.workers import NotifyingDrop

            scheduler = NotifyingDrop(store, notify)
        elif not owner:
            scheduler = SpoolDrop(store)
        else:
            self._ownership = store.acquire_owner()
            from . import metrics  # smtpgate_queue_messages{state}, read at scrape time

            metrics.watch_spool(q.path)
            remote: RemoteQueue | None = None
            try:
                if q.delivery_process:
                    # Postfix-style split: this process only commits; a child recovers
                    # and delivers, supervised (restarted when it dies).
                    remote = RemoteQueue(cfg)
                    scheduler = remote
                    await remote.start()  # recovery happens before the listeners open
                else:
                    self._delivery_lock = await asyncio.to_thread(
                        SpoolOwnership.wait, store.path / DELIVERY_LOCK, 60.0)
                    manager = build_manager(cfg, self.hooks)
                    scheduler = manager
                    await manager.start()
            except BaseException:
                if remote is not None:
                    await remote.stop(timeout=1.0)
                self._release_spool()
                raise
        self.queue = scheduler
        return QueueDelivery(store, scheduler, q.min_free_space)

    def _release_spool(self) -> None:
        for lock in (self._delivery_lock, self._ownership):
            if lock is not None:
                lock.release()
        self._delivery_lock = self._ownership = None

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
        if arg is None and self.config.delivery_mode == "capture":
            from .delivery.capture import CaptureDelivery, CaptureStore

            cap = self.config.capture
            return CaptureDelivery(CaptureStore(cap.database, max_messages=cap.max_messages,
                                                max_bytes=cap.max_bytes))
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
            self._code_hooks.append((stage, func, priority))  # kept across reload()
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
        config = ProtocolConfig(
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            message_chunk_size=s.message_buffer_size,
            max_recipients=s.max_recipients,
            max_line_length=s.max_line_length,
            max_command_line=s.max_command_line,
            max_errors=s.max_errors,
            recipient_overshoot_limit=s.recipient_overshoot_limit,
            max_unknown_commands=s.max_unknown_commands,
            normalize_bare_line_endings=s.bare_line_endings == "normalize",
            tls_available=(self.tls_context is not None and tls_mode == "starttls"
                           and "STARTTLS" not in off),
            tls_active=tls_mode == "implicit",
            auth_mechanisms=mechanisms,
            auth_require_tls=self.config.auth.require_tls,
            dsn=self.delivery_mode == "queue" and self.config.queue.dsn
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
            unknown_events=True,  # the ``unknown`` stage: a plugin may answer it
            data_start_events=True,  # the ``data_start`` stage at the first BDAT too
            max_error_recipients=s.max_error_recipients,
        )
        if s.help_text:
            config = dataclasses.replace(config, help_text=s.help_text)
        return config

    def _context(self, delivery: Delivery, listener: ListenerConfig | None = None) -> ServerContext:
        s = self.config.server
        a = self.config.auth
        from ipaddress import ip_network

        return ServerContext(
            protocol=self.protocol_config(listener),
            implicit_tls=listener is not None and listener.tls == "implicit",
            proxy_protocol=listener is not None and listener.proxy_protocol,
            trusted_proxies=tuple(ip_network(n, strict=False)
                                  for n in (listener.trusted_proxies if listener else ())),
            multiline_replies=s.multiline_replies,
            received_tls_peer=s.received_tls_peer,
            vrfy_enabled=s.vrfy,
            expn_enabled=s.expn,
            hooks=self.hooks,
            delivered_in_session=self.delivery_mode != "queue",
            message_dir=str(Path(self.config.queue.path) / "tmp")
            if self.delivery_mode == "queue" else None,
            delivery=delivery,
            authenticator=self.authenticator,
            auth_limiter=FailureLimiter(a.max_failures, a.failure_window),
            tls_context=self.tls_context,
            greeting=s.greeting,
            command_timeout=s.command_timeout,
            data_timeout=s.data_timeout,
            min_data_rate=float(s.min_data_rate),
            limit_exceptions=tuple(ip_network(n, strict=False)
                                   for n in self.config.limit_exception_networks),
            received_tls=s.received_tls,
            received_auth=s.received_auth,
        )

    # ---------------------------------------------------------------- asyncio

    def _listener_specs(self) -> list[tuple[str, int, ServerContext]]:
        """``(host, port, context)`` for every ``[server] listen`` entry and ``[[listener]]``.

        Raises:
            ConfigError: an implicit-TLS listener without ``[tls] certificate``.
        """
        s = self.config.server
        targets: list[tuple[ListenAddress, ListenerConfig | None]] = [(a, None) for a in s.listen]
        targets += [(lc.listen, lc) for lc in self.config.listeners
                    if lc.protocol not in ("milter", "policy")]
        delivery = self.delivery
        assert delivery is not None
        specs: list[tuple[str, int, ServerContext]] = []
        for addr, listener in targets:
            if listener is not None and listener.tls == "implicit" and self.tls_context is None:
                raise ConfigError(f"listener {listener.address}: tls = \"implicit\" needs "
                                  "[tls] certificate")
            ctx = self._context(delivery, listener)
            for key, value in self._ctx_extra.items():
                setattr(ctx, key, value)
            specs.append((addr.host, addr.port, ctx))
        return specs

    async def start(
        self,
        *,
        before_listen: Callable[[], None] | None = None,
        role: str = "server",
        notify: Callable[[str], None] | None = None,
    ) -> None:
        """Bind the listeners and start accepting connections (returns once listening).

        Args:
            before_listen: called once the delivery side is ready, just before the
                listeners open (``serve`` writes its pid file there).
            role: ``"server"`` (one process does everything), or for
                ``server.workers > 1`` (see :mod:`smtpgate.server.workers`):
                ``"supervisor"`` (owns the spool and its delivery, opens no listener)
                or ``"worker"`` (listens with ``SO_REUSEPORT``; in queue mode commits
                into the supervisor's spool without owning it).
            notify: ``"worker"`` in queue mode: called with each committed message ID
                (the worker passes it on to the supervisor).

        In queue mode a ``"server"`` or ``"supervisor"`` becomes the spool's owner first
        (see :meth:`~smtpgate.queue.store.QueueStore.acquire_owner`). If anything fails,
        everything started so far is stopped again (delivery process, spool lock)
        before the error is raised.

        Raises:
            OSError: an address cannot be bound.
            SpoolBusyError: another running server owns the spool.
            QueueError / ConfigError / RuntimeError: the spool or the delivery process
                cannot be set up.
            ValueError: an unknown ``role``.
        """
        if role not in ("server", "supervisor", "worker"):
            raise ValueError(f"unknown role {role!r}")
        self.started = time.time()
        s = self.config.server
        self._ctx_extra = await self._prepare_delivery(owner=role != "worker", notify=notify)
        if role == "supervisor":
            if before_listen is not None:
                try:
                    before_listen()
                except BaseException:
                    await self.stop()
                    raise
            await self._start_admin()  # sessions through :attr:`workers` once they run
            return
        try:
            specs = self._listener_specs()
            self.server = SmtpServer(
                specs,
                max_connections=s.max_connections,
                max_connections_per_ip=s.max_connections_per_ip,
                backlog=s.listen_backlog,
                rcvbuf=s.tcp_rcvbuf,
                sndbuf=s.tcp_sndbuf,
                reuse_port=role == "worker",
            )
            if before_listen is not None:
                before_listen()
            await self.server.start()
        except BaseException:
            self.server = None
            await self.stop()
            raise
        if role == "server":
            await self._start_admin()
        try:
            for lc in self.config.listeners:
                if lc.protocol not in ("milter", "policy"):
                    continue
                cls = MilterServer if lc.protocol == "milter" else PolicyServer
                chain_server = cls(self, lc.listen.host, lc.listen.port,
                                   reuse_port=role == "worker",
                                   timeout=self.config.server.command_timeout)
                await chain_server.start()
                self.chain_servers.append(chain_server)
        except BaseException:
            await self.stop(0)
            raise

    async def _start_admin(self) -> None:
        """Start the admin listener when ``[admin] listen`` is set (in the process that
        owns the spool: ``server`` or ``supervisor``); on failure stop everything."""
        if not self.config.admin.listen:
            return
        try:
            admin = AdminServer(self, self.config.admin)
            await admin.start()
        except BaseException:
            await self.stop(0)
            raise
        self.admin = admin

    @property
    def chain_addresses(self) -> list[tuple[str, str, int]]:
        """``(protocol, host, port)`` of every milter and policy listener (port 0 resolved)."""
        return [("milter" if isinstance(c, MilterServer) else "policy", *c.address)
                for c in self.chain_servers]

    def reload(self, config: Config) -> list[str]:
        """Apply a new configuration to a running server (SIGHUP), gracefully.

        Rebuilt from ``config``: host name and greeting, protocol limits and timeouts,
        relay lists (run-time ``relay_add`` changes are replaced), HELO rules, hooks
        (those registered in code with :meth:`hook` are kept), address checks,
        scanners, TLS certificates, the AUTH users file, ``[log]`` (through
        :attr:`log_setup`, and in the queue delivery process). New sessions use them;
        sessions in flight finish with the settings they started with. Settings bound
        at start (listen addresses and listeners, the delivery mode, relay URL, queue,
        Maildir path, capture database, connection limits, uvloop) keep their running
        values; each one that differs is returned (and should be logged) as needing a
        restart.

        Args:
            config: the new configuration, already validated.

        Returns:
            The dotted names of changed settings that need a restart.

        Raises:
            ConfigError / OSError / ssl.SSLError: the new configuration cannot be
                applied (unloadable hook, unreadable certificate, a log file that cannot
                be opened); nothing was changed.
        """
        import dataclasses

        old = self.config
        restart: list[str] = []
        server_keys = ("listen", "max_connections", "max_connections_per_ip",
                       "listen_backlog", "tcp_rcvbuf", "tcp_sndbuf", "use_uvloop", "pid_file",
                       "workers")
        kept_server = {}
        for key in server_keys:
            if getattr(config.server, key) != getattr(old.server, key):
                restart.append(f"server.{key}")
                kept_server[key] = getattr(old.server, key)
        relay_keys = ("url", "timeout", "cafile")
        kept_relay = {}
        for key in relay_keys:
            if getattr(config.relay, key) != getattr(old.relay, key):
                restart.append(f"relay.{key}")
                kept_relay[key] = getattr(old.relay, key)
        merged = dataclasses.replace(
            config,
            server=dataclasses.replace(config.server, **kept_server),
            relay=dataclasses.replace(config.relay, **kept_relay),
        )
        for section in ("listeners", "queue", "delivery", "maildir", "capture"):
            if getattr(merged, section) != getattr(old, section):
                restart.append(section if section == "listeners" else f"[{section}]")
                merged = dataclasses.replace(merged, **{section: getattr(old, section)})
        fresh = Smtpgate(merged, authenticator=self._authenticator_arg)
        for stage, func, priority in self._code_hooks:
            fresh.hooks.register(stage, func, priority=priority)
        log_changed = merged.log != old.log
        if log_changed and self.log_setup is not None:
            self.log_setup(merged.log)  # opens the new files first: fails with nothing changed
        # Nothing below can fail: the new parts were all built above.
        self.config = merged
        self.hooks = fresh.hooks
        self.relay = fresh.relay
        self.authenticator = fresh.authenticator
        self.tls_context = fresh.tls_context
        self.scanners = fresh.scanners
        if self.server is not None:
            self.server.replace_contexts([ctx for _, _, ctx in self._listener_specs()])
        if log_changed:
            from .queue.runner import RemoteQueue

            if isinstance(self.queue, RemoteQueue):
                self.queue.set_log(merged.log)
        return restart

    @property
    def config_file(self) -> str | None:
        """The configuration file :meth:`reload_file` reads (``None``: the configuration
        was given as a mapping or the defaults, so there is nothing to re-read)."""
        source = self.config.source
        if not source or source.startswith("<"):
            return None
        return source

    async def reload_file(self, loader: Callable[[], Config] | None = None) -> list[str]:
        """Re-read, validate and apply the configuration file (SIGHUP and
        ``POST /api/reload`` both come here).

        The file is read again with ``loader``, else :attr:`config_loader`, else
        ``load_config`` of :attr:`config_file`; then checked like ``check-config``
        (:func:`smtpgate.preflight.preflight` without the listener checks: the
        listeners are bound), then applied
        with :meth:`reload`: new sessions use it, sessions in flight keep their
        settings. Reloads run one at a time. A failure is logged at ERROR on
        ``smtpgate`` and the running configuration stays in force.

        Args:
            loader: returns the new configuration (SIGHUP: the file with ``serve``'s
                command-line overrides); may raise :class:`ConfigError`.

        Returns:
            The settings that changed but need a restart (see :meth:`reload`; also
            ``[admin]``: the admin listener and its token are set up at start), each
            logged at WARNING.

        Raises:
            ConfigError: no configuration file to re-read, or the new configuration is
                invalid (every problem listed); TLS files or hooks that cannot be loaded.
            OSError / ssl.SSLError: a file named by the configuration cannot be read.
        """
        from .config import load_config
        from .preflight import preflight

        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            where = self.config_file or "<defaults>"
            log.info("reloading the configuration from %s", where)
            try:
                path = self.config_file
                loader = loader or self.config_loader
                if loader is not None:
                    cfg = await asyncio.to_thread(loader)
                elif path is not None:
                    cfg = await asyncio.to_thread(load_config, path)
                else:
                    raise ConfigError(f"no configuration file to reload (the running "
                                      f"configuration came from {self.config.source})")
                await asyncio.to_thread(preflight, cfg, listeners=False)
                old_admin = self.config.admin
                restart = self.reload(cfg)
            except Exception as exc:  # ConfigError, OSError, ssl.SSLError: keep what runs
                log.error("reload failed, keeping the running configuration: %s", exc)
                raise
            if cfg.admin != old_admin:
                restart.append("[admin]")
                self.config = dataclasses.replace(self.config, admin=old_admin)
            for key in restart:
                log.warning("reload: %s changed; it takes effect after a restart", key)
            log.info("configuration reloaded from %s", where)
            return restart

    async def _prepare_delivery(
        self, *, owner: bool, notify: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Set up :attr:`delivery` (opening the spool in queue mode); context extras.

        Args:
            owner: this process serves the spool (``start``); False for one-session
                run modes and workers that only commit into it.
            notify: see :meth:`_start_queue`.
        """
        if self.delivery_mode == "queue":
            queue_delivery = await self._start_queue(owner=owner, notify=notify)
            self.delivery = queue_delivery
            return {"etrn": self._etrn}
        self.delivery = self._make_delivery()
        return {}

    async def run_stdio(
        self, *, inetd: bool = False, client_ip: str | None = None, protocol: str = "smtp"
    ) -> StdioOutcome:
        """Run one session on stdin/stdout (ZMailer -i BSMTP, -n inetd, -T policy test).

        In queue mode this process commits into the spool without owning it: a running
        server (the owner) delivers what it commits (see docs/queue.md).

        Args:
            inetd: stdin is a connected socket.
            client_ip: behave as if the client had this address (policy test).
            protocol: ``"smtp"`` or ``"lmtp"``.

        Returns:
            How the session ended: refused commands, input cut off inside a transaction.

        Raises:
            OSError: ``inetd`` and stdin is not a socket.
        """
        from .server.stdio import run_stdio_session

        extra = await self._prepare_delivery(owner=False)
        listener = ListenerConfig(address="127.0.0.1:0", protocol=protocol, tls="none")
        delivery = self.delivery
        assert delivery is not None
        ctx = self._context(delivery, listener)
        for key, value in extra.items():
            setattr(ctx, key, value)
        if client_ip is None and not inetd:
            client_ip = "127.0.0.1"  # a batch on stdin comes from this host: local submission
        try:
            return await run_stdio_session(ctx, inetd=inetd, client_ip=client_ip)
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
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        for chain_server in self.chain_servers:
            await chain_server.close()
        self.chain_servers = []
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
        elif self.queue is not None:  # start() failed before the delivery was in place
            await self.queue.stop()
        self.queue = None
        self._release_spool()

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

        Returns once the listeners are bound. The loop is uvloop's when uvloop is
        installed and ``server.use_uvloop`` is true (as ``smtpgate serve``), else asyncio's.

        Raises:
            OSError / ConfigError: whatever :meth:`start` raised in the thread.
            RuntimeError: already started, or the thread did not start within ``timeout``.
        """
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def runner() -> None:
            # The loop production runs (cli: uvloop when installed and server.use_uvloop).
            loop: asyncio.AbstractEventLoop | None = None
            if self.config.server.use_uvloop:
                try:
                    import uvloop
                except ImportError:
                    pass
                else:
                    loop = uvloop.new_event_loop()
            if loop is None:
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

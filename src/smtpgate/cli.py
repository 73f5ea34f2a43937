"""Command-line interface: ``smtpgate serve|check-config|user|send|queue|scan|train|...``.

Entry point: :func:`main` (the ``smtpgate`` console script and ``python -m smtpgate``).
Exit codes (:data:`EXIT_CODES`, also in ``--help``): 0 success, 1 runtime failure
(delivery refused, bind failure, a refused or cut-off bsmtp batch, an admin API that
cannot be reached or refused the request), 2 usage or configuration error (also: no admin
listener configured, a token the admin API refused), 3 a scanner or DNS lookup failed
(``scan``/``train``/``scanner``, ``util check-domain --dns``). Every error is one line on
stderr (``smtpgate: WHERE: CAUSE``); the Python traceback only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import stat
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError, DeliveryError, QueueError, SmtpgateError
from .logs import reopen_logs

if TYPE_CHECKING:
    from collections.abc import Callable

    from .app import Smtpgate
    from .config import Config, LogConfig

log = logging.getLogger("smtpgate")


EXIT_CODES = """\
exit codes:
  0  success
  1  runtime failure: delivery refused, address in use, spool busy, a bsmtp batch with
     a refused command or cut off inside a transaction, a queue ID that names no
     message; sessions/reload: the server cannot be reached or answered an error
     (reload: it refused the new configuration and keeps the running one)
     (scan: 1 = spam or virus found; scan/train/scanner: 3 = scanner error;
     explain: 1 = the message would be refused or deferred;
     util check-email/check-domain: 1 = invalid, 3 = the DNS lookup failed)
  2  configuration or usage error: a bad configuration file or key, a file or directory
     named on the command line that cannot be read or written, a missing spool,
     inetd without a socket on stdin, input util decode cannot decode;
     sessions/reload: no admin listener configured, or the admin API refused the token

Errors are one line on stderr, "smtpgate: WHERE: CAUSE" (the file or key, then why);
--log-level debug adds the Python traceback.
"""


class UsageError(SmtpgateError):
    """An argument given on the command line cannot be used (exit code 2)."""


def _setup_logging(level: str, log_cfg: LogConfig | None = None, *,
                   server: bool = False) -> None:
    """Set up this process's logging (:func:`smtpgate.logs.setup_logging`: ``[log]``
    format, file and send log when ``log_cfg`` is given, else text on standard error at
    ``level``). ``server`` (``serve``): this process rolls the log files, and the metrics
    directory its worker and delivery processes share is chosen now, before any of them
    starts (:func:`smtpgate.metrics.setup`).

    Raises:
        OSError: the log file, the send log or the metrics directory cannot be set up.
    """
    from .logs import setup_logging

    setup_logging(log_cfg, level=level, roller=True)
    if server:
        from . import metrics

        metrics.setup()


def _in_file(exc: ConfigError, source: str | None) -> ConfigError:
    """``exc`` with every problem prefixed by the configuration file's name."""
    if not source or source.startswith("<"):
        return exc
    return ConfigError([p if p.startswith(source) else f"{source}: {p}" for p in exc.problems])


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Load ``-c FILE`` (or the defaults) and apply ``--listen``/``--log-level``/``--admin``.

    Raises:
        ConfigError: every problem, each prefixed with the file name.
    """
    from .config import load_config

    path = getattr(args, "config", None)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise _in_file(exc, path) from None
    listen = getattr(args, "listen", None)
    level = getattr(args, "log_level", None)
    admin = getattr(args, "admin", None)  # serve --admin HOST:PORT
    if listen or level or admin is not None:
        try:
            cfg = cfg.with_overrides(listen=listen or None, log_level=level, admin=admin)
        except ConfigError as exc:
            raise _in_file(exc, path) from None
    return cfg


def _checked_app(cfg: Config, *, listeners: bool = True) -> Smtpgate:
    """The one validation path of ``check-config`` and ``serve`` (and the stdio modes).

    Runs :func:`smtpgate.preflight.preflight` and builds the application (hooks, TLS,
    scanners); whatever one of them refuses is refused by all commands alike.

    Raises:
        ConfigError: every problem, each prefixed with the file name and naming the key.
    """
    from .app import Smtpgate
    from .preflight import preflight

    try:
        preflight(cfg, listeners=listeners)
        return Smtpgate(cfg)
    except ConfigError as exc:
        raise _in_file(exc, cfg.source) from None


def _delivery_target(cfg: Config) -> str:
    """Where mail goes, for the start-up line (``mx:`` is not a relay URL)."""
    url = cfg.relay.url
    if url == "mx:":
        return "MX hosts (mx:)"
    if url:
        from .delivery.url import parse_relay_url

        return f"relay {parse_relay_url(url).redacted()}"
    return f"Maildir {Path(cfg.maildir.path).resolve()}"


def _reload_logging(log_cfg: LogConfig) -> None:
    """``serve``'s process at a reload that changed ``[log]`` (its level already has
    ``--log-level`` applied by the loader).

    Raises:
        OSError: a new log file cannot be opened (the old set-up stays).
    """
    from .logs import setup_logging

    setup_logging(log_cfg, roller=True, start=False)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (graceful shutdown); SIGHUP reloads.

    The configuration goes through the same checks as ``check-config`` first
    (:func:`_checked_app`): a configuration refused there is refused here before anything
    starts, with exit code 2.
    """
    cfg = _load(args)
    _setup_logging(cfg.log.level, cfg.log, server=True)
    app = _checked_app(cfg)
    app.config_loader = lambda: _load(args)  # POST /api/reload applies the flags too
    app.log_setup = _reload_logging
    if cfg.server.use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            log.info("using uvloop")
        except ImportError:
            pass

    if cfg.server.workers > 1:
        return asyncio.run(_serve_workers(app, cfg, args))

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def hangup() -> None:  # SIGHUP: reload, like Postfix and most daemons
            reopen_logs()  # and reopen (or roll, [log] roll_on_signal) the log files
            task = loop.create_task(_reload(app, args))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            loop.add_signal_handler(signal.SIGHUP, hangup)
            loop.add_signal_handler(signal.SIGUSR1, reopen_logs)  # logrotate: reopen only
        except (NotImplementedError, RuntimeError):
            pass
        pid_file = cfg.server.pid_file

        def write_pid() -> None:
            # After the spool is ours, before the listeners open: whoever can connect
            # finds it, and a second server refused on a busy spool never touches it.
            if pid_file:
                Path(pid_file).write_text(f"{os.getpid()}\n")

        try:
            await app.start(before_listen=write_pid)
        except OSError as exc:
            # asyncio's text names the address and the cause ("address already in use")
            print(f"smtpgate: cannot listen: {exc}", file=sys.stderr, flush=True)
            if pid_file:
                Path(pid_file).unlink(missing_ok=True)
            return 1
        except (QueueError, RuntimeError) as exc:
            print(f"smtpgate: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        where = ", ".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in app.addresses
        )
        target = _delivery_target(cfg)
        print(f"smtpgate {__version__} listening on {where}; delivering to {target}",
              file=sys.stderr, flush=True)
        _announce_ready(app, f"listening on {where}")
        try:
            await stop.wait()
        finally:
            _notify_stopping()
            log.info("shutting down")
            for task in list(reloads):
                task.cancel()
            await app.stop()
            if pid_file:
                Path(pid_file).unlink(missing_ok=True)
        return 0

    return asyncio.run(run())


async def _serve_workers(app: Smtpgate, cfg: Config, args: argparse.Namespace) -> int:
    """``serve`` with ``server.workers > 1``: this process supervises (see
    :mod:`smtpgate.server.workers`). In queue mode it owns the spool and its delivery;
    N worker processes accept the connections. SIGTERM/SIGINT stop them all gracefully,
    SIGHUP reloads the configuration file here and in each worker.

    Returns:
        The exit code: 0 after a shutdown, 1 when the workers cannot start.
    """
    from .queue.manager import QueueManager
    from .queue.runner import RemoteQueue
    from .server.workers import WorkerPool, WorkerStartError, probe_listeners

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    pid_file = cfg.server.pid_file

    def write_pid() -> None:
        if pid_file:
            Path(pid_file).write_text(f"{os.getpid()}\n")

    def unlink_pid() -> None:
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)

    pools: list[WorkerPool] = []
    reloads: set[asyncio.Task[None]] = set()

    def hangup() -> None:  # before the workers run there is nothing to reload
        reopen_logs()  # the workers and the delivery process follow within a second
        if not pools:
            return
        task = loop.create_task(reload_all())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    async def reload_all() -> None:
        # This process's own configuration first, as POST /api/reload does (the admin
        # listener's view, [log] here and in the delivery process); a worker replaced
        # later starts with what this process then runs.
        await _reload(app, args)
        for pool in pools:
            pool.reload(app.config)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    try:
        await app.start(role="supervisor", before_listen=write_pid)
    except (QueueError, RuntimeError) as exc:
        print(f"smtpgate: cannot start: {exc}", file=sys.stderr, flush=True)
        unlink_pid()
        return 1
    queue = app.queue
    nudge = queue.submit_id if isinstance(queue, QueueManager | RemoteQueue) else None

    pool = WorkerPool(cfg, args, nudge)
    try:
        await probe_listeners(cfg)
        await pool.start()
    except (OSError, WorkerStartError) as exc:
        if isinstance(exc, OSError) or exc.kind == "listen":
            print(f"smtpgate: cannot listen: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"smtpgate: cannot start a worker: {exc}", file=sys.stderr, flush=True)
        await app.stop()
        unlink_pid()
        return 1
    pools.append(pool)
    app.workers = pool  # the admin API asks the workers about their sessions
    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                      for h, p in _listen_targets(cfg))
    print(f"smtpgate {__version__} listening on {where} with {cfg.server.workers} workers "
          f"(pids {', '.join(map(str, pool.pids))}); delivering to {_delivery_target(cfg)}",
          file=sys.stderr, flush=True)
    _announce_ready(app, f"listening on {where} with {cfg.server.workers} workers")
    try:
        await stop.wait()
    finally:
        _notify_stopping()
        log.info("shutting down")
        await pool.stop()
        await app.stop()
        unlink_pid()
    return 0


def _announce_ready(app: Smtpgate, status: str) -> None:
    """The server is up: print the admin page's URL when the admin listener runs, and
    tell systemd ``READY=1`` (``Type=notify``; :mod:`smtpgate.sdnotify`)."""
    from .sdnotify import notify

    admin = app.admin
    if admin is not None:
        host, port = admin.address
        shown = f"[{host}]" if ":" in host else host
        print(f"smtpgate: admin page, API and /metrics on http://{shown}:{port}/",
              file=sys.stderr, flush=True)
    notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def _notify_stopping() -> None:
    """Tell systemd a graceful shutdown began (``STOPPING=1``)."""
    from .sdnotify import notify

    notify("STOPPING=1", "STATUS=shutting down")


def _listen_targets(cfg: Config) -> list[tuple[str, int]]:
    from .server.workers import listen_targets

    return listen_targets(cfg)


async def _reload(app: Smtpgate, args: argparse.Namespace) -> None:
    """SIGHUP: re-read and validate the configuration file, then apply it gracefully.

    The same path as ``POST /api/reload`` (:meth:`smtpgate.app.Smtpgate.reload_file`),
    with this command line's ``--listen``/``--log-level`` applied again. An invalid new
    configuration is logged and the running one kept; settings that need a restart are
    logged as such (see :meth:`smtpgate.app.Smtpgate.reload`).
    """
    log.info("SIGHUP: reloading the configuration from %s", args.config or "<defaults>")
    try:
        await app.reload_file(lambda: _load(args))
    except Exception:  # ConfigError, OSError, ssl.SSLError: logged there; keep what runs
        return


def _stdin_is_socket() -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(0).st_mode)
    except OSError:
        return False


def cmd_stdio(args: argparse.Namespace) -> int:
    """``bsmtp`` (ZMailer -i), ``inetd`` (-n) and ``policy-test`` (-T with -d).

    ``bsmtp`` exits 1, saying why on stderr, when a command of the batch was refused
    (a 4xx/5xx reply) or the batch ended inside a transaction (e.g. cut off in DATA: that
    message was not delivered).

    Raises:
        UsageError: ``inetd`` with a standard input that is not a socket.
    """
    if args.command == "inetd" and not _stdin_is_socket():
        raise UsageError("inetd: standard input is not a socket (inetd mode is started by "
                         "inetd or systemd with Accept=yes; use 'smtpgate bsmtp' for a batch)")
    cfg = _load(args)
    level = "DEBUG" if args.command == "policy-test" else cfg.log.level
    if args.command == "bsmtp" and level == "INFO":
        level = "WARNING"  # keep stdout for replies and stderr quiet in batch mode
    _setup_logging(level)
    app = _checked_app(cfg, listeners=False)
    client_ip = getattr(args, "client_ip", None)
    if args.command == "policy-test":
        print(f"policy test: session as if from [{client_ip}]; policy decisions on stderr",
              file=sys.stderr, flush=True)
    outcome = asyncio.run(app.run_stdio(inetd=args.command == "inetd", client_ip=client_ip,
                              protocol=getattr(args, "protocol", "smtp")))
    if args.command == "bsmtp" and outcome.problem:
        print(f"smtpgate: bsmtp: {outcome.problem}", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print the plugin chain per stage: name, plugin, priority, timeout, on_error.

    Built-ins the configuration implies (relay, HELO rules, scanners, ...) are listed
    with the ``[[plugin]]`` tables' plugins, in the order they run.
    """
    import json

    from .hooks import HookRunner, Stage
    from .plugins import load_plugins

    cfg = _load(args)
    runner = HookRunner(timeout=cfg.hooks.timeout)
    try:
        load_plugins(cfg, runner)
    except ConfigError as exc:
        raise _in_file(exc, cfg.source) from None
    chains = {stage.value: [{
        "hook": h.name, "plugin": h.plugin or "-", "priority": h.priority,
        "timeout": runner.timeout if h.timeout is None else h.timeout,
        "on_error": h.on_error,
    } for h in runner.hooks(stage)] for stage in Stage}
    if args.json:
        json.dump({k: v for k, v in chains.items() if v}, sys.stdout, indent=2)
        print()
        return 0
    for stage, hooks in chains.items():
        if not hooks:
            continue
        print(f"{stage}:")
        for h in hooks:
            print(f"  {h['priority']:>4}  {h['plugin']:<16} {h['hook']:<40} "
                  f"timeout={h['timeout']:g}s on_error={h['on_error']}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Check a configuration file exactly as ``serve`` does at start, without starting.

    The same path as ``serve`` (:func:`_checked_app`): the file, then
    :func:`smtpgate.preflight.preflight` (hooks import, TLS files load, directories can be
    written, ...), then the application is built. Prints ``FILE: OK`` or raises.
    """
    cfg = _load(args)
    _checked_app(cfg)
    print(f"{cfg.source}: OK")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Run the whole chain on a stored message as a dry run and print every decision
    (docs/explain.md): exit 0 when the message would be accepted, 1 when it would be
    refused or deferred.

    Raises:
        UsageError: the message file cannot be read, ``--client-ip`` is not an address.
        ConfigError: the configuration is refused (as by ``check-config``).
    """
    import ipaddress
    import json

    from .explain import explain

    cfg = _load(args)
    _checked_app(cfg, listeners=False)
    try:
        ipaddress.ip_address(args.client_ip)
    except ValueError:
        raise UsageError(f"--client-ip: not an IP address: {args.client_ip!r}") from None
    try:
        message = (sys.stdin.buffer.read() if args.message == "-"
                   else Path(args.message).read_bytes())
    except OSError as exc:
        raise UsageError(f"{args.message}: {exc.strerror or exc}") from None
    result = asyncio.run(explain(cfg, message, client_ip=args.client_ip,
                                 mail_from=args.mail_from, recipients=args.rcpt,
                                 helo=args.helo))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        sys.stdout.write(result.text())
    return 0 if result.outcome.startswith("accepted") else 1


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add or replace a user in a users file; the password is read from stdin.

    Raises:
        UsageError: the users file cannot be written (e.g. its directory is missing),
            or the name is invalid.
    """
    from .auth.users import add_user

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.name}: ")
        if password != getpass.getpass("Again: "):
            raise UsageError("user add: passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("user add: empty password refused")
    try:
        add_user(args.users_file, args.name, password)
    except OSError as exc:
        raise UsageError(f"{args.users_file}: cannot write the users file: "
                         f"{exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UsageError(f"user add {args.name!r}: {exc}") from exc
    print(f"user {args.name} written to {args.users_file}", file=sys.stderr)
    return 0


def cmd_user_delete(args: argparse.Namespace) -> int:
    """Remove a user from a users file (exit 1: no such user).

    Raises:
        UsageError: the users file cannot be read or written.
    """
    from .auth.users import delete_user

    try:
        deleted = delete_user(args.users_file, args.name)
    except OSError as exc:
        raise UsageError(f"{args.users_file}: cannot rewrite the users file: "
                         f"{exc.strerror or exc}") from exc
    if deleted:
        return 0
    print(f"smtpgate: {args.users_file}: no such user: {args.name}", file=sys.stderr)
    return 1


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a DKIM signing key to KEY_DIR/DOMAIN/SELECTOR.key and print the TXT record
    to publish (RFC 6376 §3.6.1; Ed25519: RFC 8463).

    Raises:
        ConfigError: a bad domain, selector, algorithm or size, or the key exists.
        OSError: the key file cannot be written.
    """
    from .dkimkeys import generate_key

    path, record = generate_key(args.key_dir, args.domain, args.selector,
                                algorithm=args.algorithm, bits=args.bits,
                                overwrite=args.force)
    print(record)
    print(f"smtpgate: DKIM key written to {path}", file=sys.stderr)
    return 0


def _read_input(path: str | None, what: str) -> bytes:
    """The bytes of ``path`` (``None`` or ``-``: stdin).

    Raises:
        UsageError: the file cannot be read.
    """
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    assert path is not None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc


def cmd_send(args: argparse.Namespace) -> int:
    """Send a message file (or stdin) through an upstream (nssmtpd ``ns_smtpd send``).

    Exit 1 when the upstream refuses it (its reply on stderr), 2 for an unreadable
    file or a bad relay URL.
    """
    from .delivery.send import send_message

    data = _read_input(args.file, "message file")
    relay_url = args.relay
    if relay_url is None and args.server is None and args.config:
        relay_url = _load(args).relay.url or None
    try:
        reply = asyncio.run(
            send_message(
                args.sender, args.rcpt, data, relay_url=relay_url, host=args.server,
                port=args.port,
            )
        )
    except DeliveryError as exc:
        print(str(exc.reply), file=sys.stderr)
        return 1
    print(str(reply))
    return 0


def _scanner_set(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .scanners.stage import ScannerSet

    cfg = _load(args)
    scanners = ScannerSet.from_config(cfg.scanners, cfg.server.hostname)
    if not scanners:
        raise ConfigError(f"{cfg.source}: no [[scanner]] configured")
    return scanners


def _read_message(path: str) -> bytes:
    data = _read_input(path, "message file")
    # Scanners see what smtpgate would deliver: CRLF line endings.
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan a message file (nssmtpd ``checkspam`` / ``checkvirus``).

    Exit codes: 0 clean, 1 spam or virus found, 2 configuration error, 3 scanner error.
    """
    from .errors import ScannerError

    scanners = _scanner_set(args)
    message = _read_message(args.file)
    try:
        if args.kind == "spam":
            results = asyncio.run(scanners.check_spam(message, args.user))
        else:
            results = asyncio.run(scanners.check_virus(message))
    except ScannerError as exc:
        print(f"smtpgate: scanner error: {_one_line(str(exc))}", file=sys.stderr)
        return 3
    if not results:
        print(f"smtpgate: no {args.kind} scanner configured", file=sys.stderr)
        return 2
    found = False
    for r in results:
        found = found or r.verdict in ("spam", "infected")
        score = "" if r.score is None else f" score={r.score:.2f}"
        thr = "" if r.threshold is None else f" required={r.threshold:.2f}"
        action = f" action={r.action}" if r.action else ""
        symbols = f" symbols={','.join(r.symbols)}" if r.symbols else ""
        print(f"{r.scanner}: {r.verdict}{score}{thr}{action}{symbols}")
    return 1 if found else 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the spam scanners (nssmtpd ``trainspam 1|0 email message``)."""
    from .errors import ScannerError

    scanners = _scanner_set(args)
    message = _read_message(args.file)
    spam = {"spam": True, "ham": False, "forget": None}[args.kind]
    try:
        answers = asyncio.run(scanners.train_spam(spam, message, args.user))
    except ScannerError as exc:
        print(f"smtpgate: scanner error: {_one_line(str(exc))}", file=sys.stderr)
        return 3
    if not answers:
        print("smtpgate: no trainable spam scanner configured", file=sys.stderr)
        return 2
    for line in answers:
        print(line)
    return 0


def cmd_scanner_versions(args: argparse.Namespace) -> int:
    """Print the scanner daemons' versions (nssmtpd ``spamversion`` / ``virusversion``)."""
    from .errors import ScannerError

    scanners = _scanner_set(args)

    async def versions() -> list[str]:
        return [*await scanners.spam_version(), *await scanners.virus_version()]

    try:
        for line in asyncio.run(versions()):
            print(line)
    except ScannerError as exc:
        print(f"smtpgate: scanner error: {_one_line(str(exc))}", file=sys.stderr)
        return 3
    return 0


# -- administrators' commands: config show, sessions, reload (issue 12) -----------------


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective configuration of ``-c FILE`` as TOML, defaults included
    (``postconf``); ``-n`` only the keys that differ from the defaults (``postconf -n``).

    The output is a configuration file ``check-config`` accepts (see
    :mod:`smtpgate.config_show`).

    Raises:
        ConfigError: the file is invalid (exit 2).
    """
    from .config_show import render_config

    sys.stdout.write(render_config(_load(args), only_changed=args.non_default))
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str) -> tuple[int, object]:
    """One admin API request for ``sessions``/``reload``: ``(0, reply JSON)``, or the exit
    code after printing ``smtpgate: WHERE: CAUSE`` (1: unreachable or an error reply,
    2: the token was refused).

    Raises:
        ConfigError: no admin listener configured, unreadable token file (exit 2).
    """
    from .admin_client import AdminCallError, admin_target, call

    target = admin_target(_load(args), getattr(args, "admin_url", None))
    try:
        return 0, call(target, method, path)
    except AdminCallError as exc:
        print(f"smtpgate: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code, None


def _age_text(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_sessions(args: argparse.Namespace) -> int:
    """List the live SMTP sessions of a running server (``GET /api/sessions``; nssmtpd
    ``ns_smtpd sessions``): id, client, HELO, TLS, AUTH user, state, bytes in/out, age.

    Exit codes: 0 listed, 1 the server cannot be reached or answered an error, 2 no admin
    listener configured or the token was refused.
    """
    import json

    status, reply = _admin_call(args, "GET", "/api/sessions")
    if status:
        return status
    sessions = reply if isinstance(reply, list) else []
    if args.json:
        json.dump(sessions, sys.stdout, indent=2)
        print()
        return 0
    rows = [[str(s.get("id")), f"{s.get('client')}:{s.get('client_port')}",
             str(s.get("helo") or "-"), str(s.get("tls") or "-"),
             str(s.get("auth_user") or "-"), str(s.get("state")),
             str(s.get("bytes_in", 0)), str(s.get("bytes_out", 0)), _age_text(s.get("age"))]
            for s in sessions if isinstance(s, dict)]
    header = ["-Session ID-", "-Client-", "-HELO-", "-TLS-", "-AUTH-", "-State-", "-In-",
              "-Out-", "-Age-"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" ".join(cell.rjust(w) if i >= 6 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    print(f"-- {len(sessions)} session{'s' if len(sessions) != 1 else ''}.")
    return 0


def cmd_reload_remote(args: argparse.Namespace) -> int:
    """Ask a running server to reload its configuration file (``POST /api/reload``; the
    same as SIGHUP). Prints ``reloaded`` and each setting that needs a restart.

    Exit codes: 0 reloaded, 1 the server refused the new configuration (it keeps the
    running one; its error is printed) or cannot be reached, 2 no admin listener
    configured or the token was refused.
    """
    status, reply = _admin_call(args, "POST", "/api/reload")
    if status:
        return status
    restart = reply.get("restart_needed", []) if isinstance(reply, dict) else []
    print("reloaded")
    for key in restart if isinstance(restart, list) else []:
        print(f"restart needed: {key} changed; it takes effect after a restart")
    return 0


def _add_admin_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    command: Callable[[argparse._SubParsersAction[argparse.ArgumentParser], str, str],
                      argparse.ArgumentParser],
) -> None:
    """Add ``config show``, ``sessions`` and ``reload`` (``command`` builds a sub-command
    with the common options and the exit-code epilog)."""
    cf = sub.add_parser("config", help="show the effective configuration")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    cs = command(cfsub, "show", "print the effective configuration as TOML, defaults "
                                "included; changed keys end with '# default: X' (postconf)")
    cs.add_argument("-c", "--config", help="TOML configuration file (default: embedded "
                                           "defaults)")
    cs.add_argument("-n", dest="non_default", action="store_true",
                    help="only the keys set to a non-default value (postconf -n)")
    cs.set_defaults(func=cmd_config_show)

    for name, doc, func in (
        ("sessions", "list the live SMTP sessions of a running server (admin API)",
         cmd_sessions),
        ("reload", "make a running server reload its configuration file (admin API; "
                   "like SIGHUP)", cmd_reload_remote),
    ):
        p = command(sub, name, doc)
        p.add_argument("-c", "--config", help="the server's configuration file (for "
                                              "[admin] listen and token_file)")
        p.add_argument("--admin-url", metavar="URL",
                       help="the admin listener, http://HOST:PORT (instead of admin.listen)")
        if name == "sessions":
            p.add_argument("--json", action="store_true", help="the API's JSON list")
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests).

    Every command takes ``--log-level``; the exit codes are in the epilog of ``--help``.
    """
    p = argparse.ArgumentParser(prog="smtpgate", description="ESMTP server and proxy",
                                epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"smtpgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper,
                        help="log level (replaces logging.level); DEBUG also prints the "
                             "traceback of an error")
    parents = [common]

    def command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                doc: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=doc, description=doc, parents=parents,
                                     epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    s = command(sub, "serve", "run the server")
    s.add_argument("-c", "--config", help="TOML configuration file (default: embedded defaults)")
    s.add_argument("--listen", action="append", metavar="ADDR",
                   help="listen address host:port, [v6]:port (repeatable; replaces server.listen)")
    s.add_argument("--admin", metavar="HOST:PORT",
                   help="open the admin listener (web page, API, /metrics) on HOST:PORT "
                        "(replaces admin.listen; loopback unless admin.token_file is set)")
    s.set_defaults(func=cmd_serve)

    for name, doc in (
        ("bsmtp", "process a batch of SMTP commands from stdin (a file, a pipe or a terminal), "
                  "replies to stdout (ZMailer -i); exit 1 if a command was refused or the "
                  "batch ended inside a transaction"),
        ("inetd", "one session on stdin/stdout as a socket, for inetd/systemd (ZMailer -n)"),
        ("policy-test", "interactive session as if from --client-ip, showing each policy "
                        "decision (ZMailer -T with -d)"),
    ):
        r = command(sub, name, doc)
        r.add_argument("-c", "--config", help="TOML configuration file")
        r.add_argument("--protocol", choices=["smtp", "lmtp"], default="smtp")
        if name == "policy-test":
            r.add_argument("--client-ip", required=True, help="the client address to assume")
        r.set_defaults(func=cmd_stdio)

    c = command(sub, "check-config", "check a configuration file as serve does at start")
    c.add_argument("-c", "--config", required=True)
    c.set_defaults(func=cmd_check_config)

    ex = command(sub, "explain", "run the whole chain on a stored message as a dry run "
                                 "(nothing delivered, nothing counted) and print every "
                                 "plugin's decision (docs/explain.md)")
    ex.add_argument("-c", "--config", required=True, help="TOML configuration file")
    ex.add_argument("message", help="the message file (RFC 5322), - for stdin")
    ex.add_argument("--client-ip", required=True, help="the client address the chain sees")
    ex.add_argument("--helo", default="client.example", help="the EHLO name")
    ex.add_argument("--from", dest="mail_from", required=True, metavar="ADDR",
                    help="the reverse-path (\"\" for <>)")
    ex.add_argument("--to", dest="rcpt", action="append", required=True, metavar="ADDR",
                    help="a forward-path (repeatable)")
    ex.add_argument("--json", action="store_true", help="print the decisions as JSON")
    ex.set_defaults(func=cmd_explain)

    pl = command(sub, "plugins", "show the plugin chain of every stage, in run order")
    pl.add_argument("-c", "--config", help="TOML configuration file (default: embedded "
                                           "defaults)")
    pl.add_argument("--json", action="store_true", help="as JSON: {stage: [hook, ...]}")
    pl.set_defaults(func=cmd_plugins)

    u = sub.add_parser("user", help="manage the AUTH users file")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = command(usub, "add", "add or replace a user (password on stdin)")
    ua.add_argument("--users-file", required=True)
    ua.add_argument("name")
    ua.set_defaults(func=cmd_user_add)
    ud = command(usub, "delete", "remove a user")
    ud.add_argument("--users-file", required=True)
    ud.add_argument("name")
    ud.set_defaults(func=cmd_user_delete)

    m = command(sub, "send", "send a message through an upstream (ns_smtpd send)")
    m.add_argument("sender")
    m.add_argument("rcpt", nargs="+")
    m.add_argument("--file", "-f", help="message file (default: stdin)")
    m.add_argument("--relay", help="relay URL (smtp://, smtps://, plain://...)")
    m.add_argument("--server", help="upstream host (plain SMTP, opportunistic STARTTLS)")
    m.add_argument("--port", type=int, default=None)
    m.add_argument("-c", "--config", help="take the relay URL from this configuration")
    m.set_defaults(func=cmd_send)

    sc = command(sub, "scan", "scan a message with the configured scanners")
    sc.add_argument("kind", choices=["spam", "virus"])
    sc.add_argument("file", help="message file, - for stdin")
    sc.add_argument("-c", "--config", required=True)
    sc.add_argument("--user", help="per-user preferences (spamd User)")
    sc.set_defaults(func=cmd_scan)

    tr = command(sub, "train", "train the spam scanners")
    tr.add_argument("kind", choices=["spam", "ham", "forget"])
    tr.add_argument("file", help="message file, - for stdin")
    tr.add_argument("-c", "--config", required=True)
    tr.add_argument("--user", help="per-user database (spamd User)")
    tr.set_defaults(func=cmd_train)

    dk = sub.add_parser("dkim", help="DKIM signing keys")
    dksub = dk.add_subparsers(dest="dkim_command", required=True)
    dkg = command(dksub, "keygen", "create a signing key and print the DNS TXT record")
    dkg.add_argument("domain")
    dkg.add_argument("selector")
    dkg.add_argument("--key-dir", required=True,
                     help="the dkim plugin's key_dir (the key goes to KEY_DIR/DOMAIN/SELECTOR.key)")
    dkg.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    dkg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    dkg.add_argument("--force", action="store_true", help="replace an existing key")
    dkg.set_defaults(func=cmd_dkim_keygen)

    sv = sub.add_parser("scanner", help="scanner information")
    svsub = sv.add_subparsers(dest="scanner_command", required=True)
    svv = command(svsub, "versions", "print the scanner daemons' versions")
    svv.add_argument("-c", "--config", required=True)
    svv.set_defaults(func=cmd_scanner_versions)

    from .queue.cli import add_queue_commands

    add_queue_commands(sub, parents=parents, epilog=EXIT_CODES)
    _add_admin_commands(sub, command)

    from .util_commands import add_util_commands

    add_util_commands(sub, parents=parents, epilog=EXIT_CODES)

    v = command(sub, "version", "print the version")
    v.set_defaults(func=lambda a: print(f"smtpgate {__version__}") or 0)
    return p


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _report(exc: BaseException, debug: bool) -> None:
    """Print ``exc`` as one line per problem on stderr (with the traceback when ``debug``)."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, ConfigError):
        lines = [_one_line(p) for p in exc.problems] or ["invalid configuration"]
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        lines = [f"{where}{exc.strerror}" if exc.strerror else _one_line(str(exc)) or "OSError"]
    elif isinstance(exc, SmtpgateError):
        lines = [_one_line(str(exc)) or type(exc).__name__]
    else:
        hint = "" if debug else " (--log-level debug shows the traceback)"
        lines = [f"internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}"]
    for line in lines:
        print(f"smtpgate: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see :data:`EXIT_CODES`).

    Never lets an exception escape as a traceback: configuration and usage errors
    (:class:`~smtpgate.errors.ConfigError`, :class:`UsageError`) exit 2, any other failure
    (:class:`~smtpgate.errors.SmtpgateError`, :class:`OSError`, anything else) exits 1,
    each as one line on stderr; ``--log-level debug`` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    debug = getattr(args, "log_level", None) == "DEBUG"
    if args.func not in (cmd_serve, cmd_stdio):
        _setup_logging(getattr(args, "log_level", None) or "WARNING")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)
    except (ConfigError, UsageError) as exc:
        _report(exc, debug)
        return 2
    except Exception as exc:  # SmtpgateError, OSError, bugs: one line, never a traceback
        _report(exc, debug)
        return 1


if __name__ == "__main__":
    sys.exit(main())

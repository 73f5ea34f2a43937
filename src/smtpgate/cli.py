"""Command-line interface: ``smtpgate serve|check-config|user|send|queue|scan|train|...``.

Entry point: :func:`main` (the ``smtpgate`` console script and ``python -m smtpgate``).
Exit codes: 0 success, 1 runtime failure (delivery refused, bind failure),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DeliveryError

log = logging.getLogger("smtpgate")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .config import load_config

    cfg = load_config(args.config)
    listen = getattr(args, "listen", None)
    level = getattr(args, "log_level", None)
    if listen or level:
        cfg = cfg.with_overrides(listen=listen or None, log_level=level)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (graceful shutdown)."""
    from .app import Smtpgate

    cfg = _load(args)
    _setup_logging(cfg.logging.level)
    app = Smtpgate(cfg)
    if cfg.server.use_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            log.info("using uvloop")
        except ImportError:
            pass

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        pid_file = cfg.server.pid_file
        if pid_file:  # written before the listeners open: whoever can connect finds it
            Path(pid_file).write_text(f"{os.getpid()}\n")
        try:
            await app.start()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            if pid_file:
                Path(pid_file).unlink(missing_ok=True)
            return 1
        where = ", ".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in app.addresses
        )
        if cfg.relay.url:
            from .delivery.url import parse_relay_url

            target = f"relay {parse_relay_url(cfg.relay.url).redacted()}"
        else:
            target = f"Maildir {Path(cfg.maildir.path).resolve()}"
        print(f"smtpgate {__version__} listening on {where}; delivering to {target}",
              file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await app.stop()
            if pid_file:
                Path(pid_file).unlink(missing_ok=True)
        return 0

    return asyncio.run(run())


def cmd_stdio(args: argparse.Namespace) -> int:
    """``bsmtp`` (ZMailer -i), ``inetd`` (-n) and ``policy-test`` (-T with -d)."""
    from .app import Smtpgate

    cfg = _load(args)
    level = "DEBUG" if args.command == "policy-test" else cfg.logging.level
    if args.command == "bsmtp" and level == "INFO":
        level = "WARNING"  # keep stdout for replies and stderr quiet in batch mode
    _setup_logging(level)
    app = Smtpgate(cfg)
    client_ip = getattr(args, "client_ip", None)
    if args.command == "policy-test":
        print(f"policy test: session as if from [{client_ip}]; policy decisions on stderr",
              file=sys.stderr, flush=True)
    asyncio.run(app.run_stdio(inetd=args.command == "inetd", client_ip=client_ip,
                              protocol=getattr(args, "protocol", "smtp")))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a configuration file without starting (also loads hooks and TLS files)."""
    from .app import Smtpgate

    cfg = _load(args)
    Smtpgate(cfg)
    print(f"{cfg.source}: OK")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    """Add or replace a user in a users file; the password is read from stdin."""
    from .auth.users import add_user

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.name}: ")
        if password != getpass.getpass("Again: "):
            print("passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 2
    add_user(args.users_file, args.name, password)
    print(f"user {args.name} written to {args.users_file}", file=sys.stderr)
    return 0


def cmd_user_delete(args: argparse.Namespace) -> int:
    """Remove a user from a users file."""
    from .auth.users import delete_user

    if delete_user(args.users_file, args.name):
        return 0
    print(f"no such user: {args.name}", file=sys.stderr)
    return 1


def cmd_send(args: argparse.Namespace) -> int:
    """Send a message file (or stdin) through an upstream (nssmtpd ``ns_smtpd send``)."""
    from .delivery.send import send_message

    data = sys.stdin.buffer.read() if args.file in (None, "-") else Path(args.file).read_bytes()
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
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
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
        print(f"scanner error: {exc}", file=sys.stderr)
        return 3
    if not results:
        print(f"no {args.kind} scanner configured", file=sys.stderr)
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
        print(f"scanner error: {exc}", file=sys.stderr)
        return 3
    if not answers:
        print("no trainable spam scanner configured", file=sys.stderr)
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
        print(f"scanner error: {exc}", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(prog="smtpgate", description="ESMTP server and proxy")
    p.add_argument("-V", "--version", action="version", version=f"smtpgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("-c", "--config", help="TOML configuration file (default: embedded defaults)")
    s.add_argument("--listen", action="append", metavar="ADDR",
                   help="listen address host:port, [v6]:port (repeatable; replaces server.listen)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   type=str.upper)
    s.set_defaults(func=cmd_serve)

    for name, doc in (
        ("bsmtp", "process a batch of SMTP commands from stdin, replies to stdout (ZMailer -i)"),
        ("inetd", "one session on stdin/stdout as a socket, for inetd/systemd (ZMailer -n)"),
        ("policy-test", "interactive session as if from --client-ip, showing each policy "
                        "decision (ZMailer -T with -d)"),
    ):
        r = sub.add_parser(name, help=doc)
        r.add_argument("-c", "--config", help="TOML configuration file")
        r.add_argument("--protocol", choices=["smtp", "lmtp"], default="smtp")
        if name == "policy-test":
            r.add_argument("--client-ip", required=True, help="the client address to assume")
        r.set_defaults(func=cmd_stdio)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("-c", "--config", required=True)
    c.set_defaults(func=cmd_check_config)

    u = sub.add_parser("user", help="manage the AUTH users file")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add or replace a user (password on stdin)")
    ua.add_argument("--users-file", required=True)
    ua.add_argument("name")
    ua.set_defaults(func=cmd_user_add)
    ud = usub.add_parser("delete", help="remove a user")
    ud.add_argument("--users-file", required=True)
    ud.add_argument("name")
    ud.set_defaults(func=cmd_user_delete)

    m = sub.add_parser("send", help="send a message through an upstream (ns_smtpd send)")
    m.add_argument("sender")
    m.add_argument("rcpt", nargs="+")
    m.add_argument("--file", "-f", help="message file (default: stdin)")
    m.add_argument("--relay", help="relay URL (smtp://, smtps://, plain://...)")
    m.add_argument("--server", help="upstream host (plain SMTP, opportunistic STARTTLS)")
    m.add_argument("--port", type=int, default=None)
    m.add_argument("-c", "--config", help="take the relay URL from this configuration")
    m.set_defaults(func=cmd_send)

    sc = sub.add_parser("scan", help="scan a message with the configured scanners")
    sc.add_argument("kind", choices=["spam", "virus"])
    sc.add_argument("file", help="message file, - for stdin")
    sc.add_argument("-c", "--config", required=True)
    sc.add_argument("--user", help="per-user preferences (spamd User)")
    sc.set_defaults(func=cmd_scan)

    tr = sub.add_parser("train", help="train the spam scanners")
    tr.add_argument("kind", choices=["spam", "ham", "forget"])
    tr.add_argument("file", help="message file, - for stdin")
    tr.add_argument("-c", "--config", required=True)
    tr.add_argument("--user", help="per-user database (spamd User)")
    tr.set_defaults(func=cmd_train)

    sv = sub.add_parser("scanner", help="scanner information")
    svsub = sv.add_subparsers(dest="scanner_command", required=True)
    svv = svsub.add_parser("versions", help="print the scanner daemons' versions")
    svv.add_argument("-c", "--config", required=True)
    svv.set_defaults(func=cmd_scanner_versions)

    from .queue.cli import add_queue_commands

    add_queue_commands(sub)

    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=lambda a: print(f"smtpgate {__version__}") or 0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())

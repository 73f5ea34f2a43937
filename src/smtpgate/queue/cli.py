"""``smtpgate queue ...``: inspect and manage a spool, on a stopped or a running server.

Entry point: :func:`add_queue_commands` (wired into :mod:`smtpgate.cli`). The spool is
``--spool DIR`` (relative to the current directory) or ``queue.path`` of ``-c FILE``
(relative to FILE's directory, see docs/configuration.md). It must exist: the tools never
create a spool, and a missing one is an error (exit 2), not an empty queue. ``list`` and
``show`` only read (an unreadable envelope is reported and left where it is). Changes
(``hold``, ``release``, ``bounce``, ``delete``, ``flush``) are made under the spool lock
(see :meth:`QueueStore.locked`); a running server notices them at its next spool scan,
which those commands request at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from email.parser import BytesHeaderParser

from ..errors import QueueError
from .manager import request_flush
from .store import QueueEntry, QueueStore, entry_dict


def _store(args: argparse.Namespace) -> QueueStore:
    """Open the existing spool named by ``--spool`` or by ``queue.path`` of ``-c``.

    Raises:
        ConfigError: the configuration file is invalid.
        UsageError: the directory is not an existing spool (nothing is created).
    """
    from ..cli import UsageError, _load

    if args.spool:
        path, origin = os.path.abspath(args.spool), "--spool"
    else:
        cfg = _load(args)
        path = cfg.queue.path
        origin = f"{cfg.source}: queue.path" if args.config else "queue.path (no -c: default)"
    try:
        return QueueStore(path, create=False)
    except QueueError as exc:
        raise UsageError(f"{origin}: {exc}") from None


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_list(args: argparse.Namespace) -> int:
    """List queued messages: id, state, age, size, sender, recipients, attempts, last reply.

    Read-only: an unreadable envelope is logged and skipped, never moved.
    """
    store = _store(args)
    entries = sorted(store.entries(repair=False), key=lambda e: e.created)
    if args.json:
        json.dump([entry_dict(e) for e in entries], sys.stdout, indent=2)
        print()
        return 0
    now = time.time()
    for e in entries:
        rcpts = ",".join(r.address for r in e.pending) or "-"
        print(f"{e.id} {e.state:<8} {_age(now - e.created):>6} {e.size:>9} <{e.mail_from}> "
              f"{rcpts} attempts={e.attempts} {e.last_reply[:80]}")
    print(f"-- {len(entries)} message(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one message's envelope and headers (read-only)."""
    store = _store(args)
    try:
        e = store.find(args.id)
        message = store.read_message(e.id)
    except KeyError:
        print(f"smtpgate: {store.path}: no such message: {args.id}", file=sys.stderr)
        return 1
    except QueueError as exc:
        print(f"smtpgate: {store.path}: message {args.id}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(entry_dict(e), indent=2, ensure_ascii=False))
    headers = BytesHeaderParser().parsebytes(message)
    print()
    for name, value in headers.items():
        print(f"{name}: {value}")
    return 0


def _change(args: argparse.Namespace, what: str) -> int:
    store = _store(args)

    def change(e: QueueEntry) -> str | None:
        if what == "hold":
            return "hold"
        if what == "release":
            e.next_attempt = time.time()
            return "deferred" if e.state == "hold" else None
        if what == "flush":
            e.next_attempt = 0.0
            return None
        if what == "bounce":
            e.bounce = True
            e.next_attempt = 0.0
            return "deferred" if e.state == "hold" else None
        return None

    ids = [args.id] if getattr(args, "id", None) else [
        e.id for e in store.entries(("deferred", "incoming"), repair=False)]
    status = 0
    for qid in ids:
        if what == "delete":
            with store.locked():
                try:
                    store.remove(store.find(qid))
                except KeyError:
                    print(f"smtpgate: {store.path}: no such message: {qid}", file=sys.stderr)
                    status = 1
                    continue
        else:
            try:
                store.update(qid, change)
            except KeyError:
                print(f"smtpgate: {store.path}: no such message: {qid}", file=sys.stderr)
                status = 1
                continue
        print(f"{qid}: {what}")
    if what in ("flush", "release", "bounce", "delete", "hold"):
        request_flush(store.path)
    return status


def add_queue_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
    epilog: str | None = None,
) -> None:
    """Add ``queue list|show|flush|delete|hold|release|bounce`` to the CLI.

    Args:
        sub: the ``smtpgate`` sub-command parsers.
        parents: parsers whose options every queue command takes (``--log-level``).
        epilog: text after each command's help (the exit codes).
    """
    q = sub.add_parser("queue", help="inspect and manage the mail queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)

    def command(name: str, doc: str) -> argparse.ArgumentParser:
        p = qsub.add_parser(name, help=doc, description=doc, parents=list(parents),
                            epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        g = p.add_mutually_exclusive_group()
        g.add_argument("-c", "--config",
                       help="configuration file (for queue.path, relative to its directory)")
        g.add_argument("--spool", help="spool directory (instead of -c); must exist")
        return p

    p = command("list", "list queued messages (read-only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = command("show", "show a message's envelope and headers (read-only)")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    for name, doc, optional in (
        ("flush", "deliver now (all deferred messages without ID)", True),
        ("delete", "delete a message (no bounce)", False),
        ("hold", "put a message on hold (not delivered until released)", False),
        ("release", "release a held message", False),
        ("bounce", "return a message to its sender now", False),
    ):
        p = command(name, doc)
        p.add_argument("id", nargs="?" if optional else None)
        p.set_defaults(func=lambda a, w=name: _change(a, w))

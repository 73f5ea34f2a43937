"""``smtpgate queue ...``: inspect and manage a spool, on a stopped or a running server.

Entry point: :func:`add_queue_commands` (wired into :mod:`smtpgate.cli`). Changes are
made under the spool lock (see :meth:`QueueStore.locked`); a running server notices
them at its next spool scan, which ``flush`` requests at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from email.parser import BytesHeaderParser

from .manager import request_flush
from .store import QueueEntry, QueueStore, entry_dict


def _store(args: argparse.Namespace) -> QueueStore:
    if args.spool:
        return QueueStore(args.spool)
    from ..config import load_config

    return QueueStore(load_config(args.config).queue.path)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_list(args: argparse.Namespace) -> int:
    """List queued messages: id, state, age, size, sender, recipients, attempts, last reply."""
    store = _store(args)
    entries = sorted(store.entries(), key=lambda e: e.created)
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
    """Show one message's envelope and headers."""
    store = _store(args)
    try:
        e = store.find(args.id)
    except KeyError:
        print(f"no such message: {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(entry_dict(e), indent=2, ensure_ascii=False))
    headers = BytesHeaderParser().parsebytes(store.read_message(e.id))
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

    ids = [args.id] if getattr(args, "id", None) else [e.id for e in store.entries(("deferred",
                                                                                    "incoming"))]
    status = 0
    for qid in ids:
        if what == "delete":
            with store.locked():
                try:
                    store.remove(store.find(qid))
                except KeyError:
                    print(f"no such message: {qid}", file=sys.stderr)
                    status = 1
                    continue
        else:
            try:
                store.update(qid, change)
            except KeyError:
                print(f"no such message: {qid}", file=sys.stderr)
                status = 1
                continue
        print(f"{qid}: {what}")
    if what in ("flush", "release", "bounce", "delete", "hold"):
        request_flush(store.path)
    return status


def add_queue_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue list|show|flush|delete|hold|release|bounce`` to the CLI."""
    q = sub.add_parser("queue", help="inspect and manage the mail queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("-c", "--config", help="configuration file (for queue.path)")
        g.add_argument("--spool", help="spool directory (instead of -c)")

    p = qsub.add_parser("list", help="list queued messages")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = qsub.add_parser("show", help="show a message's envelope and headers")
    common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    for name, doc, optional in (
        ("flush", "deliver now (all deferred messages without ID)", True),
        ("delete", "delete a message (no bounce)", False),
        ("hold", "put a message on hold (not delivered until released)", False),
        ("release", "release a held message", False),
        ("bounce", "return a message to its sender now", False),
    ):
        p = qsub.add_parser(name, help=doc)
        common(p)
        p.add_argument("id", nargs="?" if optional else None)
        p.set_defaults(func=lambda a, w=name: _change(a, w))

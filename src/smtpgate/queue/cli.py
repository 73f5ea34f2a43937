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
from .actions import envelope_change
from .manager import request_flush
from .store import QueueStore, entry_dict


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


#: ``queue list``'s header line, as Postfix's ``mailq`` prints it.
LIST_HEADER = "-Queue ID- --Size-- ----Arrival Time---- -Sender/Recipient-------"
#: State marks after the queue id, as ``mailq``: ``*`` active (incoming: due for
#: delivery now), ``!`` on hold; deferred messages have none.
_MARKS = {"incoming": "*", "hold": "!", "deferred": ""}


def _kbytes(total: int) -> int:
    """Bytes as ``mailq``'s Kbytes (rounded up)."""
    return (total + 1023) // 1024


def cmd_list(args: argparse.Namespace) -> int:
    """List queued messages like Postfix's ``mailq``.

    A header line, then per message: queue id with its state mark (``*`` active, ``!``
    on hold), size in bytes, arrival time, sender (``MAILER-DAEMON`` for the null
    sender); the last delivery reply in parentheses with the number of attempts; one line
    per pending recipient; a blank line. Last, ``-- N Kbytes in M Requests.`` (or
    ``Mail queue is empty``). ``--json`` prints the envelopes as a JSON list instead.

    Read-only: an unreadable envelope is logged and skipped, never moved.
    """
    store = _store(args)
    entries = sorted(store.entries(repair=False), key=lambda e: e.created)
    if args.json:
        json.dump([entry_dict(e) for e in entries], sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print("Mail queue is empty")
        return 0
    width = max(10, *(len(e.id) + 1 for e in entries))
    print(LIST_HEADER if width == 10 else LIST_HEADER.replace("-Queue ID-",
                                                             "-Queue ID-".ljust(width), 1))
    indent = " " * (width + 31)
    for e in entries:
        arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(e.created))
        qid = e.id + _MARKS.get(e.state, "")
        print(f"{qid:<{width}} {e.size:>8} {arrival:>20} {e.mail_from or 'MAILER-DAEMON'}")
        if e.last_reply:
            tries = f"{e.attempts} attempt{'s' if e.attempts != 1 else ''}"
            print(f"{indent}    ({_one_line(e.last_reply)}; {tries})")
        for r in e.pending:
            print(f"{indent}{r.address}")
        print()
    total = sum(e.size for e in entries)
    count = len(entries)
    print(f"-- {_kbytes(total)} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def _ids(args: argparse.Namespace, store: QueueStore, what: str) -> list[str]:
    """The queue ids a change command names, like Postfix's ``postsuper``.

    ``ALL`` is every message the change applies to (``delete``: all; ``hold``/``flush``/
    ``bounce``: those not on hold; ``release``: those on hold); ``-`` reads ids from
    standard input, one per line (the first word of a line; blank lines skipped, a
    ``*``/``!`` state mark after the id removed). ``flush`` without an id is ``ALL``.
    """
    given = list(getattr(args, "ids", None) or [])
    if not given and what == "flush":
        given = ["ALL"]
    ids: list[str] = []
    for item in given:
        if item == "ALL":
            states = {"delete": ("incoming", "deferred", "hold"),
                      "release": ("hold",)}.get(what, ("deferred", "incoming"))
            ids += [e.id for e in sorted(store.entries(states, repair=False),
                                         key=lambda e: e.created)]
        elif item == "-":
            for line in sys.stdin:
                words = line.split()
                if words and not words[0].startswith("-"):
                    ids.append(words[0].rstrip("*!"))
        else:
            ids.append(item)
    return list(dict.fromkeys(ids))  # each once, in order


def _change(args: argparse.Namespace, what: str) -> int:
    """``hold``, ``release``, ``flush``, ``bounce`` or ``delete`` each named message
    (:func:`_ids`) under the spool lock; prints ``ID: WHAT`` per message changed and, for
    several, ``WHAT: N messages``. Exit 1 when an id names no message (the others are
    still changed)."""
    store = _store(args)

    ids = _ids(args, store, what)
    status = 0
    done = 0
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
                store.update(qid, envelope_change(what))
            except KeyError:
                print(f"smtpgate: {store.path}: no such message: {qid}", file=sys.stderr)
                status = 1
                continue
        done += 1
        print(f"{qid}: {what}")
    if len(ids) != 1:
        print(f"{what}: {done} message{'s' if done != 1 else ''}")
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

    p = command("list", "list queued messages like mailq (read-only)")
    p.add_argument("--json", action="store_true", help="the envelopes as a JSON list")
    p.set_defaults(func=cmd_list)
    p = command("show", "show a message's envelope and headers (read-only)")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)
    ids_help = "queue ids; ALL: every message it applies to; -: ids from stdin, one a line"
    for name, doc, optional in (
        ("flush", "deliver now (all deferred messages without ID)", True),
        ("delete", "delete messages (no bounce), like postsuper -d", False),
        ("hold", "put messages on hold (not delivered until released), like postsuper -h",
         False),
        ("release", "release held messages, like postsuper -H", False),
        ("bounce", "return messages to their senders now", False),
    ):
        p = command(name, doc)
        p.add_argument("ids", metavar="ID", nargs="*" if optional else "+", help=ids_help)
        p.set_defaults(func=lambda a, w=name: _change(a, w))

"""Capture mode (``[delivery] mode = "capture"``, like Mailpit): accepted messages are kept
in an embedded SQLite database for developers testing their applications, and shown on the
admin page and API (docs/operations.md "Capture mode").

Entry points: :class:`CaptureStore` (the database: add, list/search, get, delete, size cap),
:class:`CaptureDelivery` (the :class:`~smtpgate.delivery.Delivery` that stores each accepted
transaction and wakes the API's long-poll waiters), :class:`QuarantineFolder` (read-only view
of a scanner's quarantine Maildir in the same shapes), :class:`MessageFilter` and
:class:`StoredMessage`.

Durability (RFC 5321 §6.1): a message is acknowledged only once its row is committed; the
database runs in WAL mode with ``synchronous = FULL``, so the commit is on disk (the WAL
is fsynced) before ``deliver`` returns its 250. All SQLite work runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any, cast

from ..envelope import Envelope, SessionInfo
from ..errors import TemporaryDeliveryError
from ..message import Message, MessageFile
from ..reply import Reply

__all__ = [
    "CaptureDelivery",
    "CaptureStore",
    "MessageFilter",
    "QuarantineFolder",
    "StoredMessage",
    "parse_message",
]

log = logging.getLogger("smtpgate.delivery.capture")

#: The reply for any failure to store the message (disk full, locked database, ...).
STORE_FAILED = Reply(451, "4.3.0", "Could not store the message, try again later")
#: Bytes of decoded text (headers and text parts) kept per message for free-text search.
SEARCH_TEXT_LIMIT = 256 * 1024
#: Messages larger than this are searchable by their header fields only (bytes).
SEARCH_BODY_LIMIT = 4 * 1024 * 1024
#: Seconds between database checks while a long-poll waits, in case another process
#: (``smtpgate inetd``/``bsmtp``) stores into the same database without notifying us.
WAIT_POLL = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    subject TEXT NOT NULL,
    size INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    session TEXT NOT NULL,
    client TEXT NOT NULL,
    s_to TEXT NOT NULL,
    s_from TEXT NOT NULL,
    s_subject TEXT NOT NULL,
    s_text TEXT NOT NULL,
    raw BLOB NOT NULL
);
"""

_SUMMARY_COLUMNS = "id, received, sender, recipients, subject, size"


def _parser() -> BytesParser:
    return BytesParser(policy=email.policy.default)


def _header_str(msg: EmailMessage, name: str) -> str:
    """A header field's decoded value (RFC 2047 words decoded), ``""`` when absent or
    unparseable."""
    try:
        value = msg.get(name)
    except (ValueError, TypeError, IndexError, AttributeError):
        return ""
    return "" if value is None else str(value)


def _addresses(msg: EmailMessage, *names: str) -> list[str]:
    """The addr-specs in the named address header fields (RFC 5322 §3.4)."""
    out: list[str] = []
    for name in names:
        for value in msg.get_all(name, []) or []:
            try:
                groups = getattr(value, "addresses", None)
                if groups is not None:
                    out.extend(cast(Address, a).addr_spec for a in groups if a.addr_spec)
                    continue
            except (ValueError, TypeError, IndexError, AttributeError):
                pass
            out.extend(a for _, a in getaddresses([str(value)]) if a)
    return out


def parse_message(raw: bytes) -> EmailMessage:
    """Parse a message with the standard :mod:`email` package (``policy=default``,
    RFC 5322 and MIME, RFC 2045-2049). Never raises for malformed input: defects are
    recorded on the parts."""
    return cast(EmailMessage, _parser().parsebytes(raw))


def text_parts(msg: EmailMessage) -> tuple[str | None, str | None]:
    """The message's first ``text/plain`` and first ``text/html`` body parts, decoded
    (charset from the MIME header, undecodable bytes replaced), ``None`` when absent.
    Attachments (``Content-Disposition: attachment``) are skipped."""
    text: str | None = None
    html: str | None = None
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError, AssertionError, KeyError):
            payload = part.get_payload(decode=True)
            content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if not isinstance(content, str):
            continue
        if ctype == "text/plain" and text is None:
            text = content
        elif ctype == "text/html" and html is None:
            html = content
    return text, html


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One captured or quarantined message, as listed by the API.

    Attributes:
        id: ``"17"`` (captured: the database row) or ``"q0-<Maildir file name>"``
            (quarantined: index of the quarantine folder, file name).
        received: seconds since the epoch (quarantine: the file's modification time).
        sender: the envelope reverse-path (``""`` for ``<>``); quarantine: the
            ``Return-Path`` or ``From`` address (a Maildir file keeps no envelope).
        recipients: envelope recipients; quarantine: the ``To``/``Cc`` addresses.
        subject: the decoded ``Subject`` (``""`` when absent).
        size: the message's length in bytes.
        source: ``"capture"`` or ``"quarantine"``.
    """

    id: str
    received: float
    sender: str
    recipients: list[str]
    subject: str
    size: int
    source: str = "capture"

    def summary(self) -> dict[str, Any]:
        """The JSON object of ``GET /api/messages`` (docs/operations.md)."""
        return {"id": self.id, "received": self.received, "sender": self.sender,
                "recipients": list(self.recipients), "subject": self.subject,
                "size": self.size, "source": self.source}


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Search terms of ``GET /api/messages`` and ``/wait``: each one, when not empty,
    must occur (case-insensitively) in its field; all given terms must match.

    Attributes:
        to: an envelope recipient or a ``To``/``Cc`` address.
        sender: the envelope sender or the ``From`` address (the API's ``from``).
        subject: the decoded ``Subject``.
        text: free text: header fields and the text parts.
    """

    to: str = ""
    sender: str = ""
    subject: str = ""
    text: str = ""

    def terms(self) -> list[tuple[str, str]]:
        """``(search column, casefolded term)`` for each term given."""
        pairs = (("s_to", self.to), ("s_from", self.sender), ("s_subject", self.subject),
                 ("s_text", self.text))
        return [(col, term.casefold()) for col, term in pairs if term]

    def matches(self, fields: dict[str, str]) -> bool:
        """True when every term occurs in ``fields`` (search column → casefolded text)."""
        return all(term in fields.get(col, "") for col, term in self.terms())


def search_fields(msg: EmailMessage, sender: str, recipients: Iterable[str],
                  *, with_body: bool) -> dict[str, str]:
    """The casefolded search columns of one message (see :class:`MessageFilter`)."""
    subject = _header_str(msg, "Subject")
    to = " ".join([*recipients, *_addresses(msg, "To", "Cc"), _header_str(msg, "To")])
    frm = " ".join([sender, *_addresses(msg, "From"), _header_str(msg, "From")])
    pieces = [f"{name}: {_header_str(msg, name)}" for name in dict.fromkeys(msg.keys())]
    if with_body:
        text, html = text_parts(msg)
        pieces += [text or "", html or ""]
    blob = "\n".join(pieces)[:SEARCH_TEXT_LIMIT]
    return {"s_to": to.casefold(), "s_from": frm.casefold(), "s_subject": subject.casefold(),
            "s_text": blob.casefold()}


class CaptureStore:
    """The capture database: one SQLite file, one row per captured message.

    Every method blocks (call it from a worker thread, e.g. ``asyncio.to_thread``); one
    connection is shared under a lock. The database is created on first use (its parent
    directory too), in WAL mode with ``synchronous = FULL``.

    Args:
        path: the SQLite file.
        max_messages: messages kept; after each insert the oldest beyond this are
            removed (0 = no limit).
        max_bytes: bytes of message text kept; the oldest are removed until the total
            fits (0 = no limit). The message just stored is never removed, even when it
            alone is larger.

    Raises:
        sqlite3.Error / OSError: (from every method) the database cannot be opened or used.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_messages: int = 10000,
                 max_bytes: int = 0) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"CaptureStore({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def close(self) -> None:
        """Close the database connection (reopened on next use)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def add(self, envelope: Envelope, raw: bytes, *, session: SessionInfo | None = None,
            received: float | None = None) -> StoredMessage:
        """Store one message (committed, on disk), then apply the size cap.

        Args:
            envelope: the transaction's envelope (sender and recipients are kept).
            raw: the complete message, stored byte-exact.
            session: the SMTP session (its id and client address are kept).
            received: arrival time, seconds since the epoch (default: now).

        Returns:
            The stored message's summary.
        """
        msg = parse_message(raw)
        recipients = envelope.recipients
        fields = search_fields(msg, envelope.mail_from, recipients,
                               with_body=len(raw) <= SEARCH_BODY_LIMIT)
        subject = _header_str(msg, "Subject")
        when = time.time() if received is None else received
        row = (when, envelope.mail_from, json.dumps(recipients), subject, len(raw),
               _header_str(msg, "Message-ID"), session.session_id if session else "",
               session.peer_ip if session else "", fields["s_to"], fields["s_from"],
               fields["s_subject"], fields["s_text"], raw)
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO messages (received, sender, recipients, subject, size,"
                    " message_id, session, client, s_to, s_from, s_subject, s_text, raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                new_id = int(cast(int, cur.lastrowid))
                self._apply_cap(db, new_id)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return StoredMessage(str(new_id), when, envelope.mail_from, recipients, subject,
                             len(raw))

    def _apply_cap(self, db: sqlite3.Connection, keep: int) -> None:
        if self.max_messages:
            db.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                       " ORDER BY id DESC LIMIT -1 OFFSET ?)", (self.max_messages,))
        if self.max_bytes:
            db.execute(
                "DELETE FROM messages WHERE id != ? AND id IN (SELECT id FROM"
                " (SELECT id, SUM(size) OVER (ORDER BY id DESC) AS total FROM messages)"
                " WHERE total > ?)", (keep, self.max_bytes))

    @staticmethod
    def _where(flt: MessageFilter) -> tuple[str, list[Any]]:
        clauses = [f"instr({col}, ?) > 0" for col, _ in flt.terms()]
        params: list[Any] = [term for _, term in flt.terms()]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    @staticmethod
    def _row(row: tuple[Any, ...]) -> StoredMessage:
        return StoredMessage(str(row[0]), float(row[1]), str(row[2]),
                             list(json.loads(row[3])), str(row[4]), int(row[5]))

    def search(self, flt: MessageFilter = MessageFilter(), *, limit: int = 50,
               offset: int = 0) -> tuple[list[StoredMessage], int]:
        """Matching messages, newest first.

        Args:
            flt: search terms.
            limit: at most this many (≥ 0).
            offset: skip this many of the newest matches first.

        Returns:
            ``(messages, total)``: the page asked for and the number of all matches.
        """
        where, params = self._where(flt)
        with self._lock:
            db = self._conn()
            total = int(db.execute(f"SELECT COUNT(*) FROM messages{where}", params)
                        .fetchone()[0])
            rows = db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM messages{where}"
                              " ORDER BY id DESC LIMIT ? OFFSET ?",
                              [*params, limit, offset]).fetchall()
        return [self._row(r) for r in rows], total

    def first_after(self, flt: MessageFilter, after_id: int,
                    since: float | None = None) -> StoredMessage | None:
        """The oldest matching message with a row id above ``after_id`` or (when
        ``since`` is given) received at or after ``since`` (epoch seconds); ``None``."""
        where, params = self._where(flt)
        cond = "(id > ?" + (" OR received >= ?)" if since is not None else ")")
        params = [*params, after_id] + ([since] if since is not None else [])
        where = f"{where} AND {cond}" if where else f" WHERE {cond}"
        with self._lock:
            row = self._conn().execute(f"SELECT {_SUMMARY_COLUMNS} FROM messages{where}"
                                       " ORDER BY id LIMIT 1", params).fetchone()
        return None if row is None else self._row(row)

    def last_id(self) -> int:
        """The highest row id stored so far (0 when empty)."""
        with self._lock:
            row = self._conn().execute("SELECT MAX(id) FROM messages").fetchone()
        return int(row[0] or 0)

    def get(self, msg_id: str) -> tuple[StoredMessage, bytes] | None:
        """A message's summary and its bytes, ``None`` when not stored (or a malformed id)."""
        if not msg_id.isdigit():
            return None
        with self._lock:
            row = self._conn().execute(f"SELECT {_SUMMARY_COLUMNS}, raw FROM messages"
                                       " WHERE id = ?", (int(msg_id),)).fetchone()
        if row is None:
            return None
        return self._row(row[:6]), bytes(row[6])

    def delete(self, msg_id: str) -> bool:
        """Delete one message; False when it was not stored."""
        if not msg_id.isdigit():
            return False
        with self._lock:
            cur = self._conn().execute("DELETE FROM messages WHERE id = ?", (int(msg_id),))
        return cur.rowcount > 0

    def clear(self) -> int:
        """Delete every message; returns how many were deleted."""
        with self._lock:
            cur = self._conn().execute("DELETE FROM messages")
        return int(cur.rowcount)

    def stats(self) -> tuple[int, int]:
        """``(messages, bytes)`` stored."""
        with self._lock:
            row = self._conn().execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        return int(row[0]), int(row[1])


class CaptureDelivery:
    """Deliver each accepted transaction into a :class:`CaptureStore` (capture mode).

    The 250 is given only once the row is committed to disk. Each stored message wakes
    the long-poll waiters of :meth:`wait` (an :class:`asyncio.Condition`).

    Args:
        store: the capture database.
    """

    def __init__(self, store: CaptureStore) -> None:
        self.store = store
        self._changed = asyncio.Condition()
        self._generation = 0
        self._waiting = 0
        self.closing = False

    def __repr__(self) -> str:
        return f"CaptureDelivery({self.store!r})"

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Store ``message`` (byte-exact, the Received header included).

        Returns:
            ``250 2.0.0 Message captured as <id>`` once committed.

        Raises:
            TemporaryDeliveryError: 451 4.3.0 when the database cannot be written.
        """
        def store() -> StoredMessage:
            raw = message.read() if isinstance(message, MessageFile) else bytes(message)
            return self.store.add(envelope, raw, session=session)

        try:
            stored = await asyncio.to_thread(store)
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.error("capture %s: cannot store message: %s", self.store.path, exc)
            raise TemporaryDeliveryError(STORE_FAILED, f"capture store failed: {exc}") from exc
        log.info("session=%s captured %d bytes from=%r rcpts=%d as %s",
                 session.session_id if session else "-", stored.size, envelope.mail_from,
                 len(envelope.rcpt_to), stored.id)
        await self.notify()
        return Reply(250, "2.0.0", f"Message captured as {stored.id}")

    @property
    def waiting(self) -> int:
        """How many :meth:`wait` calls are waiting (each past the point from which a new
        message counts)."""
        return self._waiting

    async def release_waiters(self) -> None:
        """End every :meth:`wait` now (it returns ``None``) and any later one at once:
        the server is stopping."""
        self.closing = True
        await self.notify()

    async def notify(self) -> None:
        """Wake every :meth:`wait` (something was stored)."""
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    async def wait(self, flt: MessageFilter, *, timeout: float, since: float | None = None,
                   after_id: int | None = None) -> StoredMessage | None:
        """Wait for a matching message (the API's long poll).

        Args:
            flt: search terms the message must match.
            timeout: seconds to wait at most.
            since: also accept a message already stored, received at or after this
                time (epoch seconds).
            after_id: only messages stored after this row id (default: the newest
                when the call starts, i.e. messages arriving from now on).

        Returns:
            The oldest matching message, ``None`` after ``timeout`` (or once
            :meth:`release_waiters` was called).

        Raises:
            sqlite3.Error / OSError: the database cannot be read.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if after_id is None:
            after_id = await asyncio.to_thread(self.store.last_id)
        self._waiting += 1  # counted once the starting point is fixed
        try:
            return await self._wait(flt, deadline, since, after_id)
        finally:
            self._waiting -= 1

    async def _wait(self, flt: MessageFilter, deadline: float, since: float | None,
                    after_id: int) -> StoredMessage | None:
        loop = asyncio.get_running_loop()
        while True:
            generation = self._generation
            found = await asyncio.to_thread(self.store.first_after, flt, after_id, since)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closing:
                return None
            async with self._changed:
                if self._generation != generation:
                    continue  # stored while we looked: look again
                try:
                    async with asyncio.timeout(min(remaining, WAIT_POLL)):
                        await self._changed.wait()
                except TimeoutError:
                    pass

    async def aclose(self) -> None:
        """Close the database."""
        await asyncio.to_thread(self.store.close)


@dataclass(slots=True)
class _QEntry:
    mtime: float
    size: int
    summary: StoredMessage
    fields: dict[str, str] = field(default_factory=dict)


class QuarantineFolder:
    """A scanner's quarantine Maildir (``[[scanner]] quarantine_path``), read-only, with
    the shapes of the capture store (the API lists both).

    Files in ``new/`` and ``cur/`` are messages; their header sections are parsed once
    and cached by name, modification time and size.

    Args:
        path: the Maildir directory.
        index: this folder's number, the ``q<index>-`` prefix of its message ids.
    """

    def __init__(self, path: str | os.PathLike[str], index: int) -> None:
        self.path = Path(path)
        self.index = index
        self._cache: dict[str, _QEntry] = {}

    def __repr__(self) -> str:
        return f"QuarantineFolder({str(self.path)!r})"

    @property
    def prefix(self) -> str:
        """The id prefix of this folder's messages: ``q<index>-``."""
        return f"q{self.index}-"

    def _files(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self.path / sub)
            except OSError:
                continue
            out += [(name, self.path / sub / name) for name in names
                    if not name.startswith(".")]
        return out

    def _entry(self, name: str, path: Path, *, with_body: bool) -> _QEntry | None:
        try:
            st = path.stat()
        except OSError:
            return None
        cached = self._cache.get(name)
        if (cached is not None and cached.mtime == st.st_mtime and cached.size == st.st_size
                and (not with_body or "body" in cached.fields)):
            return cached
        try:
            if with_body and st.st_size <= SEARCH_BODY_LIMIT:
                data = path.read_bytes()
            else:
                with path.open("rb") as fh:
                    data = fh.read(65536)
                end = data.find(b"\r\n\r\n")
                end = data.find(b"\n\n") if end < 0 else end
                data = data[: end + 2] if end >= 0 else data
                with_body = False
        except OSError:
            return None
        msg = parse_message(data)
        return_path = _addresses(msg, "Return-Path")
        sender = (return_path or _addresses(msg, "From") or [""])[0]
        recipients = list(dict.fromkeys(_addresses(msg, "To", "Cc")))
        summary = StoredMessage(self.prefix + name, st.st_mtime, sender, recipients,
                                _header_str(msg, "Subject"), st.st_size, "quarantine")
        fields = search_fields(msg, sender, recipients, with_body=with_body)
        if with_body:
            fields["body"] = "1"
        entry = _QEntry(st.st_mtime, st.st_size, summary, fields)
        self._cache[name] = entry
        return entry

    def search(self, flt: MessageFilter = MessageFilter()) -> list[StoredMessage]:
        """Every matching message in the folder, newest first (blocking file reads)."""
        with_body = bool(flt.text)
        files = self._files()
        present = {name for name, _ in files}
        for gone in set(self._cache) - present:
            del self._cache[gone]
        out = []
        for name, path in files:
            entry = self._entry(name, path, with_body=with_body)
            if entry is not None and flt.matches(entry.fields):
                out.append(entry.summary)
        out.sort(key=lambda m: (m.received, m.id), reverse=True)
        return out

    def get(self, msg_id: str) -> tuple[StoredMessage, bytes] | None:
        """A message's summary and bytes by id (``q<index>-<file name>``), ``None`` when
        the id is not this folder's or the file is gone."""
        if not msg_id.startswith(self.prefix):
            return None
        name = msg_id[len(self.prefix):]
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            return None
        for sub in ("new", "cur"):
            path = self.path / sub / name
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            entry = self._entry(name, path, with_body=False)
            if entry is not None:
                return entry.summary, raw
        return None

"""The durable spool: messages and their envelopes on disk, crash-safe.

Entry points: :class:`QueueStore` (``enqueue``, ``find``, ``save``, ``remove``,
``entries``, ``open_message``, ``recover``), :class:`QueueEntry`, :class:`QueuedRecipient`.
Layout and crash guarantees are documented in docs/queue.md. Every method is
synchronous and blocking (file system calls plus fsync); the asyncio side calls them
in worker threads.

One queue file per message, as Postfix does: ``messages/<id>`` holds a header line naming
the message's length, the message, then its envelope as it was at arrival, then a trailer
naming the envelope's length and CRC-32 (the header, written first, means no message
content can pass for an envelope, even in a file torn by a crash).
Commit protocol of :meth:`QueueStore.enqueue_many`: write each queue file to ``tmp/`` with
one ``write(2)`` (a new file, or one claimed from ``free/``: removed queue files are
recycled, see :meth:`QueueStore.remove`), rename it into ``messages/`` — that rename is the
commit point; a queue file counts only if its envelope's id is its name — and make the
batch durable with one ``syncfs(2)`` (or each file's fsync and one fsync of ``messages/``).
Only then may the clients see ``250``. The envelope as changed later
(delivery attempts, the queue tools) lives beside it in ``<state>/<id>.json``; a message
without one is in ``incoming`` with the envelope of its queue file.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..envelope import Envelope, SessionInfo
from ..errors import QueueError
from ..message import Message, MessageFile

log = logging.getLogger("smtpgate.queue")

FORMAT_VERSION = 1
STATES = ("incoming", "deferred", "hold")
_ENV_SUFFIX = ".json"
OWNER_LOCK = "owner.lock"  # held by the serving process (see QueueStore.acquire_owner)
DELIVERY_LOCK = "delivery.lock"  # held by the process that delivers for the owner
COMMIT_LOCK = "commit.lock"  # shared by every commit, exclusive during recovery
FREE_DIR = "free"  # removed queue files kept for reuse (see QueueStore.remove)
#: Queue files of messages up to this many bytes are recycled through ``free/`` when
#: removed; longer ones are unlinked.
RECYCLE_MAX = 128 * 1024
#: At most this many files wait in ``free/``.
FREE_POOL_MAX = 1024
_FREE_RESCAN = 256  # removals between two counts of free/
_WHOLE_READ = RECYCLE_MAX + 16 * 1024  # queue files up to this long are read in one pread


@dataclass(slots=True)
class QueuedRecipient:
    """One forward-path in the queue with its delivery state.

    Attributes:
        address: the forward-path.
        params: RCPT parameters (NOTIFY, ORCPT).
        state: ``"pending"``, ``"delivered"`` or ``"failed"`` (permanently).
        last_reply: the last reply text for this recipient (``"550 5.1.1 ..."``).
        remote_mta: the host that gave that reply.
        attempts: delivery attempts for this recipient.
        delay_notified: a delay DSN was sent for this recipient.
    """

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    state: str = "pending"
    last_reply: str = ""
    remote_mta: str = ""
    attempts: int = 0
    delay_notified: bool = False


@dataclass(slots=True)
class QueueEntry:
    """The envelope file of one queued message.

    Attributes:
        id: queue id (also the file names).
        mail_from: reverse-path (``""`` = null, never bounced).
        mail_params: MAIL parameters (BODY, SMTPUTF8, RET, ENVID ...).
        recipients: per-recipient state.
        created: arrival time, seconds since the epoch.
        next_attempt: when the next delivery attempt is due (epoch seconds).
        attempts: delivery attempts so far.
        last_reply: last reply summary (for ``queue list``).
        size: message size in bytes.
        client: client facts (ip, helo, auth user, session id) for the logs and DSNs.
        state: the directory it is in: ``incoming``, ``deferred`` or ``hold``.
        seq: increases on every save; recovery keeps the highest when a crash left two.
        bounce: set by ``queue bounce ID``: return to sender at the next attempt.
        crc32: CRC-32 of the message (``-1``: not recorded); checked with the size
            before each delivery from disk, so a message left incomplete by a crash is
            never delivered.
        offset: where the message starts in its queue file, bytes (after the header
            line; 0 in a spool of the earlier two-file layout).
    """

    id: str
    mail_from: str
    mail_params: dict[str, str | None]
    recipients: list[QueuedRecipient]
    created: float
    next_attempt: float
    attempts: int = 0
    last_reply: str = ""
    size: int = 0
    client: dict[str, str] = field(default_factory=dict)
    state: str = "incoming"
    seq: int = 0
    bounce: bool = False
    crc32: int = -1
    offset: int = 0

    @property
    def pending(self) -> list[QueuedRecipient]:
        """Recipients still to be delivered."""
        return [r for r in self.recipients if r.state == "pending"]

    @property
    def finished(self) -> bool:
        """True when no recipient is pending (the message may leave the queue)."""
        return not self.pending

    def to_json(self) -> bytes:
        """Serialise (format version 1, UTF-8 JSON)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        data["recipients"] = [{name: getattr(r, name) for name in _RCPT_FIELDS}
                              for r in self.recipients]
        data["version"] = FORMAT_VERSION
        return json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> QueueEntry:
        """Parse an envelope file.

        Raises:
            QueueError: malformed or of an unknown format version.
        """
        try:
            data = json.loads(raw)
            if data.pop("version", None) != FORMAT_VERSION:
                raise QueueError("unknown envelope format version")
            data["recipients"] = [QueuedRecipient(**r) for r in data["recipients"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise QueueError(f"malformed envelope file: {exc}") from exc

    def to_envelope(self, pending_only: bool = True) -> Envelope:
        """An :class:`~smtpgate.envelope.Envelope` for delivery (pending recipients)."""
        from ..envelope import Recipient

        rcpts = self.pending if pending_only else self.recipients
        return Envelope(
            self.mail_from, dict(self.mail_params),
            [Recipient(r.address, dict(r.params)) for r in rcpts],
        )


_ENTRY_FIELDS = tuple(f for f in QueueEntry.__dataclass_fields__ if f != "recipients")
_RCPT_FIELDS = tuple(QueuedRecipient.__dataclass_fields__)

# The start of a queue file: the message's length (so no message content can ever be read
# as an envelope); the end: the length and CRC-32 of the envelope before it.
_HEADER_FORMAT = b"#smtpgate-queue-file 2 %012d\n"
_HEADER_RE = re.compile(rb"#smtpgate-queue-file 2 ([0-9]{12})\n\Z")
_HEADER_LEN = len(_HEADER_FORMAT % 0)
_TRAILER_FORMAT = b"\n#smtpgate-envelope %010d %08x\n"
_TRAILER_RE = re.compile(rb"\n#smtpgate-envelope ([0-9]{10}) ([0-9a-f]{8})\n\Z")
_TRAILER_LEN = len(_TRAILER_FORMAT % (0, 0))


def _trailer(envelope: bytes) -> bytes:
    return _TRAILER_FORMAT % (len(envelope), zlib.crc32(envelope))


def _embedded_entry(
    fd: int, name: str, keep: list[bytes] | None = None
) -> QueueEntry | None:
    """The envelope stored in the queue file ``name`` open at ``fd``, or ``None`` when the
    file is not complete and intact (header, message, envelope, trailer all where the
    header and trailer say, and the envelope's id is the file's name): it was never
    committed, or was torn by a crash before its batch was flushed (a recycled file may
    then still hold, complete, the message it held before, under another id).

    A file up to :data:`_WHOLE_READ` bytes is read with one ``pread``; its bytes are
    appended to ``keep`` (when given) if it is intact."""
    data = os.pread(fd, _WHOLE_READ, 0)
    if len(data) < _WHOLE_READ:  # the whole file
        length = len(data)
        if length < _HEADER_LEN + _TRAILER_LEN:
            return None
        h = _HEADER_RE.match(data[:_HEADER_LEN])
        t = _TRAILER_RE.match(data[length - _TRAILER_LEN:])
    else:
        length = os.fstat(fd).st_size
        h = _HEADER_RE.match(data[:_HEADER_LEN])
        t = _TRAILER_RE.match(os.pread(fd, _TRAILER_LEN, length - _TRAILER_LEN))
        data = b""
    if h is None or t is None:
        return None
    size, n = int(h.group(1)), int(t.group(1))
    if _HEADER_LEN + size + n + _TRAILER_LEN != length:
        return None
    if data:
        raw = data[_HEADER_LEN + size:_HEADER_LEN + size + n]
    else:
        raw = os.pread(fd, n, _HEADER_LEN + size)
    if len(raw) != n or zlib.crc32(raw) != int(t.group(2), 16):
        return None
    try:
        entry = QueueEntry.from_json(raw)
    except QueueError:
        return None
    if entry.size != size or entry.offset != _HEADER_LEN or entry.id != name:
        return None
    if keep is not None and data:
        keep.append(data)
    return entry


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_ID_SALT = secrets.randbits(20)
_id_counter = itertools.count()


def new_queue_id() -> str:
    """A unique, sortable queue id: arrival time (µs, hex), then 40 bits that differ
    between processes (a random salt) and between ids of one process (a counter)."""
    return f"{time.time_ns() // 1000:013X}{_ID_SALT:05X}{next(_id_counter) & 0xFFFFF:05X}"


def _load_syncfs() -> Any:
    """Linux ``syncfs(2)`` through libc, or None where it is not available."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.syncfs
        func.argtypes = [ctypes.c_int]
        return func
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def _syncfs(path: Path) -> None:
    """Flush every dirty file and directory of ``path``'s file system (one call per batch).

    Raises:
        OSError: the flush failed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str | Path, data: bytes, fsync: bool) -> None:
    """Create ``path`` holding ``data`` (mode 0600), fsync'd when asked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_queue_file(
    path: str, message: Message, entry: QueueEntry, recycled: bool = False
) -> None:
    """Create the queue file ``path``: header, message, envelope, trailer. A short
    message goes out in one ``write(2)``; a :class:`MessageFile` is copied in pieces.
    Sets ``entry.crc32`` (the message's CRC-32) and ``entry.offset`` before the envelope
    is written. ``recycled``: ``path`` is an existing (claimed) file, overwritten from
    its start and cut to the new length (no inode is allocated)."""
    if recycled:
        fd = os.open(path, os.O_WRONLY)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        header = _HEADER_FORMAT % entry.size
        entry.offset = len(header)
        if isinstance(message, bytes):
            entry.crc32 = zlib.crc32(message)
            env = entry.to_json()
            data = b"".join((header, message, env, _trailer(env)))
            _write_all(fd, data)
            if recycled:
                os.ftruncate(fd, len(data))
        else:
            _write_all(fd, header)
            crc = 0
            for piece in message.chunks():
                crc = zlib.crc32(piece, crc)
                _write_all(fd, piece)
            entry.crc32 = crc
            env = entry.to_json()
            _write_all(fd, env + _trailer(env))
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Commit:
    """One message of a group commit (see :meth:`QueueStore.enqueue_many`)."""

    entry: QueueEntry
    message: Message
    tmp: str  # where the queue file is written
    path: str  # where it is committed (messages/<id>)
    committed: bool = False
    recycled: bool = False  # the file was claimed from free/ (not created)
    error: QueueError | None = None

    def fail(self, exc: OSError | ValueError) -> None:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        self.error = QueueError(f"cannot store message: {detail}")


@dataclass(slots=True)
class PendingCommit:
    """A group commit whose queue files are written but not yet durable (see
    :meth:`QueueStore.write_batch`); pass it to :meth:`QueueStore.flush_batch`.

    Attributes:
        items: one per message, in order.
        lock_fd: the commit lock held (shared) until the flush.
        failed: the result of a batch that could not start (commit lock unusable).
    """

    items: list[_Commit]
    lock_fd: int
    failed: list[QueueEntry | QueueError] | None = None


class QueueStore:
    """A spool directory.

    Args:
        path: the spool directory (created with mode 0700 if missing and ``create``).
        fsync: flush files and directories to stable storage before a commit
            returns (on by default; turning it off loses mail on power failure).
        create: create the spool's directories when missing; False (the queue tools)
            opens an existing spool only and never creates anything.

    Raises:
        QueueError: the directory cannot be created, or (``create=False``) it is not
            an existing spool.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._free_dir = os.path.join(self.path, FREE_DIR)
        self._free_names: list[str] = []  # names last seen in free/, to claim
        self._free_scan_at = 0.0  # monotonic time before which free/ is not listed again
        self._pool_count = -1  # files in free/ (last count plus what this process added)
        self._since_count = 0
        self._placeholder: QueueEntry | None = None  # see _current
        self._state_prefix = {state: os.path.join(self.path, state, "") for state in STATES}
        self._messages_prefix = os.path.join(self.path, "messages", "")
        # The bytes of the last queue file read whole by _embedded (its id, its content):
        # a delivery's find() then read_message() reads the file once.
        self._last_file: tuple[str, bytes] | None = None
        if not create:
            missing = [sub for sub in ("messages", *STATES) if not (self.path / sub).is_dir()]
            if missing:
                raise QueueError(f"{self.path}: not a spool directory (no {missing[0]}/)")
            self._recycle = os.path.isdir(self._free_dir)
            return
        self._recycle = _SYNCFS is not None
        try:
            for sub in ("tmp", "messages", "corrupt", FREE_DIR, *STATES):
                (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot create spool {self.path}: {exc.strerror or exc}") from exc

    # --------------------------------------------------------------- locking

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the spool's advisory lock (``<spool>/lock``, flock) for a read-modify-write.

        The server's workers and the ``smtpgate queue`` commands both take it, so an
        administrator's hold/bounce/delete and a delivery attempt never overwrite each other.
        """
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, qid: str, change: Callable[[QueueEntry], str | None]) -> QueueEntry:
        """Apply ``change`` to the current entry under the lock and save it.

        ``change`` mutates the entry and returns the target state (``None``: keep).

        Raises:
            KeyError: no such message. QueueError: file system failure.
        """
        with self.locked():
            entry = self.find(qid)
            target = change(entry)
            self.save(entry, target)
            return entry

    def merge_after_attempt(self, attempted: QueueEntry) -> QueueEntry:
        """Merge a delivery attempt's outcome with changes made meanwhile by an administrator.

        The attempt's per-recipient results win; the administrator's hold and bounce
        flags win. Returns the merged entry (not yet saved; the caller saves or removes
        it); its ``state`` is ``"gone"`` when the message was deleted meanwhile.
        """
        with self.locked():
            current = self._current(attempted.id)
            if current is None:
                attempted.state = "gone"
                return attempted
            attempted.seq = max(attempted.seq, current.seq)
            attempted.bounce = attempted.bounce or current.bounce
            attempted.state = current.state  # where its envelope file is now (hold wins)
            return attempted

    def _current(self, qid: str) -> QueueEntry | None:
        """The entry as it is on disk now, for merging an attempt; ``None`` when the
        message is gone. Every change after arrival writes an envelope file, so without
        one the queue file's envelope (unchanged, ``seq`` 0) is current and is not read
        again."""
        try:
            side = self._sidecar(qid)
        except QueueError:  # an unreadable envelope file: merged as seq 0, removed
            side = QueueEntry(qid, "", {}, [], 0.0, 0.0)
        if not os.access(self._messages_prefix + qid, os.F_OK):
            return None
        if side is not None:
            return side
        # seq 0, incoming, no bounce; the caller knows by identity that no envelope file
        # exists (see finish_attempts)
        self._placeholder = QueueEntry(qid, "", {}, [], 0.0, 0.0)
        return self._placeholder

    def finish_attempt(self, attempted: QueueEntry) -> str:
        """Record a delivery attempt: merge, then save or remove, all under the spool lock.

        Returns ``"gone"`` (deleted meanwhile: nothing written), ``"removed"`` (no
        recipient pending any more), ``"hold"`` or ``"deferred"`` (the state saved).
        """
        return self.finish_attempts([attempted])[0]

    def finish_attempts(self, attempts: list[QueueEntry]) -> list[str]:
        """:meth:`finish_attempt` for several entries under one hold of the spool lock."""
        out: list[str] = []
        with self.locked():
            for attempted in attempts:
                current = self._current(attempted.id)
                if current is None:
                    out.append("gone")
                    continue
                attempted.seq = max(attempted.seq, current.seq)
                attempted.bounce = attempted.bounce or current.bounce
                attempted.state = current.state
                if attempted.finished:
                    # no envelope file to remove when the queue file's own was current
                    self.remove(attempted, envelope_file=current is not self._placeholder)
                    out.append("removed")
                    continue
                target = "hold" if current.state == "hold" else "deferred"
                self.save(attempted, target)
                out.append(target)
        return out

    # --------------------------------------------------------------- writing

    def enqueue(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None,
        *, queue_id: str | None = None,
    ) -> QueueEntry:
        """Store a message durably; return its entry once committed (only then reply 250).

        Raises:
            QueueError: any file system failure (disk full, permissions); nothing is
                left behind that recovery would treat as committed.
        """
        result = self.enqueue_many([(envelope, message, session, queue_id)])[0]
        if isinstance(result, QueueError):
            raise result
        return result

    def enqueue_many(
        self,
        batch: list[tuple[Envelope, Message, SessionInfo | None, str | None]],
    ) -> list[QueueEntry | QueueError]:
        """Group commit: store several messages, made durable together (blocking):
        :meth:`write_batch`, then :meth:`flush_batch`.

        Returns:
            One committed :class:`QueueEntry` or one :class:`QueueError` per item, in order;
            a failed item leaves nothing that recovery would treat as committed.
        """
        pending = self.write_batch(batch)
        assert pending is not None  # write_batch waits for the lock by default
        return self.flush_batch(pending)

    def write_batch(
        self,
        batch: Sequence[tuple[Envelope, Message, SessionInfo | None, str | None]],
        *,
        wait: bool = True,
    ) -> PendingCommit | None:
        """The first half of a group commit: each message becomes one queue file (header,
        message, envelope, trailer) written to ``tmp/`` and renamed into ``messages/``
        (each rename is that message's commit point). Nothing is durable yet and no
        client may see 250 before :meth:`flush_batch`. Page-cache writes only (no
        fsync), so an event loop may call it for messages held in memory.

        Holds the spool's commit lock (shared) until :meth:`flush_batch`.

        Args:
            batch: ``(envelope, message, session, queue id or None)`` per message.
            wait: False returns ``None`` at once instead of waiting when the commit lock
                is held exclusively (recovery is running).
        """
        try:
            fd = os.open(self.path / COMMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # the commit lock itself cannot be opened
            err = QueueError(f"cannot store message: {exc.strerror or exc}")
            return PendingCommit([], -1, [err for _ in batch])
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        now = time.time()
        tmp_dir = os.path.join(self.path, "tmp")
        msg_dir = os.path.join(self.path, "messages")
        items: list[_Commit] = []
        for envelope, message, session, queue_id in batch:
            qid = queue_id or new_queue_id()
            entry = QueueEntry(
                id=qid,
                mail_from=envelope.mail_from,
                mail_params=dict(envelope.mail_params),
                recipients=[QueuedRecipient(r.address, dict(r.params))
                            for r in envelope.rcpt_to],
                created=now,
                next_attempt=now,
                size=len(message),
                client=_client_facts(session),
            )
            item = _Commit(entry, message, os.path.join(tmp_dir, qid),
                           os.path.join(msg_dir, qid))
            items.append(item)
            try:
                item.recycled = (self._recycle and isinstance(message, bytes)
                                 and len(message) <= RECYCLE_MAX and self._claim(item.tmp))
                _write_queue_file(item.tmp, message, entry, item.recycled)
                os.rename(item.tmp, item.path)  # commit point
                item.committed = True
            except (OSError, ValueError) as exc:
                item.fail(exc)
        return PendingCommit(items, fd)

    def flush_batch(self, pending: PendingCommit) -> list[QueueEntry | QueueError]:
        """The second half of a group commit: make the batch durable, then release the
        commit lock. One ``syncfs(2)`` of the spool's file system on Linux for a batch
        of several, else each queue file is fsync'd and ``messages/`` once. Only after
        this may any of the clients see 250, so no acknowledgement precedes the flush
        that makes its message durable. A crash before it (no client has seen 250 yet)
        may leave a queue file incomplete: its header, trailer and CRC-32s catch that
        (recovery removes a file that is not intact; a message not matching its CRC-32 is
        quarantined, never delivered). Blocking: run it in a thread.

        Returns:
            One committed :class:`QueueEntry` or one :class:`QueueError` per message, in
            order; a failed one leaves nothing that recovery would treat as committed.
        """
        if pending.failed is not None:
            return list(pending.failed)
        items = pending.items
        try:
            committed = [item for item in items if item.committed]
            if self.fsync and committed:
                try:
                    if _SYNCFS is not None and len(committed) > 1:
                        _syncfs(self.path)
                    else:
                        for item in committed:
                            fd = os.open(item.path, os.O_RDONLY)
                            try:
                                os.fsync(fd)
                            finally:
                                os.close(fd)
                        _fsync_dir(self.path / "messages")
                        if any(item.recycled for item in committed):
                            # the claims (free/ -> tmp/) too: a recycled inode must never
                            # be named both in free/ and in messages/ after a crash
                            _fsync_dir(Path(self._free_dir))
                except OSError as exc:
                    for item in committed:
                        item.fail(exc)
            out: list[QueueEntry | QueueError] = []
            for item in items:
                if item.error is None:
                    out.append(item.entry)
                    continue
                # The client gets 451: undo everything.
                for leftover in (item.path, item.tmp) if item.committed else (item.tmp,):
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass
                out.append(item.error)
            return out
        finally:
            os.close(pending.lock_fd)

    def save(self, entry: QueueEntry, state: str | None = None) -> None:
        """Write the entry's changed envelope (``<state>/<id>.json``, atomically; it
        supersedes the queue file's own), optionally moving it to another state.

        Raises:
            QueueError: file system failure, or an unknown state.
        """
        target = state or entry.state
        if target not in STATES:
            raise QueueError(f"unknown queue state {target!r}")
        old = self._env_path(entry.id, entry.state)
        entry.seq += 1
        previous_state = entry.state
        entry.state = target
        tmp = self.path / "tmp" / f"{entry.id}.{entry.seq}{_ENV_SUFFIX}"
        try:
            _write_file(tmp, entry.to_json(), self.fsync)
            os.rename(tmp, self._env_path(entry.id, target))
            if self.fsync:
                _fsync_dir(self.path / target)
            if target != previous_state:
                Path(old).unlink(missing_ok=True)
                if self.fsync:
                    _fsync_dir(self.path / previous_state)
        except OSError as exc:
            entry.state = previous_state
            try:
                tmp.unlink()
            except OSError:
                pass
            raise QueueError(f"cannot update {entry.id}: {exc.strerror or exc}") from exc

    def remove(self, entry: QueueEntry, *, envelope_file: bool = True) -> None:
        """Delete a message: its queue file first (the commit point), then its envelope
        file if it has one (recovery removes one left behind by a crash).

        The queue file of a message up to :data:`RECYCLE_MAX` bytes is moved to ``free/``
        (while it holds fewer than :data:`FREE_POOL_MAX` files), where a later commit
        claims it and writes its own message over it: no inode is freed here and none
        allocated there (on ext4 both are costly: freeing discards the blocks, and
        without a journal the allocator skips every inode freed in the last minutes).
        Longer ones are unlinked.

        Args:
            entry: the message.
            envelope_file: False when the caller knows (under the spool lock) that the
                message has no envelope file (saves a lookup).
        """
        path = os.path.join(self.path, "messages", entry.id)
        try:
            # No directory fsync: if a crash loses this removal the message is delivered
            # once more after recovery (at least once, at most twice), never lost.
            if entry.size <= RECYCLE_MAX and self._pool_room():
                try:
                    os.rename(path, os.path.join(self._free_dir, entry.id))
                except FileNotFoundError:
                    if os.path.isdir(self._free_dir):
                        raise  # the queue file is gone
                    self._recycle = False  # free/ was removed: unlink from now on
                    os.unlink(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise QueueError(f"cannot remove {entry.id}: {exc.strerror or exc}") from exc
        if not envelope_file:
            return
        try:
            os.unlink(self._env_path(entry.id, entry.state))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("queue: cannot remove the envelope of %s: %s", entry.id, exc)

    def _pool_room(self) -> bool:
        """Whether a removed queue file may go to ``free/`` (counted now and then)."""
        if not self._recycle:
            return False
        self._since_count += 1
        if self._pool_count < 0 or self._since_count >= _FREE_RESCAN:
            try:
                self._pool_count = len(os.listdir(self._free_dir))
            except OSError:
                return False
            self._since_count = 0
        if self._pool_count >= FREE_POOL_MAX:
            return False
        self._pool_count += 1
        return True

    def _claim(self, tmp: str) -> bool:
        """Take a file from ``free/`` by renaming it to ``tmp`` (atomic: of several
        processes claiming one file, one gets it). False when none is free (``free/`` is
        then not listed again for half a second)."""
        while True:
            if not self._free_names:
                now = time.monotonic()
                if now < self._free_scan_at:
                    return False
                try:
                    names = os.listdir(self._free_dir)
                except OSError:
                    names = []
                if not names:
                    self._free_scan_at = now + 0.5
                    return False
                self._free_names = names[:_FREE_RESCAN]
            name = self._free_names.pop()
            try:
                os.rename(os.path.join(self._free_dir, name), tmp)
                return True
            except FileNotFoundError:
                continue  # claimed by another process
            except OSError:
                return False

    # --------------------------------------------------------------- reading

    def _env_path(self, qid: str, state: str) -> str:
        return os.path.join(self.path, state, qid + _ENV_SUFFIX)

    def _sidecar(self, qid: str) -> QueueEntry | None:
        """The envelope as changed after arrival (highest ``seq`` over the states), or
        ``None`` when the queue file's own envelope is current.

        Raises:
            QueueError: an unreadable envelope file.
        """
        best: QueueEntry | None = None
        for state in STATES:
            path = self._state_prefix[state] + qid + _ENV_SUFFIX
            if not os.access(path, os.F_OK):  # no exception to build: the usual case
                continue
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                continue
            entry = QueueEntry.from_json(raw)
            entry.state = state
            if best is None or entry.seq > best.seq:
                best = entry
        return best

    def _embedded(self, qid: str) -> QueueEntry | None:
        """The envelope in the queue file ``messages/<id>`` (state ``incoming``), ``None``
        when there is no such file or it has no valid trailer (never committed)."""
        try:
            fd = os.open(self._messages_prefix + qid, os.O_RDONLY)
        except FileNotFoundError:
            return None
        keep: list[bytes] = []
        try:
            entry = _embedded_entry(fd, qid, keep)
        finally:
            os.close(fd)
        if entry is not None:
            entry.state = "incoming"
            if keep:  # read_message(qid) takes the message from these bytes
                self._last_file = (qid, keep[0])
        return entry

    def find(self, qid: str) -> QueueEntry:
        """Load an entry by id: its changed envelope from whichever state holds it, else
        the envelope in its queue file (``incoming``).

        Raises:
            KeyError: no such message. QueueError: unreadable envelope.
        """
        if not qid or "/" in qid or qid.startswith("."):
            raise KeyError(qid)
        entry = self._sidecar(qid) or self._embedded(qid)
        if entry is None:
            raise KeyError(qid)
        return entry

    def open_message(self, entry: QueueEntry) -> MessageFile:
        """The message of ``entry`` (``entry.size`` bytes at ``entry.offset`` in its queue
        file) as a :class:`~smtpgate.message.MessageFile`; its CRC-32 is checked in pieces.

        Raises:
            QueueError: the file is missing, unreadable, shorter than the message, or
                the message does not match its CRC-32 (left incomplete by a crash).
        """
        path = os.path.join(self.path, "messages", entry.id)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise QueueError(f"cannot read message {entry.id}: {exc.strerror or exc}") from exc
        try:
            if os.fstat(fd).st_size < entry.offset + entry.size:
                raise QueueError(f"message {entry.id} is shorter than its envelope says")
            msg = MessageFile(fd, entry.size, offset=entry.offset)
            if entry.crc32 >= 0 and msg.crc32() != entry.crc32:
                raise QueueError(f"message {entry.id} does not match its envelope (CRC-32)")
            return msg
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise QueueError(f"cannot read message {entry.id}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise

    def read_message(self, qid: str, entry: QueueEntry | None = None) -> bytes:
        """The message bytes (never rewritten after enqueue), size and CRC-32 checked.

        Args:
            qid: the queue id.
            entry: its entry, when the caller has it (else it is looked up).

        Raises:
            QueueError: no such message, or the file is unreadable or incomplete.
        """
        if entry is None:
            try:
                entry = self.find(qid)
            except KeyError:
                raise QueueError(f"cannot read message {qid}: no such message") from None
        last, self._last_file = self._last_file, None
        if (last is not None and last[0] == entry.id and entry.offset
                and entry.offset + entry.size <= len(last[1])):
            # Read whole by find() just before (a queue file is never rewritten under
            # its id); its CRC-32 is checked all the same.
            data = last[1][entry.offset:entry.offset + entry.size]
            if entry.crc32 >= 0 and zlib.crc32(data) != entry.crc32:
                raise QueueError(f"message {entry.id} does not match its envelope (CRC-32)")
            return data
        # One read, and the CRC-32 of exactly the bytes returned: a queue file removed and
        # recycled meanwhile (see remove) can only give an error, never another message.
        try:
            fd = os.open(os.path.join(self.path, "messages", entry.id),
                         os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise QueueError(f"cannot read message {entry.id}: {exc.strerror or exc}") from exc
        try:
            parts: list[bytes] = []
            got = 0
            while got < entry.size:
                piece = os.pread(fd, entry.size - got, entry.offset + got)
                if not piece:
                    raise QueueError(f"message {entry.id} is shorter than its envelope says")
                parts.append(piece)
                got += len(piece)
        except OSError as exc:
            raise QueueError(f"cannot read message {qid}: {exc}") from exc
        finally:
            os.close(fd)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if entry.crc32 >= 0 and zlib.crc32(data) != entry.crc32:
            raise QueueError(f"message {entry.id} does not match its envelope (CRC-32)")
        return data

    def quarantine(self, entry: QueueEntry, why: str) -> None:
        """Move an entry's queue file and envelope file to ``corrupt/`` (never delivered)."""
        with self.locked():
            env = Path(self._env_path(entry.id, entry.state))
            if env.exists():
                self._quarantine(env, why)
            msg = self.path / "messages" / entry.id
            if msg.exists():
                log.error("queue: moving message %s to corrupt/: %s", entry.id, why)
                try:
                    shutil.move(str(msg), str(self.path / "corrupt" / f"message.{entry.id}"))
                except OSError:
                    pass

    def entries(
        self, states: tuple[str, ...] = STATES, *, repair: bool = True
    ) -> Iterator[QueueEntry]:
        """Every readable entry in the given states: each envelope file, and (for
        ``incoming``) each queue file that has none (its own envelope is current).

        Args:
            states: the queue states to read.
            repair: move unreadable envelope files to ``corrupt/`` (only the spool's owner
                does); False skips them with a warning and changes nothing (listings).
        """
        with_sidecar: set[str] = set()
        for state in STATES:
            try:
                names = os.listdir(self.path / state)
            except FileNotFoundError:
                continue
            for name in sorted(names):
                if not name.endswith(_ENV_SUFFIX):
                    continue
                if state not in states:
                    # Not read: it exists, so the queue file's own envelope is not current.
                    with_sidecar.add(name[: -len(_ENV_SUFFIX)])
                    continue
                p = self.path / state / name
                try:
                    entry = QueueEntry.from_json(p.read_bytes())
                except FileNotFoundError:
                    continue  # moved or removed meanwhile
                except QueueError as exc:
                    # The queue file's own (older) envelope takes over: delivered at
                    # least once, never lost.
                    if repair:
                        self._quarantine(p, str(exc))
                    else:
                        log.warning("queue: unreadable envelope %s: %s", p, exc)
                    continue
                with_sidecar.add(name[: -len(_ENV_SUFFIX)])
                entry.state = state
                yield entry
        if "incoming" not in states:
            return
        try:
            names = os.listdir(self.path / "messages")
        except FileNotFoundError:
            return
        for name in sorted(names):
            if name in with_sidecar or name.startswith("."):
                continue
            embedded = self._embedded(name)
            if embedded is not None:  # else never committed: recovery removes it
                yield embedded

    def _quarantine(self, path: Path, why: str) -> None:
        log.error("queue: moving unreadable %s to corrupt/: %s", path.name, why)
        try:
            shutil.move(str(path), str(self.path / "corrupt" / f"{path.parent.name}.{path.name}"))
        except OSError:
            pass

    # -------------------------------------------------------------- recovery

    def recover(self, clean: bool = True) -> list[QueueEntry]:
        """Start-up recovery after a crash (``kill -9``, power loss); the spool owner only.

        Removes half-written temporary files, queue files that were never committed (no
        valid trailer and no envelope file: the crash came before their batch's flush,
        so no client saw 250), envelope files whose message was removed (a crash during
        a removal), and duplicate envelope files left by a crash during a state move
        (the higher ``seq`` wins). Returns every committed entry. It runs holding the
        spool lock and the commit lock exclusively, so no commit of any process (the
        server, ``smtpgate inetd``/``bsmtp``) and no ``smtpgate queue`` change is in
        flight while leftovers are judged: a file that is not committed now was abandoned.

        Args:
            clean: remove leftovers of interrupted commits; False only reads the
                committed entries.
        """
        with self.locked(), self._commits(exclusive=True):
            if clean:
                for name in os.listdir(self.path / "tmp"):
                    (self.path / "tmp" / name).unlink(missing_ok=True)
                # Spare files are dropped (deliveries refill free/): after a power loss a
                # claimed file could be named in free/ as well as in messages/.
                with contextlib.suppress(FileNotFoundError):
                    for name in os.listdir(self._free_dir):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self._free_dir, name))
            best: dict[str, QueueEntry] = {}
            for entry in self.entries(tuple(s for s in STATES if s != "incoming")
                                      + ("incoming",)):
                other = best.get(entry.id)
                if other is None or entry.seq > other.seq:
                    if other is not None:
                        Path(self._env_path(other.id, other.state)).unlink(missing_ok=True)
                    best[entry.id] = entry
                else:
                    Path(self._env_path(entry.id, entry.state)).unlink(missing_ok=True)
            messages = set(os.listdir(self.path / "messages"))
            if clean:
                for name in messages - best.keys():
                    log.info("queue recovery: removing uncommitted message %s", name)
                    (self.path / "messages" / name).unlink(missing_ok=True)
            for qid, entry in list(best.items()):
                if qid not in messages:
                    # Its queue file was removed (delivered, deleted, bounced) and a
                    # crash came before its envelope file went too.
                    log.info("queue recovery: removing the envelope of removed message %s",
                             qid)
                    if clean:
                        Path(self._env_path(qid, entry.state)).unlink(missing_ok=True)
                    del best[qid]
        return sorted(best.values(), key=lambda e: e.created)

    @contextlib.contextmanager
    def _commits(self, *, exclusive: bool) -> Iterator[None]:
        """The commit lock (``<spool>/commit.lock``): every commit holds it shared for
        the length of its writes; recovery holds it exclusively, so it never sees a
        commit half done. Different processes commit at once; only recovery waits."""
        fd = os.open(self.path / COMMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -------------------------------------------------------------- ownership

    def acquire_owner(self) -> SpoolOwnership:
        """Become the spool's one owner: the only process that recovers, schedules,
        delivers and deletes (Postfix's master lock on its queue directory).

        Holds an exclusive ``flock`` on ``<spool>/owner.lock`` until
        :meth:`SpoolOwnership.release` or the process ends; the file holds the pid.

        Raises:
            SpoolBusyError: another live process owns the spool.
            QueueError: the lock file cannot be opened.
        """
        return SpoolOwnership.acquire(self.path / OWNER_LOCK)

    def owner_pid(self) -> int | None:
        """The pid of the process owning the spool, ``None`` when no owner is running.

        Reads the pid written by :meth:`acquire_owner` and checks that the process
        exists; it never takes the lock (a starting owner is never disturbed).
        """
        try:
            text = (self.path / OWNER_LOCK).read_text().strip()
            pid = int(text)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid


def _try_lock(path: Path) -> int | str:
    """Open ``path`` and take an exclusive ``flock`` without waiting.

    Returns:
        The locked file descriptor, or (held by another process) the file's text, which
        holds the holder's pid when it is the owner lock.

    Raises:
        QueueError: the file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise QueueError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    return fd


class SpoolBusyError(QueueError):
    """The spool is owned by another running process (see :meth:`QueueStore.acquire_owner`)."""


class SpoolOwnership:
    """An exclusive ``flock`` held on a lock file for as long as this object lives.

    Entry points: :meth:`acquire` (non-blocking, the spool owner) and :meth:`wait`
    (blocking with a deadline: the delivery process, which must not overlap with an
    older delivery process still finishing). ``release`` drops the lock.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: Path) -> SpoolOwnership:
        """Take the lock now or fail.

        Raises:
            SpoolBusyError: another process holds it (its pid is named when known).
            QueueError: the lock file cannot be opened.
        """
        fd = _try_lock(path)
        if isinstance(fd, str):
            who = f" (pid {fd})" if fd.isdigit() else ""
            raise SpoolBusyError(
                f"spool {path.parent} is in use by another smtpgate server{who}"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @classmethod
    def wait(cls, path: Path, timeout: float) -> SpoolOwnership:
        """Take the lock, waiting up to ``timeout`` seconds for its holder to let go.

        Raises:
            SpoolBusyError: still held after ``timeout``. QueueError: cannot open.
        """
        deadline = time.monotonic() + timeout
        while True:
            fd = _try_lock(path)
            if not isinstance(fd, str):
                return cls(fd, path)
            if time.monotonic() > deadline:
                raise SpoolBusyError(f"{path} still locked after {timeout:g}s")
            time.sleep(0.1)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _client_facts(session: SessionInfo | None) -> dict[str, str]:
    if session is None:
        return {}
    out = {"ip": session.peer_ip, "helo": session.helo_name or "", "session": session.session_id}
    if session.auth_user:
        out["auth"] = session.auth_user
    if session.tls_version:
        out["tls"] = session.tls_version
    return out


def entry_dict(entry: QueueEntry) -> dict[str, Any]:
    """A JSON-ready view of an entry (for ``queue list --json``)."""
    data = asdict(entry)
    data["recipients"] = [asdict(r) for r in entry.recipients]
    return data

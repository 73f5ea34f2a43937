"""Queue mode as a :class:`~smtpgate.delivery.Delivery`: store durably, then answer 250.

Entry point: :class:`QueueDelivery`. ``deliver`` returns only after the message and its
envelope are fsync'd into the spool (see :mod:`smtpgate.queue.store`); free space below
``min_free_space`` gives ``452 4.3.1`` (ZMailer ``min-availspace``; RFC 3463 X.3.1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from ..envelope import Envelope, SessionInfo
from ..errors import QueueError, TemporaryDeliveryError
from ..message import Message
from ..reply import Reply
from .store import QueueEntry, QueueStore

log = logging.getLogger("smtpgate.queue")

class QueueScheduler(Protocol):
    """What :class:`QueueDelivery` tells about committed messages: a
    :class:`~smtpgate.queue.manager.QueueManager` (in process), a
    :class:`~smtpgate.queue.runner.RemoteQueue` (the owner's delivery process) or a
    :class:`~smtpgate.queue.runner.SpoolDrop` (a process that does not own the spool)."""

    def submit(self, entry: QueueEntry, message: bytes | None = None) -> None:
        """A message was committed: deliver it soon (``message``: its bytes, if kept)."""

    async def flush_matching(self, node: str) -> int:
        """ETRN (RFC 1985): make mail for ``node`` due now; returns how many (or 0)."""

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish deliveries in flight (bounded by ``timeout`` seconds) and stop."""


NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
_QUEUE_FAILED = Reply(451, "4.3.0", "Cannot queue the message, try again later")


class FreeSpace:
    """Free space in a spool's file system against a floor, read at most once a second.

    Args:
        path: a directory on the file system (the spool; it need not exist yet: its
            nearest existing parent is measured).
        min_free_space: bytes that must stay free.
    """

    def __init__(self, path: str | os.PathLike[str], min_free_space: int) -> None:
        self.path = Path(path)
        self.min_free_space = min_free_space
        self._free = 0
        self._free_at = -2.0

    def reply(self, size: int = 0) -> Reply | None:
        """``452 4.3.1`` (RFC 3463 X.3.1) when storing ``size`` more bytes would go below
        the floor; ``None`` otherwise. An unreadable file system counts as full."""
        if self.min_free_space <= 0:
            return None
        now = time.monotonic()
        if now - self._free_at > 1.0:
            where = self.path
            while not where.exists() and where.parent != where:
                where = where.parent
            try:
                st = os.statvfs(where)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = 0
            self._free_at = now
        if self._free - size < self.min_free_space:
            return NO_STORAGE
        return None


class QueueDelivery:
    """Accept messages into the spool for later delivery by a :class:`QueueManager`.

    Args:
        store: the spool.
        manager: the :class:`QueueScheduler` told about each committed message.
        min_free_space: bytes that must stay free in the spool's file system.
    """

    def __init__(
        self, store: QueueStore, manager: QueueScheduler, min_free_space: int = 0
    ) -> None:
        self.store = store
        self.manager = manager
        self.min_free_space = min_free_space
        self._space = FreeSpace(store.path, min_free_space)
        # Group commit: messages arriving while a commit runs are committed together.
        self._waiting: list[tuple[Envelope, Message, SessionInfo | None,
                                  asyncio.Future[QueueEntry]]] = []
        self._committer: asyncio.Task[None] | None = None

    def storage_reply(self, size: int = 0) -> Reply | None:
        """``452 4.3.1`` when storing ``size`` more bytes would go below the free-space floor."""
        return self._space.reply(size)

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Store durably; return ``250 2.0.0 Queued as ID`` only after the fsyncs.

        A long message (a :class:`~smtpgate.message.MessageFile`) is copied from its
        temporary file into the spool in pieces, in the commit thread.

        Raises:
            TemporaryDeliveryError: 452 4.3.1 (low disk) or 451 4.3.0 (write failed).
        """
        # The free-space reading may be up to a second old; a write that then fails
        # (ENOSPC) is refused with 451 4.3.0 and leaves nothing behind.
        low = self.storage_reply(len(message))
        if low is not None:
            raise TemporaryDeliveryError(low)
        fut: asyncio.Future[QueueEntry] = asyncio.get_running_loop().create_future()
        self._waiting.append((envelope, message, session, fut))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())
        try:
            entry = await fut
        except QueueError as exc:
            log.error("queue: %s", exc)
            raise TemporaryDeliveryError(_QUEUE_FAILED) from exc
        # Short messages are handed to an in-process delivery as they are (no re-read).
        self.manager.submit(entry, message if isinstance(message, bytes) else None)
        return Reply(250, "2.0.0", f"Queued as {entry.id}")

    async def _commit_loop(self) -> None:
        """Commit whatever is waiting, in batches, until nothing is left (group commit).

        Queue files of messages held in memory are written on the event loop (page-cache
        writes, a few syscalls each; a worker thread would cost more in hand-offs and
        GIL switches than the writes themselves); only the flush that makes the batch
        durable (``syncfs``/``fsync``) runs in a thread, so it never holds the loop. A
        batch with a long message (copied from its temporary file) or one that would
        wait for the commit lock (recovery running) is written in the thread too.
        """
        store = self.store
        while self._waiting:
            batch, self._waiting = self._waiting, []
            items = [(e, m, s, None) for e, m, s, _ in batch]
            try:
                pending = None
                if all(isinstance(m, bytes) for _, m, _, _ in items):
                    pending = store.write_batch(items, wait=False)
                if pending is None:
                    pending = await asyncio.to_thread(store.write_batch, items)
                assert pending is not None
                results = await asyncio.to_thread(store.flush_batch, pending)
            except Exception as exc:  # never leave a client waiting forever
                log.exception("queue: group commit failed")
                results = [QueueError(str(exc)) for _ in batch]
            for (_, _, _, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, QueueError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def aclose(self) -> None:
        """Stop the manager (deliveries in flight get a bounded time to finish)."""
        await self.manager.stop()

"""Maildir delivery: one durable file per accepted transaction.

Entry point: :class:`MaildirDelivery`. Maildir spec (cr.yp.to/proto/maildir.html): tmp/, fsync,
rename into new/, fsync new/; only then success (RFC 5321 §6.1).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time

from ..envelope import Envelope, SessionInfo
from ..errors import TemporaryDeliveryError
from ..message import Message, MessageFile
from ..reply import Reply

__all__ = ["MaildirDelivery"]

log = logging.getLogger("smtpgate.delivery.maildir")

#: The reply for any failure to store the message (disk full, permissions, ...).
STORE_FAILED = Reply(451, "4.3.0", "Could not store the message, try again later")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


def _host_part() -> str:
    """This host's name as the Maildir spec wants it (``/`` and ``:`` escaped)."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


class MaildirDelivery:
    """Deliver each transaction into a Maildir as one file in ``new/``.

    The file holds the message bytes exactly as given (CRLF line endings are
    kept). All file-system work runs in a worker thread (``asyncio.to_thread``).

    Args:
        path: the Maildir directory; ``tmp/``, ``new/`` and ``cur/`` are created
            (mode 0700) on first use if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._host = _host_part()
        self._ready = False

    def __repr__(self) -> str:
        return f"MaildirDelivery({self.path!r})"

    def ensure_dirs(self) -> None:
        """Create ``path`` and its ``tmp``/``new``/``cur`` subdirectories (mode 0700).

        Raises:
            OSError: a directory cannot be created.
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            try:
                os.mkdir(os.path.join(self.path, sub), mode=0o700)
            except FileExistsError:
                if not os.path.isdir(os.path.join(self.path, sub)):
                    raise
        self._ready = True

    def _unique_name(self) -> str:
        """``<sec>.M<usec>P<pid>Q<counter>.<host>`` (unique per Maildir spec)."""
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        with _counter_lock:
            count = next(_counter)
        return f"{sec}.M{usec}P{os.getpid()}Q{count}.{self._host}"

    def _store(self, message: Message) -> str:
        """Write, fsync and publish ``message``; return the file name (blocking; a
        :class:`~smtpgate.message.MessageFile` is copied in pieces)."""
        if not self._ready:
            self.ensure_dirs()
        tmp_dir = os.path.join(self.path, "tmp")
        new_dir = os.path.join(self.path, "new")
        while True:
            name = self._unique_name()
            tmp_path = os.path.join(tmp_dir, name)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            break
        try:
            try:
                if isinstance(message, MessageFile):
                    message.write_to(fd)
                else:
                    view = memoryview(message)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, os.path.join(new_dir, name))
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise
        dir_fd = os.open(new_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return name

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Store ``message`` as one new file in the Maildir.

        Args:
            envelope: the transaction (used for logging only).
            message: the complete message, stored byte-exact (bytes, or a
                :class:`~smtpgate.message.MessageFile` copied in pieces).
            session: the SMTP session, for logging.

        Returns:
            ``250 2.0.0 Message stored as <file name>`` once the file and the
            ``new/`` directory are fsynced.

        Raises:
            TemporaryDeliveryError: 451 4.3.0 when the file cannot be written
                (disk full, permissions, ...); no partial file is left in ``tmp/``.
        """
        try:
            name = await asyncio.to_thread(self._store, message)
        except (OSError, ValueError) as exc:
            log.error("maildir %s: cannot store message: %s", self.path, exc)
            raise TemporaryDeliveryError(STORE_FAILED, f"maildir write failed: {exc}") from exc
        sid = session.session_id if session else "-"
        log.info(
            "session=%s stored %d bytes from=%r rcpts=%d as %s",
            sid,
            len(message),
            envelope.mail_from,
            len(envelope.rcpt_to),
            name,
        )
        return Reply(250, "2.0.0", f"Message stored as {name}")

    async def aclose(self) -> None:
        """Nothing to release (present for the ``Delivery`` protocol)."""

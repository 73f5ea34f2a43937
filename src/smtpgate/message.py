"""A message's bytes, in memory or in a file: what plugins read and deliveries send.

Entry points: :class:`MessageFile` (a message, or a view of one, read from a file descriptor in
pieces), :data:`Message` (``bytes | MessageFile``), :class:`MessageSpool` (an anonymous
temporary file a long message is written to while it arrives). A large message therefore
never has to be in memory: it is written as it arrives, and read again piece by piece by
whoever needs it (RFC 5321 §4.5.3.1.7 lets a server take messages far larger than memory).
"""

from __future__ import annotations

import os
import re
import tempfile
import zlib
from collections.abc import Iterator

__all__ = ["DATA_CHUNK", "Message", "MessageFile", "MessageSpool"]

#: Bytes read from a message file at a time (spool reads, DATA pieces, scanners).
DATA_CHUNK = 1 << 18


class MessageFile:
    """A message whose bytes are ``prefix`` followed by a region of a file.

    Reading never holds more than ``chunk_size`` bytes of the file region in memory
    (:meth:`chunks`); :meth:`read` loads the whole message and keeps it until
    :meth:`close`. Reads use ``os.pread``, so several views of one descriptor can be
    read independently, and a file unlinked meanwhile stays readable.

    Args:
        fd: an open, readable file descriptor.
        size: the length of the file region in bytes (``prefix`` not counted).
        prefix: bytes that come before the file region (e.g. a trace header, or a
            header block that plugins changed).
        offset: where the region starts in the file, in bytes.
        owner: whether :meth:`close` closes ``fd`` (a view made by :meth:`view` never
            owns the descriptor).
    """

    __slots__ = ("_data", "fd", "offset", "owner", "prefix", "region")

    def __init__(
        self, fd: int, size: int, *, prefix: bytes = b"", offset: int = 0, owner: bool = True
    ) -> None:
        self.fd = fd
        self.region = size
        self.prefix = prefix
        self.offset = offset
        self.owner = owner
        self._data: bytes | None = None

    @property
    def size(self) -> int:
        """The message's length in bytes: the prefix plus the file region."""
        return len(self.prefix) + self.region

    def view(self, prefix: bytes = b"", skip: int = 0) -> MessageFile:
        """A message made of ``prefix`` and this one's file region after its first
        ``skip`` bytes; it shares (and never closes) the descriptor.

        Raises:
            ValueError: ``skip`` is outside the file region.
        """
        if not 0 <= skip <= self.region:
            raise ValueError(f"skip {skip} outside a region of {self.region} bytes")
        return MessageFile(self.fd, self.region - skip, prefix=prefix,
                           offset=self.offset + skip, owner=False)

    def __len__(self) -> int:
        return self.size

    def region_chunks(self, chunk_size: int = DATA_CHUNK, start: int = 0) -> Iterator[bytes]:
        """The file region from ``start`` (bytes into the region) in pieces of at most
        ``chunk_size`` bytes (blocking reads).

        Raises:
            OSError: read error; ValueError: the file is shorter than the region.
        """
        pos = self.offset + start
        end = self.offset + self.region
        while pos < end:
            chunk = os.pread(self.fd, min(chunk_size, end - pos), pos)
            if not chunk:
                raise ValueError("message file shorter than its recorded size")
            pos += len(chunk)
            yield chunk

    def chunks(self, chunk_size: int = DATA_CHUNK) -> Iterator[bytes]:
        """The message (prefix, then the file region) in pieces of at most ``chunk_size``
        bytes; the prefix is one piece of its own when not empty.

        Raises:
            OSError: read error; ValueError: the file is shorter than the region.
        """
        if self._data is not None:
            view = memoryview(self._data)
            for i in range(0, len(self._data), chunk_size):
                yield bytes(view[i : i + chunk_size])
            return
        if self.prefix:
            yield self.prefix
        yield from self.region_chunks(chunk_size)

    def read(self) -> bytes:
        """The whole message (read once, then kept until :meth:`close`)."""
        if self._data is None:
            self._data = b"".join(self.chunks())
        return self._data

    def crc32(self) -> int:
        """CRC-32 of the message, computed in pieces."""
        crc = 0
        for chunk in self.chunks():
            crc = zlib.crc32(chunk, crc)
        return crc

    def header_isascii(self) -> bool:
        """True when the header section (up to the first empty line) is ASCII."""
        carry = b""
        for chunk in self.chunks():
            buf = carry + chunk
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[:end].isascii()
            if not buf.isascii():
                return False
            carry = buf[-3:]
        return True

    def search(self, pattern: re.Pattern[bytes]) -> bool:
        """True when ``pattern`` (matching at most 2 bytes, with look-around of 1)
        occurs in the message."""
        carry = b""
        for chunk in self.chunks():
            buf = carry + chunk
            if pattern.search(buf):
                return True
            carry = buf[-2:]
        return False

    def write_to(self, fd: int) -> int:
        """Write the whole message to the file descriptor ``fd`` in pieces; returns the
        bytes written.

        Raises:
            OSError: a read or write failed; ValueError: the file region is short.
        """
        total = 0
        for chunk in self.chunks():
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                total += n
        return total

    def close(self) -> None:
        """Drop any loaded copy; close the descriptor if this object owns it. Idempotent."""
        self._data = None
        if self.owner and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


Message = bytes | MessageFile
"""A message to store or send: its bytes, or a :class:`MessageFile` read from disk."""


class MessageSpool:
    """An anonymous temporary file a long message is written to while it arrives.

    The file has no name (``O_TMPFILE``, or created and unlinked at once), so nothing is
    left behind by a crash. Written with blocking ``write(2)`` calls of at most a DATA
    piece: page-cache writes, like Postfix's ``cleanup`` writing its queue file.

    Args:
        directory: where the file lives (the spool's ``tmp/`` in queue mode, so it is on
            the spool's file system; else the system's temporary directory).

    Raises:
        OSError: the file cannot be created.
    """

    __slots__ = ("fd", "size")

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        handle = tempfile.TemporaryFile(dir=directory, buffering=0)
        # Keep the descriptor, drop the Python file object without closing it.
        self.fd = os.dup(handle.fileno())
        handle.close()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` to the file.

        Raises:
            OSError: the write failed (disk full, I/O error).
        """
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def message(self) -> MessageFile:
        """The message written so far as a :class:`MessageFile` owning the descriptor
        (this spool must not be used or closed afterwards)."""
        msg = MessageFile(self.fd, self.size)
        self.fd = -1
        return msg

    def close(self) -> None:
        """Discard the file (when :meth:`message` was not called). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

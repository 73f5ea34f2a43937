"""ClamAV ``clamd`` client: INSTREAM scans, PING and VERSION over TCP or a Unix socket.

Entry point: :class:`ClamdScanner` (``scan``, ``ping``, ``version``).
Protocol: clamd(8) "COMMANDS" (``z``-prefixed, NUL-terminated commands; INSTREAM chunks
``<uint32 BE length><bytes>`` ended by a zero-length chunk); see docs/design protocols.md.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

from ..envelope import Envelope, SessionInfo
from ..errors import ScannerError, ScannerTimeout, ScannerUnavailable
from .base import Kind, ScanResult, parse_scanner_address

log = logging.getLogger("smtpgate.scanners.clamd")

#: Bytes per INSTREAM chunk (clamd accepts any size up to StreamMaxLength).
CHUNK_SIZE = 64 * 1024
#: Upper bound on one reply (a reply is one short status line).
MAX_REPLY = 64 * 1024


class ClamdScanner:
    """Client for one clamd daemon (ClamAV), one connection per command.

    The implementation is our own: the asyncio client on PyPI (``aioclamd`` 1.1) speaks
    TCP only (no Unix sockets) and ships no type hints, and the protocol is a handful of
    bytes (clamd(8) "COMMANDS").

    Args:
        address: ``host:port``, ``[v6]:port`` or ``unix:/path`` (see
            :func:`~smtpgate.scanners.base.parse_scanner_address`).
        timeout: seconds allowed for one whole exchange (connect, send, verdict).
        max_size: messages larger than this many bytes are not sent (verdict ``"skipped"``);
            keep it at or below clamd's ``StreamMaxLength``.

    Raises:
        ValueError: ``address`` is malformed, or ``timeout``/``max_size`` not positive.
    """

    name: str = "clamav"
    kind: Kind = "virus"

    def __init__(self, address: str, *, timeout: float = 30.0, max_size: int = 26214400) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size!r}")
        self.address = address
        self._target = parse_scanner_address(address)
        self.timeout = float(timeout)
        self.max_size = int(max_size)

    def __repr__(self) -> str:
        return f"ClamdScanner({self.address!r}, timeout={self.timeout:g}, max_size={self.max_size})"

    async def scan(
        self,
        message: bytes,
        *,
        envelope: Envelope | None = None,
        session: SessionInfo | None = None,
        user: str | None = None,
    ) -> ScanResult:
        """Scan ``message`` with ``zINSTREAM`` (clamd(8) "INSTREAM").

        Args:
            message: the message bytes (clamd decodes MIME and archives itself).
            envelope: unused (clamd scans content only).
            session: unused.
            user: unused.

        Returns:
            ``verdict="clean"`` for ``stream: OK``; ``"infected"`` with ``symbols`` = the
            signature names for ``stream: <Name> FOUND``; ``"skipped"`` when
            ``len(message) > max_size`` (nothing is sent).

        Raises:
            ScannerUnavailable: cannot connect, or clamd closed without answering.
            ScannerTimeout: no verdict within ``timeout`` seconds.
            ScannerError: an ``... ERROR`` reply (e.g. ``INSTREAM size limit exceeded``)
                or an unparseable reply.
        """
        size = len(message)
        if size > self.max_size:
            log.info(
                "clamav: message of %d bytes over max_size %d, not scanned", size, self.max_size
            )
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="skipped",
                detail=f"message size {size} > max_size {self.max_size}",
            )
        started = time.monotonic()
        replies = await self._command(b"INSTREAM", payload=message)
        elapsed = time.monotonic() - started
        found: list[str] = []
        for reply in replies:
            status, name = _parse_scan_reply(reply)
            if status == "ERROR":
                raise ScannerError(f"clamav: {reply}")
            if status == "FOUND" and name not in found:
                found.append(name)
        log.debug("clamav: %d bytes -> %s in %.3fs", size, " | ".join(replies), elapsed)
        if found:
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="infected",
                symbols=tuple(found),
                detail=", ".join(found),
                elapsed=elapsed,
            )
        return ScanResult(
            scanner=self.name, kind=self.kind, verdict="clean", detail="OK", elapsed=elapsed
        )

    async def ping(self) -> bool:
        """Check the daemon with ``zPING`` (clamd(8) "PING").

        Returns:
            True when clamd answered ``PONG`` within ``timeout``; False on any failure
            (unreachable, timeout, other answer). Never raises :class:`ScannerError`.
        """
        try:
            replies = await self._command(b"PING")
        except ScannerError as exc:
            log.debug("clamav: PING failed: %s", exc)
            return False
        return replies == ["PONG"]

    async def version(self) -> str:
        """The daemon's ``zVERSION`` answer (clamd(8) "VERSION").

        Returns:
            e.g. ``"ClamAV 1.4.6/27465/Sun Nov 22 08:00:00 2026"`` (engine/database
            version/database date; only ``"ClamAV 1.4.6"`` without official databases).

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: as for :meth:`scan`.
        """
        replies = await self._command(b"VERSION")
        if not replies or not replies[0] or replies[0].endswith("ERROR"):
            raise ScannerError(f"clamav: unexpected VERSION reply {replies!r}")
        return replies[0]

    async def _command(self, command: bytes, payload: bytes | None = None) -> list[str]:
        """Send one ``z``-command (with INSTREAM ``payload``) and collect its replies.

        Works on a raw non-blocking socket rather than asyncio streams: when clamd stops
        an upload early (``INSTREAM size limit exceeded. ERROR``, then it closes), the
        upload fails with EPIPE/ECONNRESET, and a stream transport would then discard the
        reply still queued in the kernel. Replies are read concurrently with the upload;
        clamd closes the connection after every non-session command, so they are read
        until EOF. If the deadline passes after at least one complete reply, those
        replies are used.

        Returns:
            the NUL-terminated reply strings, terminators stripped, in order.

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: see :meth:`scan`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        sock = await _connect(self._target, self.timeout, self.name)
        replies: list[str] = []
        reading = asyncio.ensure_future(_read_replies(loop, sock, replies))
        verb = command.decode()
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await _send(loop, sock, command, payload, reading)
                    await asyncio.shield(reading)
            except TimeoutError as exc:
                if not replies:
                    raise ScannerTimeout(
                        f"clamav: no answer to {verb} within {self.timeout:g}s"
                    ) from exc
                log.warning("clamav: %s: no EOF after the reply, closing", verb)
            except OSError as exc:
                if not replies:
                    raise ScannerUnavailable(
                        f"clamav: connection lost during {verb}: {exc}"
                    ) from exc
            if not replies:
                raise ScannerUnavailable(f"clamav: connection closed without a reply to {verb}")
            return replies
        finally:
            if not reading.done():
                reading.cancel()
                await asyncio.wait([reading])
            sock.close()


async def _connect(target: tuple[str, int] | str, timeout: float, name: str) -> socket.socket:
    """Open a non-blocking stream socket to ``target`` within ``timeout`` seconds.

    Same contract as :func:`~smtpgate.scanners.base.open_scanner_connection`, but yields
    the bare socket (see :meth:`ClamdScanner._command`).

    Raises:
        ScannerUnavailable: refused, socket missing, name resolution failed.
        ScannerTimeout: not connected within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    where = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
    try:
        async with asyncio.timeout(timeout):
            if isinstance(target, str):
                candidates: list[tuple[int, int, int, str | tuple[Any, ...]]] = [
                    (socket.AF_UNIX, socket.SOCK_STREAM, 0, target)
                ]
            else:
                infos = await loop.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM)
                candidates = [(fam, typ, proto, addr) for fam, typ, proto, _, addr in infos]
            last: OSError = OSError(f"no address for {where}")
            for family, type_, proto, addr in candidates:
                sock = socket.socket(family, type_, proto)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, addr)
                    return sock
                except TimeoutError:
                    sock.close()
                    raise
                except OSError as exc:
                    sock.close()
                    last = exc
                except BaseException:
                    sock.close()
                    raise
            raise last
    except TimeoutError as exc:
        raise ScannerTimeout(f"{name}: connect to {where} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise ScannerUnavailable(f"{name}: cannot connect to {where}: {exc}") from exc


async def _send(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    command: bytes,
    payload: bytes | None,
    reading: asyncio.Future[None],
) -> None:
    """Write ``z<command>\\0`` and, for INSTREAM, the chunked payload and end marker.

    Stops quietly when clamd has already answered or closed the connection (the reply,
    or its absence, is judged by the caller).
    """
    try:
        await loop.sock_sendall(sock, b"z" + command + b"\0")
        if payload is None:
            return
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK_SIZE):
            if reading.done():
                return
            chunk = view[start : start + CHUNK_SIZE]
            await loop.sock_sendall(sock, struct.pack("!I", len(chunk)) + chunk)
        await loop.sock_sendall(sock, b"\0\0\0\0")
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise
        log.debug("clamav: upload stopped: %s", exc)


async def _read_replies(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, replies: list[str]
) -> None:
    """Append each NUL-terminated reply to ``replies`` until EOF.

    A final reply without its terminator is kept; newline terminators are tolerated.

    Raises:
        ScannerError: more than :data:`MAX_REPLY` bytes.
        OSError: the connection failed (the caller keeps replies already read).
    """
    buf = b""
    total = 0
    while True:
        data = await loop.sock_recv(sock, 4096)
        total += len(data)
        if total > MAX_REPLY:
            raise ScannerError("clamav: reply too long")
        buf += data
        *complete, buf = buf.split(b"\0")
        for raw in complete:
            text = raw.decode("utf-8", "replace").strip("\r\n")
            if text:
                replies.append(text)
        if not data:
            text = buf.decode("utf-8", "replace").strip("\r\n")
            if text:
                replies.append(text)
            return


def _parse_scan_reply(reply: str) -> tuple[str, str]:
    """Classify one INSTREAM reply line.

    Returns:
        ``("OK", "")``, ``("FOUND", <signature>)`` or ``("ERROR", <text>)``.

    Raises:
        ScannerError: the line is none of these.
    """
    text = reply
    if text.startswith("stream:"):
        text = text[len("stream:") :].strip()
    if text == "OK":
        return "OK", ""
    if text.endswith(" FOUND"):
        name = text[: -len(" FOUND")].strip()
        if name:
            return "FOUND", name
    if text.endswith("ERROR"):
        return "ERROR", text
    raise ScannerError(f"clamav: unexpected reply {reply!r}")

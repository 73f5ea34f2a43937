"""One SMTP session over standard input/output: ZMailer's -i (BSMTP batch), -n (inetd)
and -T (policy test) run modes.

Entry point: :func:`run_stdio_session`. The session is the same :class:`Session` the
listeners run (same core, hooks, policy, delivery); only the transport differs:

* ``inetd`` — stdin is a connected socket (inetd/systemd socket activation with
  ``Accept=yes``): the session runs on it directly.
* otherwise (BSMTP, policy test) — stdin is a regular file, a pipe or a terminal: a
  thread reads it with :func:`os.read` (which works for all three, unlike asyncio's pipe
  transport, which refuses regular files), a socket pair connects it to the session, the
  replies are copied to stdout, and the end of stdin ends the input like a client
  half-closing its connection.

What the session ended with — refused commands, a batch cut off inside a transaction — is
returned as a :class:`StdioOutcome`, so that ``smtpgate bsmtp`` can exit non-zero and say
why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .context import ServerContext
from .listener import SmtpServer
from .session import Session

log = logging.getLogger("smtpgate.stdio")

__all__ = ["StdioOutcome", "run_stdio_session"]

_CHUNK = 65536
_MAX_PENDING = 1 << 20  # bytes without LF held back for the LF -> CRLF conversion


@dataclass(slots=True)
class StdioOutcome:
    """How a stdin/stdout session ended.

    Attributes:
        refused: the final line of every 4xx/5xx reply sent, in order
            (``"550 5.7.1 Relaying denied"``).
        cut_off: ``""``, or where the input ended inside a transaction:
            ``"inside DATA"`` (message text, no final ``.``), ``"inside BDAT"``, or
            ``"inside a transaction"`` (after MAIL, before DATA). The message of that
            transaction was not delivered.
    """

    refused: list[str] = field(default_factory=list)
    cut_off: str = ""

    @property
    def problem(self) -> str:
        """One line saying what went wrong (``""`` when nothing did)."""
        parts: list[str] = []
        if self.cut_off:
            parts.append(f"input ended {self.cut_off}: that message was not delivered")
        if self.refused:
            first = self.refused[0]
            more = f" (first: {first})" if len(self.refused) > 1 else f": {first}"
            parts.append(f"{len(self.refused)} command(s) refused{more}")
        return "; ".join(parts)


async def run_stdio_session(
    ctx: ServerContext,
    *,
    inetd: bool = False,
    client_ip: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    crlf: bool = True,
) -> StdioOutcome:
    """Run one session on stdin/stdout and return when it ends.

    Args:
        ctx: the session context (listener settings) to use.
        inetd: stdin is a connected socket (inetd mode, ZMailer -n).
        client_ip: pretend the client has this address (policy test, ZMailer -T).
        stdin_fd / stdout_fd: file descriptors (for tests).
        crlf: turn bare LF line ends read from stdin into CRLF (a terminal or a batch
            file written with LF); BSMTP batches with CRLF pass unchanged.

    Returns:
        The :class:`StdioOutcome`.

    Raises:
        OSError: in inetd mode, stdin is not a socket (``ENOTSOCK``).
    """
    loop = asyncio.get_running_loop()
    outcome = StdioOutcome()
    server = SmtpServer([], max_connections=1, max_connections_per_ip=1)
    if client_ip:
        ctx.forced_peer_ip = client_ip
    if inetd:
        if not stat.S_ISSOCK(os.fstat(stdin_fd).st_mode):
            import errno

            raise OSError(errno.ENOTSOCK, "inetd mode: standard input is not a socket")
        sock = socket.socket(fileno=os.dup(stdin_fd))
        transport, session = await loop.connect_accepted_socket(
            lambda: Session(server, ctx), sock=sock
        )
        await _wait_session(session)
        _note_end(session, outcome)
        return outcome
    ours, theirs = socket.socketpair()
    transport, session = await loop.connect_accepted_socket(
        lambda: Session(server, ctx), sock=theirs
    )
    ours.setblocking(False)
    pump_in = asyncio.create_task(_stdin_to_socket(loop, stdin_fd, ours, crlf))
    pump_out = asyncio.create_task(_socket_to_stdout(loop, ours, stdout_fd, outcome))
    try:
        await _wait_session(session)
        await asyncio.wait_for(pump_out, 10.0)
    finally:
        pump_in.cancel()
        pump_out.cancel()
        await asyncio.gather(pump_in, pump_out, return_exceptions=True)
        ours.close()
    _note_end(session, outcome)
    return outcome


def _note_end(session: Any, outcome: StdioOutcome) -> None:
    """Record whether the input ended inside a transaction (RFC 5321 §3.3: no delivery)."""
    conn = getattr(session, "conn", None)
    if conn is None or not getattr(conn, "in_transaction", False):
        return
    state = getattr(getattr(conn, "state", None), "value", "")
    if state == "DATA":
        outcome.cut_off = "inside DATA"
    elif state == "BDAT" or getattr(conn, "in_data", False):
        outcome.cut_off = "inside BDAT"
    else:
        outcome.cut_off = "inside a transaction"


async def _wait_session(session: Any) -> None:
    for _ in range(100):
        if session.task is not None:
            break
        await asyncio.sleep(0.01)
    if session.task is not None:
        await session.task


def _reader_thread(fd: int, loop: asyncio.AbstractEventLoop,
                   queue: asyncio.Queue[bytes | BaseException]) -> None:
    """Read ``fd`` with blocking :func:`os.read` (file, pipe or terminal) into ``queue``.

    A daemon thread: a terminal read still blocked when the session ends does not keep
    the process alive. ``b""`` (end of input) or the OSError ends the stream.
    """
    try:
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except InterruptedError:
                continue
            except OSError as exc:
                item: bytes | BaseException = exc
            else:
                item = chunk
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                return
            if not isinstance(item, bytes) or not item:
                return
    finally:
        os.close(fd)


async def _stdin_to_socket(loop: asyncio.AbstractEventLoop, fd: int, sock: socket.socket,
                           crlf: bool) -> None:
    queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
    thread = threading.Thread(target=_reader_thread, args=(os.dup(fd), loop, queue),
                              name="smtpgate-stdin", daemon=True)
    thread.start()
    pending = b""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                log.error("cannot read standard input: %s", item)
                break
            if not item:
                break
            if crlf:
                data = pending + item
                cut = data.rfind(b"\n") + 1
                pending = data[cut:]
                chunk = _lf_to_crlf(data[:cut])
                if len(pending) > _MAX_PENDING:  # no line end for long: pass it on as is
                    chunk, pending = chunk + pending, b""
            else:
                chunk = item
            if chunk:
                await loop.sock_sendall(sock, chunk)
        if pending:
            await loop.sock_sendall(sock, pending)
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _lf_to_crlf(lines: bytes) -> bytes:
    """Complete lines: a line ending in a bare LF gets CRLF; CRLF lines pass unchanged."""
    if b"\n" not in lines:
        return lines
    out = [line if line.endswith(b"\r") else line + b"\r"
           for line in lines.split(b"\n")[:-1]]
    return b"\n".join(out) + b"\n"


async def _socket_to_stdout(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            fd: int, outcome: StdioOutcome) -> None:
    partial = b""
    while True:
        try:
            data = await loop.sock_recv(sock, _CHUNK)
        except (ConnectionError, OSError):
            break
        if not data:
            break
        partial = _note_replies(partial + data, outcome)
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            view = view[n:]
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _note_replies(data: bytes, outcome: StdioOutcome) -> bytes:
    """Record the final line of each 4xx/5xx reply in ``data``; return the unfinished tail."""
    *lines, rest = data.split(b"\r\n")
    for line in lines:
        if len(line) >= 3 and line[:3].isdigit() and line[3:4] in (b" ", b"") \
                and line[:1] in (b"4", b"5"):
            outcome.refused.append(line.decode("utf-8", "replace"))
    return rest

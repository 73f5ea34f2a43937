"""One SMTP session over standard input/output: ZMailer's -i (BSMTP batch), -n (inetd)
and -T (policy test) run modes.

Entry point: :func:`run_stdio_session`. The session is the same :class:`Session` the
listeners run (same core, hooks, policy, delivery); only the transport differs:

* ``inetd`` — stdin is a connected socket (inetd/systemd socket activation with
  ``Accept=yes``): the session runs on it directly.
* otherwise (BSMTP, policy test) — stdin/stdout are pipes or a terminal: a socket pair
  connects them to the session, bytes are pumped both ways, and a closed stdin ends the
  input like a client half-closing its connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any

from .context import ServerContext
from .listener import SmtpServer
from .session import Session

log = logging.getLogger("smtpgate.stdio")


async def run_stdio_session(
    ctx: ServerContext,
    *,
    inetd: bool = False,
    client_ip: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    crlf: bool = True,
) -> None:
    """Run one session on stdin/stdout and return when it ends.

    Args:
        ctx: the session context (listener settings) to use.
        inetd: stdin is a connected socket (inetd mode, ZMailer -n).
        client_ip: pretend the client has this address (policy test, ZMailer -T).
        stdin_fd / stdout_fd: file descriptors (for tests).
        crlf: turn bare LF line ends read from stdin into CRLF (a terminal or a batch
            file written with LF); BSMTP batches with CRLF pass unchanged.

    Raises:
        OSError: stdin is not a socket in inetd mode.
    """
    loop = asyncio.get_running_loop()
    server = SmtpServer([], max_connections=1, max_connections_per_ip=1)
    if client_ip:
        ctx.forced_peer_ip = client_ip
    if inetd:
        sock = socket.socket(fileno=os.dup(stdin_fd))
        transport, session = await loop.connect_accepted_socket(
            lambda: Session(server, ctx), sock=sock
        )
        await _wait_session(session)
        return
    ours, theirs = socket.socketpair()
    transport, session = await loop.connect_accepted_socket(
        lambda: Session(server, ctx), sock=theirs
    )
    ours.setblocking(False)
    pump_in = asyncio.create_task(_stdin_to_socket(loop, stdin_fd, ours, crlf))
    pump_out = asyncio.create_task(_socket_to_stdout(loop, ours, stdout_fd))
    try:
        await _wait_session(session)
        await asyncio.wait_for(pump_out, 10.0)
    finally:
        pump_in.cancel()
        pump_out.cancel()
        await asyncio.gather(pump_in, pump_out, return_exceptions=True)
        ours.close()


async def _wait_session(session: Any) -> None:
    for _ in range(100):
        if session.task is not None:
            break
        await asyncio.sleep(0.01)
    if session.task is not None:
        await session.task


async def _stdin_to_socket(loop: asyncio.AbstractEventLoop, fd: int, sock: socket.socket,
                           crlf: bool) -> None:
    reader = asyncio.StreamReader(limit=1 << 20)
    proto = asyncio.StreamReaderProtocol(reader)
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        await loop.connect_read_pipe(lambda: proto, pipe)
        reading_lines = crlf
        while True:
            if reading_lines:
                chunk = await reader.readline()
            else:
                chunk = await reader.read(65536)
            if not chunk:
                break
            if reading_lines and chunk.endswith(b"\n") and not chunk.endswith(b"\r\n"):
                chunk = chunk[:-1] + b"\r\n"
            await loop.sock_sendall(sock, chunk)
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


async def _socket_to_stdout(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            fd: int) -> None:
    while True:
        try:
            data = await loop.sock_recv(sock, 65536)
        except (ConnectionError, OSError):
            break
        if not data:
            break
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

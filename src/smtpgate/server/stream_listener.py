"""A TCP listener that runs one coroutine per connection (asyncio streams), for the
listeners that serve an MTA rather than SMTP clients: the milter and policy listeners.

Entry point: :class:`StreamListener`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

__all__ = ["ConnectionHandler", "StreamListener"]

log = logging.getLogger("smtpgate.server")

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Serves one connection; it need not close the writer (the listener does)."""


class StreamListener:
    """Listen on ``host:port`` and serve each connection with ``handler``.

    Args:
        what: what it serves, for the log (``"milter"``).
        host / port: where to listen (port 0: any free port; IPv6 without brackets).
        handler: the coroutine serving one connection.
        reuse_port: bind with ``SO_REUSEPORT`` (``server.workers > 1``).
    """

    def __init__(self, what: str, host: str, port: int, handler: ConnectionHandler, *,
                 reuse_port: bool = False) -> None:
        self.what = what
        self.host = host
        self.port = port
        self.handler = handler
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True,
            reuse_port=self.reuse_port or None,
            family=socket.AF_INET6 if ":" in self.host else socket.AF_UNSPEC)
        log.info("%s listener on %s:%d", self.what, *self.address)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``.

        Raises:
            RuntimeError: not started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"the {self.what} listener is not started")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except Exception:  # a handler's bug must not take the listener down
            log.exception("%s connection failed", self.what)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        """Stop listening and end the connections in progress."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

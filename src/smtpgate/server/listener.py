"""Listeners and connection admission: one asyncio server per listen address.

Entry point: :class:`SmtpServer` (``start``, ``close``, ``sockets``). Enforces the
total and per-client-IP connection limits (421 4.7.0 beyond them; clients in
``server.limit_exceptions`` are exempt from the per-IP limit) and the graceful
shutdown bound: idle sessions get 421 4.3.2 at once, sessions with a transaction in
flight may finish it within ``shutdown_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from ..net import client_key
from ..reply import R, Reply
from .admission import Admission, AdmissionKind
from .context import ServerContext
from .session import Session

log = logging.getLogger("smtpgate.server")


class SmtpServer:
    """Accepts SMTP connections on several addresses and runs a :class:`Session` for each.

    Args:
        listeners: ``(host, port, context)`` triples, one per listener; port 0 picks a
            free port (see :attr:`bound_addresses`). IPv6 hosts are given without
            brackets. Each listener's context carries its protocol (SMTP/LMTP), TLS mode
            and PROXY-protocol settings.
        max_connections: total concurrent sessions.
        max_connections_per_ip: concurrent sessions per client IP.
        backlog: listen(2) queue length.
        reuse_port: bind with ``SO_REUSEPORT`` so that several worker processes
            listen on the same addresses (``server.workers > 1``; the kernel spreads
            the connections among them). The limits above then count per process.
    """

    def __init__(
        self,
        listeners: Sequence[tuple[str, int, ServerContext]],
        *,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        backlog: int = 1024,
        rcvbuf: int = 0,
        sndbuf: int = 0,
        reuse_port: bool = False,
    ) -> None:
        self.listeners = list(listeners)
        self.reuse_port = reuse_port
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.backlog = backlog
        self.sessions: set[Session] = set()
        self._per_ip: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._closing = False

    async def start(self) -> None:
        """Bind every address and start accepting.

        Raises:
            OSError: when an address cannot be bound (in use, no such interface);
                listeners already bound are closed first.
        """
        loop = asyncio.get_running_loop()
        try:
            for index, (host, port, _ctx) in enumerate(self.listeners):
                server = await loop.create_server(
                    lambda index=index: Session(self, self.listeners[index][2]),
                    host=host,
                    port=port,
                    backlog=self.backlog,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                    family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    if self.rcvbuf:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                    if self.sndbuf:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
                    log.info("listening on %s", _fmt(sock.getsockname()))
        except OSError:
            await self._close_listeners()
            raise

    def replace_contexts(self, contexts: Sequence[ServerContext]) -> None:
        """Give new sessions new settings (configuration reload); one context per
        listener, in the order given at construction. Sessions already running keep
        the context they started with.

        Raises:
            ValueError: not one context per listener.
        """
        if len(contexts) != len(self.listeners):
            raise ValueError(f"{len(contexts)} contexts for {len(self.listeners)} listeners")
        self.listeners = [(host, port, ctx) for (host, port, _), ctx
                          in zip(self.listeners, contexts, strict=True)]

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs actually bound (useful with port 0)."""
        out: list[tuple[str, int]] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    def admit(
        self, session: Session, ip: str, *, per_ip: bool = True, exempt: bool = False
    ) -> Admission:
        """Judge a new connection, ZMailer style, and count it unless it is dropped.

        At the limits (``max_connections``, ``max_connections_per_ip``) the client gets
        ``421 4.7.0`` and the connection is closed; a refused connection still holds its
        slot until it is closed (as ZMailer's children did), so a flood from one address
        reaches 4x the per-IP limit (or the total limit + 100), past which connections
        are closed silently.

        Args:
            session: the new session (kept in :attr:`sessions` while counted).
            ip: the client address as the socket reports it.
            per_ip: False skips the per-IP limit and the per-IP drop (a trusted PROXY
                sender: the real client is judged by :meth:`rebind`).
            exempt: a client in ``server.limit_exceptions`` (Postfix
                ``smtpd_client_event_limit_exceptions``): no per-IP limit and no flood
                escalation; it is never closed silently, and at the total limit it
                gets 421 like anyone.

        Returns:
            An :class:`~smtpgate.server.admission.Admission`; unless its kind is
            ``DROP`` the connection is counted and must be released with
            :meth:`release`.
        """
        key = client_key(ip)
        n = self._per_ip.get(key, 0) + 1
        total = len(self.sessions) + 1
        if self._closing:
            return self._count(session, key, n, AdmissionKind.REFUSE, R.SHUTDOWN, total)
        check_ip = per_ip and not exempt
        if not exempt and (
            (check_ip and n > 4 * self.max_connections_per_ip)
            or total > self.max_connections + 100
        ):
            return Admission(AdmissionKind.DROP, None, total - 1, n - 1)
        if total > self.max_connections:
            return self._count(
                session, key, n, AdmissionKind.REFUSE, R.TOO_MANY_CONNECTIONS, total
            )
        if check_ip and n > self.max_connections_per_ip:
            return self._count(session, key, n, AdmissionKind.REFUSE, R.TOO_MANY_FROM_IP, total)
        return self._count(session, key, n, AdmissionKind.ACCEPT, None, total)

    def _count(
        self, session: Session, key: str, n: int, kind: AdmissionKind, reply: Reply | None,
        total: int,
    ) -> Admission:
        self._per_ip[key] = n
        self.sessions.add(session)
        return Admission(kind, reply, total, n)

    def rebind(
        self, session: Session, old_ip: str, new_ip: str, *, exempt: bool = False
    ) -> Reply | None:
        """Move a connection's per-IP count to the client address a PROXY header reported.

        Args:
            exempt: the real client is in ``server.limit_exceptions`` (no per-IP limit).

        Returns:
            The 421 reply when the real client is over its per-IP limit (the
            connection's count is then kept under ``old_ip`` until it is released),
            else None.
        """
        old_key, new_key = client_key(old_ip), client_key(new_ip)
        if old_key == new_key:
            return None
        n = self._per_ip.get(new_key, 0)
        if not exempt and n >= self.max_connections_per_ip:
            return R.TOO_MANY_FROM_IP
        self._per_ip[new_key] = n + 1
        left = self._per_ip.get(old_key, 0) - 1
        if left > 0:
            self._per_ip[old_key] = left
        else:
            self._per_ip.pop(old_key, None)
        return None

    def release(self, session: Session, ip: str) -> None:
        """Forget a connection counted by :meth:`admit` (under ``ip``, after any rebind)."""
        self.sessions.discard(session)
        key = client_key(ip)
        n = self._per_ip.get(key, 0) - 1
        if n > 0:
            self._per_ip[key] = n
        else:
            self._per_ip.pop(key, None)

    async def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def close(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: stop accepting, let transactions in flight finish.

        Args:
            timeout: seconds to wait for sessions with a transaction in flight;
                sessions still running then are ended with 421 4.3.2.
        """
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = []
        for session in list(self.sessions):
            session.shutdown()
            if session.task is not None:
                tasks.append(session.task)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for session in list(self.sessions):
                session.abort()
            if pending:
                log.warning("shutdown: %d session(s) cut off after %.1fs", len(pending), timeout)
                await asyncio.wait(pending, timeout=5.0)
        # Server.wait_closed() also waits for connections; the sessions are gone by now.
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 5.0)
            except TimeoutError:
                pass
        self._servers.clear()


def _fmt(name: tuple[object, ...] | str) -> str:
    if isinstance(name, tuple):
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return str(name)

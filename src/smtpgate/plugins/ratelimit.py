"""Shipped plugin ``ratelimit``: connections, messages and recipients per client address,
per authenticated user and per sender, in a sliding window (Postfix anvil's
``smtpd_client_connection_rate_limit``, ``smtpd_client_message_rate_limit``,
``smtpd_client_recipient_rate_limit``).

Entry point: :func:`register`. Each limit counts events in the last ``window`` seconds;
the event that goes over the limit is refused: a connection with ``421 4.7.0`` (and the
connection closed), a message (MAIL) or a recipient (RCPT) with ``451 4.7.1``, so a
well-behaved client retries later. Refused events are counted too, so a client that keeps
trying stays limited until it slows down. Clients on ``[server] limit_exceptions``
(default: ``[relay] local_networks``) are not limited.

Stores: ``memory`` (default; per process: with ``[server] workers = N`` each worker counts
on its own), an SQLite file shared by the processes of one host, or Redis
(``redis://host:port/db``) shared by several hosts. Finding: ``ratelimit`` =
``over`` (with the limit and the count) when something was refused. A dry run
(``session.dry_run``, ``smtpgate explain``) is judged as a real event would be and
counts nothing.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
import uuid
from typing import Any, Protocol

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from . import Option, PluginRegistry, one_of, positive
from .sqlitefile import SqliteFile, open_store

log = logging.getLogger("smtpgate.plugins.ratelimit")

PRIORITY = -60


def _nonneg(value: int) -> str | None:
    return None if value >= 0 else "must be >= 0 (0: no limit)"


OPTIONS: dict[str, Option] = {
    "window": Option(float, default=60.0, check=positive,
                     help="seconds of the sliding window"),
    "connections_per_client": Option(int, default=0, check=_nonneg),
    "messages_per_client": Option(int, default=0, check=_nonneg),
    "messages_per_user": Option(int, default=0, check=_nonneg),
    "messages_per_sender": Option(int, default=0, check=_nonneg),
    "recipients_per_client": Option(int, default=0, check=_nonneg),
    "recipients_per_user": Option(int, default=0, check=_nonneg),
    "store": Option(str, default="memory",
                    help="memory, an SQLite file (relative to the config file) or "
                         "redis://host:port/db"),
    "mode": Option(str, default="enforce",
                   check=one_of("enforce", "warn"),
                   help="warn: record and log, refuse nothing"),
}

TOO_MANY_CONNECTIONS = "Too many connections from {who}, slow down"
TOO_MANY = "Rate limit exceeded for {who}, try again later"


class Counter(Protocol):
    """A sliding-window event counter."""

    async def hit(self, key: str, window: float) -> int:
        """Record one event for ``key`` now; return the events of the last ``window``
        seconds, this one included."""

    async def peek(self, key: str, window: float) -> int:
        """The events of the last ``window`` seconds for ``key``, recording none (a dry
        run, ``smtpgate explain``)."""


class MemoryCounter:
    """Events in this process's memory (deques of timestamps, pruned as they age)."""

    def __init__(self) -> None:
        self._events: dict[str, collections.deque[float]] = {}
        self._calls = 0

    async def hit(self, key: str, window: float) -> int:
        now = time.monotonic()
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - window:
            events.popleft()
        events.append(now)
        self._calls += 1
        if self._calls % 10000 == 0:  # forget idle keys
            for k in [k for k, v in self._events.items() if v[-1] <= now - window]:
                del self._events[k]
        return len(events)

    async def peek(self, key: str, window: float) -> int:
        now = time.monotonic()
        return sum(1 for t in self._events.get(key, ()) if t > now - window)


class SqliteCounter(SqliteFile):
    """Events in an SQLite file (see :class:`~smtpgate.plugins.sqlitefile.SqliteFile`:
    WAL mode, the processes of one host share it, one worker thread owns the connection).

    Raises:
        OSError / sqlite3.Error: the file cannot be created or opened (from ``open``).
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, (
            "CREATE TABLE IF NOT EXISTS events (key TEXT, at REAL)",
            "CREATE INDEX IF NOT EXISTS events_key ON events (key, at)",
        ), "ratelimit")

    def _hit(self, key: str, window: float) -> int:
        now = time.time()
        db = self.connection()
        db.execute("DELETE FROM events WHERE key = ? AND at <= ?", (key, now - window))
        db.execute("INSERT INTO events VALUES (?, ?)", (key, now))
        row = db.execute("SELECT COUNT(*) FROM events WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    async def hit(self, key: str, window: float) -> int:
        return await self.run(self._hit, key, window)

    def _peek(self, key: str, window: float) -> int:
        row = self.connection().execute("SELECT COUNT(*) FROM events WHERE key = ? AND at > ?",
                                        (key, time.time() - window)).fetchone()
        return int(row[0])

    async def peek(self, key: str, window: float) -> int:
        return await self.run(self._peek, key, window)


class RedisCounter:
    """Events in Redis sorted sets (one per key, expiring with the window)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url)

    async def hit(self, key: str, window: float) -> int:
        now = time.time()
        name = f"ratelimit:{key}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(name, "-inf", now - window)
            pipe.zadd(name, {uuid.uuid4().hex: now})
            pipe.zcard(name)
            pipe.expire(name, max(1, int(window) + 1))
            results = await pipe.execute()
        return int(results[2])

    async def peek(self, key: str, window: float) -> int:
        count = await self._redis.zcount(f"ratelimit:{key}", time.time() - window, "+inf")
        return int(count)


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the connect, mail and rcpt hooks of the limits that are set.

    Raises:
        OptionError: an SQLite store that cannot be created.
    """
    name = registry.name
    registry.decides_relay = False
    window: float = options["window"]
    warn = options["mode"] == "warn"
    exempt = [ipaddress.ip_network(n, strict=False)
              for n in registry.config.limit_exception_networks]
    spec: str = options["store"]
    counter: Counter
    if spec == "memory":
        counter = MemoryCounter()
    elif spec.startswith(("redis://", "rediss://", "unix://")):
        counter = RedisCounter(spec)
    else:
        counter = open_store(registry, spec, SqliteCounter)

    def exempted(session: SessionInfo) -> bool:
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return True
        return any(ip in net for net in exempt)

    async def over(kind: str, key: str, limit: int, dry_run: bool = False) -> int | None:
        """The count when ``limit`` is exceeded, else ``None``; never fails mail. A dry
        run counts what a real event would make the count, and records nothing."""
        if not limit:
            return None
        try:
            if dry_run:
                count = await counter.peek(f"{kind}:{key}", window) + 1
            else:
                count = await counter.hit(f"{kind}:{key}", window)
        except Exception as exc:  # a store failure never stops mail
            log.error("ratelimit store %s failed: %s", spec, exc)
            return None
        return count if count > limit else None

    def refuse(session: SessionInfo, tx: Transaction | None, kind: str, who: str,
               limit: int, count: int, verdict: Verdict, reply: Reply) -> HookResult | None:
        results = tx.results if tx is not None else session.results
        results.add(name, "over", limit=f"{kind}={limit}/{window:g}s", count=count, who=who)
        log.info("rate limit %s over: %s count=%d limit=%d window=%gs%s", kind, who, count,
                 limit, window, " (warn only)" if warn else "")
        return None if warn else HookResult(verdict, reply, reason=f"ratelimit {kind}")

    conn_limit: int = options["connections_per_client"]

    async def connect(session: SessionInfo) -> HookResult | None:
        if exempted(session):
            return None
        count = await over("conn", session.peer_ip, conn_limit, session.dry_run)
        if count is None:
            return None
        reply = Reply(421, "4.7.0", TOO_MANY_CONNECTIONS.format(who=session.peer_ip))
        return refuse(session, None, "connections", session.peer_ip, conn_limit, count,
                      Verdict.DENYSOFT_DISCONNECT, reply)

    msg_limits = [("messages_per_client", "msg-client"), ("messages_per_user", "msg-user"),
                  ("messages_per_sender", "msg-sender")]

    async def mail(session: SessionInfo, tx: Transaction) -> HookResult | None:
        if exempted(session):
            return None
        keys = {"msg-client": session.peer_ip, "msg-user": session.auth_user or "",
                "msg-sender": tx.mail_from.lower()}
        for option, kind in msg_limits:
            key = keys[kind]
            if not key:
                continue
            count = await over(kind, key, options[option], session.dry_run)
            if count is not None:
                reply = Reply(451, "4.7.1", TOO_MANY.format(who=key))
                return refuse(session, tx, option, key, options[option], count,
                              Verdict.DENYSOFT, reply)
        return None

    async def rcpt(session: SessionInfo, tx: Transaction, recipient: Recipient
                   ) -> HookResult | None:
        if exempted(session):
            return None
        for option, kind, key in (("recipients_per_client", "rcpt-client", session.peer_ip),
                                  ("recipients_per_user", "rcpt-user",
                                   session.auth_user or "")):
            if not key:
                continue
            count = await over(kind, key, options[option], session.dry_run)
            if count is not None:
                reply = Reply(451, "4.7.1", TOO_MANY.format(who=key))
                return refuse(session, tx, option, key, options[option], count,
                              Verdict.DENYSOFT, reply)
        return None

    if conn_limit:
        registry.on("connect", connect)
    if any(options[o] for o, _ in msg_limits):
        registry.on("mail", mail)
    if options["recipients_per_client"] or options["recipients_per_user"]:
        registry.on("rcpt", rcpt)

"""Shipped plugin ``greylist``: defer the first attempt of an unknown (client network,
sender, recipient) triplet; accept it when retried after ``delay`` (the technique of
Harris, 2003, as postgrey does it).

Entry point: :func:`register`. Runs at ``rcpt`` after relay control (priority 10). A
triplet is the client's /24 (IPv4) or /64 (IPv6) network, the reverse-path and the
forward-path, lower-cased. The first attempt gets ``451 4.7.1``; a retry before ``delay``
seconds too; a retry after ``delay`` and within ``retry_window`` passes, and the triplet
stays accepted for ``lifetime`` seconds after its last use. A client network that passed
``auto_whitelist`` times is no longer greylisted (for ``lifetime``). Exempt: clients in
``[relay] local_networks`` or ``exempt_networks``, authenticated clients, and recipients
whose local part is in ``exempt_recipients`` (postmaster, abuse by default).

Stores: an SQLite file (``store = "greylist.sqlite"``, WAL mode: several smtpgate
processes may share it) or Redis (``store = "redis://host:port/db"``) when several hosts
share the work. Finding: ``greylist`` = ``greylisted``, ``early`` (retried before the
delay), ``pass``, ``whitelisted``, ``exempt`` or ``error`` (the store failed: mail is let
through, and the error logged). A dry run (``session.dry_run``, ``smtpgate explain``)
gets the verdict a real attempt would get, and the store is not changed.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any, Protocol

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from . import Option, OptionError, PluginRegistry, nonnegative, one_of, positive
from .sqlitefile import SqliteFile, open_store

log = logging.getLogger("smtpgate.plugins.greylist")

PRIORITY = 10
OPTIONS: dict[str, Option] = {
    "delay": Option(float, default=300.0, check=nonnegative,
                    help="seconds before a retry is accepted"),
    "retry_window": Option(float, default=172800.0,
                           check=positive,
                           help="seconds after the first attempt within which a retry counts"),
    "lifetime": Option(float, default=3110400.0,
                       check=positive,
                       help="seconds an accepted triplet (or a whitelisted client) lasts"),
    "auto_whitelist": Option(int, default=5, check=nonnegative,
                             help="passed triplets after which a client network is "
                                  "whitelisted (0: never)"),
    "store": Option(str, default="greylist.sqlite",
                    help="SQLite file (relative to the config file) or redis://host:port/db"),
    "exempt_networks": Option(list, default=[], items=str, help="clients never greylisted"),
    "exempt_recipients": Option(list, default=["postmaster", "abuse"], items=str,
                                help="local parts (or whole addresses) never greylisted"),
    "mode": Option(str, default="enforce",
                   check=one_of("enforce", "warn"),
                   help="warn: record and log, defer nothing"),
}


class Store(Protocol):
    """Where triplets and client counts live (an SQLite file or Redis)."""

    async def triplet(self, key: str) -> tuple[float, float] | None:
        """(first seen, passed at or 0) of a triplet, ``None`` when unknown or expired."""

    async def put_triplet(self, key: str, first: float, passed: float, ttl: float) -> None:
        """Record a triplet, to be forgotten ``ttl`` seconds after now."""

    async def client_count(self, net: str) -> int:
        """How many triplets of the client network passed (0 when unknown or expired)."""

    async def bump_client(self, net: str, ttl: float) -> None:
        """One more passed triplet for the client network; forgotten after ``ttl``."""


class SqliteStore(SqliteFile):
    """Triplets in an SQLite file (see :class:`~smtpgate.plugins.sqlitefile.SqliteFile`:
    WAL mode, several processes share it, one worker thread owns the connection).

    Raises:
        OSError / sqlite3.Error: the file cannot be created or opened (from ``open``).
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, (
            "CREATE TABLE IF NOT EXISTS triplets (key TEXT PRIMARY KEY, "
            "first REAL, passed REAL, expires REAL)",
            "CREATE TABLE IF NOT EXISTS clients (net TEXT PRIMARY KEY, "
            "count INTEGER, expires REAL)",
        ), "greylist")
        self._calls = 0

    def _triplet(self, key: str) -> tuple[float, float] | None:
        now = time.time()
        self._calls += 1
        db = self.connection()
        if self._calls % 1000 == 0:  # expired rows go now and then
            db.execute("DELETE FROM triplets WHERE expires < ?", (now,))
            db.execute("DELETE FROM clients WHERE expires < ?", (now,))
        row = db.execute("SELECT first, passed FROM triplets WHERE key = ? AND expires >= ?",
                         (key, now)).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    async def triplet(self, key: str) -> tuple[float, float] | None:
        return await self.run(self._triplet, key)

    def _put(self, key: str, first: float, passed: float, ttl: float) -> None:
        self.connection().execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?)",
                                  (key, first, passed, time.time() + ttl))

    async def put_triplet(self, key: str, first: float, passed: float, ttl: float) -> None:
        await self.run(self._put, key, first, passed, ttl)

    def _count(self, net: str) -> int:
        row = self.connection().execute(
            "SELECT count FROM clients WHERE net = ? AND expires >= ?",
            (net, time.time())).fetchone()
        return 0 if row is None else int(row[0])

    async def client_count(self, net: str) -> int:
        return await self.run(self._count, net)

    def _bump(self, net: str, ttl: float) -> None:
        now = time.time()
        self.connection().execute(
            "INSERT INTO clients VALUES (?, 1, ?) ON CONFLICT(net) DO UPDATE SET "
            "count = CASE WHEN expires < ? THEN 1 ELSE count + 1 END, expires = excluded.expires",
            (net, now + ttl, now))

    async def bump_client(self, net: str, ttl: float) -> None:
        await self.run(self._bump, net, ttl)


class RedisStore:
    """Triplets in Redis (``redis://host:port/db``), each key with its own expiry."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.url = url
        self._redis = redis.asyncio.Redis.from_url(url)

    async def triplet(self, key: str) -> tuple[float, float] | None:
        row = await self._redis.hmget(f"greylist:t:{key}", "first", "passed")
        if row[0] is None:
            return None
        return float(row[0]), float(row[1] or 0)

    async def put_triplet(self, key: str, first: float, passed: float, ttl: float) -> None:
        name = f"greylist:t:{key}"
        await self._redis.hset(name, mapping={"first": first, "passed": passed})
        await self._redis.expire(name, max(1, int(ttl)))

    async def client_count(self, net: str) -> int:
        value = await self._redis.get(f"greylist:c:{net}")
        return 0 if value is None else int(value)

    async def bump_client(self, net: str, ttl: float) -> None:
        name = f"greylist:c:{net}"
        await self._redis.incr(name)
        await self._redis.expire(name, max(1, int(ttl)))


def client_network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6) network, as text (the triplet's first part)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the rcpt hook.

    Raises:
        OptionError: a bad network, or an SQLite store that cannot be created.
    """
    name = registry.name
    registry.decides_relay = False
    delay: float = options["delay"]
    window: float = options["retry_window"]
    lifetime: float = options["lifetime"]
    awl: int = options["auto_whitelist"]
    warn = options["mode"] == "warn"
    try:
        exempt = [ipaddress.ip_network(n, strict=False)
                  for n in (*registry.config.relay.local_networks,
                            *options["exempt_networks"])]
    except ValueError as exc:
        raise OptionError("exempt_networks", str(exc)) from None
    exempt_rcpts = {str(r).lower() for r in options["exempt_recipients"]}
    store_spec: str = options["store"]
    store: Store
    if store_spec.startswith(("redis://", "rediss://", "unix://")):
        store = RedisStore(store_spec)
    else:
        store = open_store(registry, store_spec, SqliteStore)

    def exempt_reason(session: SessionInfo, rcpt: Recipient) -> str | None:
        if session.auth_user:
            return "authenticated"
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return "no client address"
        if any(ip in net for net in exempt):
            return "exempt network"
        local = rcpt.address.rpartition("@")[0].lower()
        if local in exempt_rcpts or rcpt.address.lower() in exempt_rcpts:
            return "exempt recipient"
        return None

    def deferred(text: str) -> HookResult | None:
        if warn:
            return None
        return HookResult(Verdict.DENYSOFT, Reply(451, "4.7.1", text), reason="greylisted")

    async def rcpt(session: SessionInfo, tx: Transaction, rcpt: Recipient) -> HookResult | None:
        why = exempt_reason(session, rcpt)
        if why is not None:
            tx.results.add(name, "exempt", reason=why)
            return None
        net = client_network(session.peer_ip)
        key = f"{net}|{tx.mail_from.lower()}|{rcpt.address.lower()}"
        now = time.time()
        try:
            if awl and await store.client_count(net) >= awl:
                tx.results.add(name, "whitelisted", client=net)
                return None
            seen = await store.triplet(key)
            if seen is None or (not seen[1] and now - seen[0] > window):
                if not session.dry_run:  # smtpgate explain: judge, record nothing
                    await store.put_triplet(key, now, 0.0, window)
                tx.results.add(name, "greylisted", client=net, delay=delay)
                log.info("greylisted client=%s from=<%s> to=<%s>", session.peer_ip,
                         tx.mail_from, rcpt.address)
                return deferred(f"Greylisted, please try again in {int(delay)} seconds")
            first, passed = seen
            if not passed and now - first < delay:
                tx.results.add(name, "early", client=net, wait=round(delay - (now - first)))
                return deferred(f"Greylisted, please try again in "
                                f"{int(delay - (now - first)) + 1} seconds")
            if not session.dry_run:
                await store.put_triplet(key, first, passed or now, lifetime)
                if not passed:
                    await store.bump_client(net, lifetime)
            tx.results.add(name, "pass", client=net)
            return None
        except Exception as exc:  # a store failure never stops mail
            log.error("greylist store %s failed: %s", store_spec, exc)
            tx.results.add(name, "error", reason=str(exc)[:200])
            return None

    registry.on("rcpt", rcpt)

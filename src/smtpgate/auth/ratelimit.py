"""Per-client limit on failed SMTP AUTH attempts (brute-force protection).

Entry point: :class:`FailureLimiter` — a sliding-window failure counter keyed
by client IP (IPv6 grouped by /64), memory-bounded. While a client is blocked
the server answers AUTH with 454 4.7.0 (RFC 4954 §6, ``R.AUTH_RATE``).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["FailureLimiter", "client_key"]

ClientKey = tuple[int, int | str]


def client_key(ip: str, ipv6_prefix: int = 64) -> ClientKey:
    """The bucket a client address counts against.

    Args:
        ip: the client address as text (``"192.0.2.1"``, ``"2001:db8::1"``,
            ``"[::1]"``, ``"::ffff:192.0.2.1"``); anything unparsable is its
            own bucket, compared lower-cased.
        ipv6_prefix: IPv6 addresses are grouped by this prefix length (a
            single end site usually owns a whole /64).

    Returns:
        ``(4, int)`` for IPv4 (IPv4-mapped IPv6 counts as IPv4), ``(6, int)``
        for the IPv6 prefix, ``(0, text)`` for unparsable input.
    """
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return (0, text.lower())
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return (6, int(addr) >> (128 - ipv6_prefix))
        addr = mapped
    return (4, int(addr))


class FailureLimiter:
    """Blocks a client after ``max_failures`` failed AUTH attempts within ``window``.

    The window slides: a client is blocked while its last ``max_failures``
    failures all lie within the past ``window`` seconds, so it is unblocked
    ``window`` seconds after the oldest of them. A success clears the client's
    record. Memory is bounded: at most ``max_failures`` timestamps per client,
    expired clients are dropped as new failures arrive, and the table holds at
    most ``max_entries`` clients (the one with the oldest last failure is
    evicted). Not thread-safe; meant for one event loop.

    Args:
        max_failures: failures that trigger the block, >= 1.
        window: the sliding window in seconds, > 0.
        clock: monotonic clock in seconds (injectable for tests).
        max_entries: cap on tracked clients, >= 1.
        ipv6_prefix: IPv6 grouping prefix length, 1..128.

    Raises:
        ValueError: on an out-of-range argument.
    """

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = 100_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        if not window > 0:
            raise ValueError("window must be > 0 seconds")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 1..128")
        self.max_failures = max_failures
        self.window = window
        self.max_entries = max_entries
        self.ipv6_prefix = ipv6_prefix
        self._clock = clock
        # key -> recent failure times (oldest first); ordered by last failure time.
        self._table: OrderedDict[ClientKey, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """Number of clients currently tracked."""
        return len(self._table)

    def _key(self, ip: str) -> ClientKey:
        return client_key(ip, self.ipv6_prefix)

    def _expire(self, now: float) -> None:
        """Drop clients whose last failure left the window (front of the table)."""
        horizon = now - self.window
        table = self._table
        while table:
            key, times = next(iter(table.items()))
            if times[-1] > horizon:
                break
            del table[key]

    def is_blocked(self, ip: str) -> bool:
        """True while the client (its /64 for IPv6) may not try to authenticate.

        Args:
            ip: the client address as text.
        """
        times = self._table.get(self._key(ip))
        if times is None or len(times) < self.max_failures:
            return False
        return times[0] > self._clock() - self.window

    def record_failure(self, ip: str) -> None:
        """Count one failed authentication for the client.

        Args:
            ip: the client address as text.
        """
        now = self._clock()
        self._expire(now)
        key = self._key(ip)
        times = self._table.get(key)
        if times is None:
            times = self._table[key] = deque(maxlen=self.max_failures)
        else:
            self._table.move_to_end(key)
        times.append(now)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)

    def record_success(self, ip: str) -> None:
        """Forget the client's failures after a successful authentication.

        Args:
            ip: the client address as text.
        """
        self._table.pop(self._key(ip), None)

    def clear(self) -> None:
        """Forget every client."""
        self._table.clear()

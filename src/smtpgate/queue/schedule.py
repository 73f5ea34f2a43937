"""Retry schedule of the queue: exponential backoff between two bounds, and expiry.

Entry point: :class:`RetrySchedule`. Postfix-like defaults: first retry after 5 min,
doubling up to 1 h between attempts, give up 5 days after arrival.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Delays in seconds.

    Attributes:
        min_backoff: delay after the first failed attempt.
        max_backoff: the delay never grows beyond this.
        max_lifetime: seconds after arrival when undelivered recipients bounce.
    """

    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    max_lifetime: float = 5 * 86400.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (``attempts >= 1``)."""
        exp = max(0, min(attempts - 1, 40))
        return float(min(self.max_backoff, self.min_backoff * (2**exp)))

    def expired(self, created: float, now: float) -> bool:
        """True when a message that arrived at ``created`` has been queued too long."""
        return now - created >= self.max_lifetime

"""ZMailer-style tarpit: a growing pause before each error reply of a session.

Entry point: :class:`Tarpit` (``delay``, ``sleep``), used by the ``tarpit`` plugin.
RFC 5321 §4.5.3.2 (client timeouts of at least 5 minutes per command make pauses of this
size safe for real clients).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from ..errors import ConfigError

__all__ = ["DEFAULT_TOPLIMIT", "Tarpit"]

logger = logging.getLogger("smtpgate.policy.tarpit")

#: ZMailer's historic cap ("Delay tops at 250 (seconds)"), used when no limit is given.
DEFAULT_TOPLIMIT = 250.0


def _number(value: Any, key: str, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{key}: expected a number of seconds, got {value!r}")
        return 0.0
    number = float(value)
    if not math.isfinite(number) or number < 0:
        problems.append(f"{key}: must be a finite number >= 0, got {value!r}")
        return 0.0
    return number


class Tarpit:
    """Delay before each 4xx/5xx reply, growing with every error in the session.

    ZMailer smtpserver(8), ``PARAM tarpit initial exponent toplimit``: "The
    ``initial`` is used as the initial tarpit delay, and ``exponent`` is multiplier
    for formula: next = prev + (prev * exponent). Finally, ``toplimit`` caps the
    delay value." So the n-th error reply of a session waits::

        delay(1) = initial
        delay(n) = min(initial * (1 + exponent) ** (n - 1), toplimit)

    Example: ``Tarpit(20, 2, 300)`` (the man page's sample) waits 20, 60, 180, 300,
    300, ... seconds. ``initial == 0`` disables the tarpit (ZMailer's default
    ``tarpit 0 0 0``). One difference: ZMailer slept the first ``initial`` seconds
    even when it exceeded ``toplimit``; smtpgate caps every delay.

    Args:
        initial: seconds before the first error reply; 0 disables.
        exponent: growth factor per error (``next = prev + prev * exponent``), >= 0.
        toplimit: upper bound in seconds; 0 means ZMailer's historic 250 s
            (:data:`DEFAULT_TOPLIMIT`).

    Raises:
        ConfigError: on a negative, non-finite or non-numeric value, naming the
            ``server.tarpit_initial`` / ``server.tarpit_exponent`` / ``server.tarpit_max`` key.
    """

    __slots__ = ("_exponent", "_initial", "_toplimit")

    def __init__(
        self, initial: float = 0.0, exponent: float = 0.0, toplimit: float = DEFAULT_TOPLIMIT
    ) -> None:
        problems: list[str] = []
        self._initial = _number(initial, "server.tarpit_initial", problems)
        self._exponent = _number(exponent, "server.tarpit_exponent", problems)
        self._toplimit = _number(toplimit, "server.tarpit_max", problems)
        if problems:
            raise ConfigError(problems)
        if self._toplimit == 0:
            self._toplimit = DEFAULT_TOPLIMIT

    def __repr__(self) -> str:
        return (
            f"Tarpit(initial={self._initial}, exponent={self._exponent}, toplimit={self._toplimit})"
        )

    @property
    def enabled(self) -> bool:
        """True when :attr:`initial` is above zero."""
        return self._initial > 0

    @property
    def initial(self) -> float:
        """Seconds before the first error reply."""
        return self._initial

    @property
    def exponent(self) -> float:
        """Growth factor per error."""
        return self._exponent

    @property
    def toplimit(self) -> float:
        """Upper bound of any delay, in seconds."""
        return self._toplimit

    def delay(self, error_count: int) -> float:
        """Seconds to wait before the ``error_count``-th error reply of a session.

        Args:
            error_count: 1 for the session's first error reply, 2 for the second, ...;
                0 (no error yet) gives 0.

        Returns:
            The delay in seconds, 0.0 when disabled, never above :attr:`toplimit`;
            non-decreasing in ``error_count``.

        Raises:
            ValueError: when ``error_count`` is negative.
        """
        if error_count < 0:
            raise ValueError(f"error_count must be >= 0, got {error_count}")
        if error_count == 0 or not self.enabled:
            return 0.0
        try:
            grown = self._initial * (1.0 + self._exponent) ** (error_count - 1)
        except OverflowError:
            return self._toplimit
        return min(grown, self._toplimit)

    async def sleep(self, error_count: int) -> float:
        """Wait :meth:`delay` seconds with :func:`asyncio.sleep`; returns the delay."""
        seconds = self.delay(error_count)
        if seconds > 0:
            logger.debug("tarpit: error #%d, pausing %.1f s", error_count, seconds)
            await asyncio.sleep(seconds)
        return seconds

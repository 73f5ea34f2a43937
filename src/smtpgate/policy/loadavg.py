"""System load average for ZMailer's ``-L maxloadaver`` and per-HELO-rule load limits.

Entry points: :class:`LoadAverage` (``current``, ``over``), :func:`read_system_load`,
:func:`parse_proc_loadavg` and the :data:`TOO_LOADED` reply. RFC 5321 §3.8 / §4.2.3
(421: service not available, closing the transmission channel).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

from ..reply import Reply

__all__ = ["TOO_LOADED", "LoadAverage", "parse_proc_loadavg", "read_system_load"]

logger = logging.getLogger("smtpgate.policy.loadavg")

#: What a client is told when the load is over the limit (then the server closes).
#: ZMailer: "421 Sorry, the system is too loaded for email reception at the moment".
TOO_LOADED = Reply(
    421, "4.3.2", "Sorry, the system is too loaded for email reception at the moment"
)

_PROC_LOADAVG = "/proc/loadavg"


def parse_proc_loadavg(text: str) -> float:
    """The 1-minute figure from ``/proc/loadavg`` text (``"0.52 0.58 0.59 1/467 12345"``).

    Raises:
        ValueError: when the first field is not a finite, non-negative number.
    """
    fields = text.split()
    if not fields:
        raise ValueError("empty /proc/loadavg")
    value = float(fields[0])
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad load average {fields[0]!r}")
    return value


def read_system_load() -> float:
    """The kernel's 1-minute load average: :func:`os.getloadavg`, else ``/proc/loadavg``.

    Returns:
        The load average; 0.0 when neither source is available (like ZMailer's
        ``loadavg_current()``, which reports "not available" as 0, so the limit
        never blocks mail on such a system).
    """
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        pass
    try:
        with open(_PROC_LOADAVG, encoding="ascii") as fh:
            return parse_proc_loadavg(fh.read())
    except (OSError, ValueError) as exc:
        logger.warning("load average unavailable (%s); treating it as 0", exc)
        return 0.0


class LoadAverage:
    """The 1-minute load average, cached briefly so busy servers do not re-read it.

    Args:
        reader: returns the current load average. The default reads the kernel's
            (:func:`read_system_load`). This is the test hook: a test cannot set the
            kernel's load, so it passes a callable returning the value it needs.
        cache_seconds: how long one reading is reused (seconds; 0 = read every call).
        clock: monotonic clock used for the cache (seconds); injectable for tests.

    Raises:
        ValueError: when ``cache_seconds`` is negative or not finite.
    """

    __slots__ = ("_cache_seconds", "_clock", "_reader", "_read_at", "_value")

    def __init__(
        self,
        reader: Callable[[], float] | None = None,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(cache_seconds) or cache_seconds < 0:
            raise ValueError(f"cache_seconds must be >= 0, got {cache_seconds!r}")
        self._reader = reader or read_system_load
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._read_at: float | None = None
        self._value = 0.0

    def current(self) -> float:
        """The 1-minute load average, at most ``cache_seconds`` old.

        A reader raising :class:`OSError` counts as load 0.0 (fail open, as ZMailer).
        """
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._cache_seconds:
            try:
                value = float(self._reader())
            except OSError as exc:
                logger.warning("load average unavailable (%s); treating it as 0", exc)
                value = 0.0
            self._value = value if math.isfinite(value) and value >= 0 else 0.0
            self._read_at = now
        return self._value

    def over(self, limit: float | None) -> bool:
        """True when the load is strictly above ``limit`` (ZMailer: ``maxloadavg < load``).

        Args:
            limit: the ceiling (``server.max_load_average`` or a HELO rule's);
                None or a value <= 0 means no limit (``max_load_average = 0`` is "off")
                and never reads the load.
        """
        if limit is None or limit <= 0:
            return False
        return self.current() > limit

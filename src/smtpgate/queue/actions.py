"""What the administrator's queue actions do to a queued message's envelope, for the
``smtpgate queue`` commands and the admin API alike (Postfix ``postsuper -h/-H``,
``postqueue -f/-i``; docs/queue.md).

Entry points: :data:`QUEUE_ACTIONS` and :func:`envelope_change`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .store import QueueEntry

__all__ = ["QUEUE_ACTIONS", "envelope_change"]

QUEUE_ACTIONS = ("hold", "release", "flush", "bounce")
"""The actions that change a message's envelope (``delete`` removes it instead)."""


def envelope_change(action: str) -> Callable[[QueueEntry], str | None]:
    """The change :meth:`~smtpgate.queue.store.QueueStore.update` applies for ``action``:
    a function of the entry that edits it and returns its new state (``None``: keep it).

    - ``hold``: on hold (no delivery until released);
    - ``release``: out of hold, due now;
    - ``flush``: due now (a held message stays held);
    - ``bounce``: returned to its sender at the next run (out of hold first).

    Raises:
        ValueError: an action not in :data:`QUEUE_ACTIONS`.
    """
    if action not in QUEUE_ACTIONS:
        raise ValueError(f"unknown queue action {action!r}")

    def change(e: QueueEntry) -> str | None:
        if action == "hold":
            return "hold"
        if action == "release":
            e.next_attempt = time.time()
            return "deferred" if e.state == "hold" else None
        if action == "flush":
            e.next_attempt = 0.0
            return None
        e.bounce = True  # bounce
        e.next_attempt = 0.0
        return "deferred" if e.state == "hold" else None

    return change

"""Built-in plugin ``tarpit``: wait before each error reply, longer with every error of the
session (ZMailer's tarpit: ``[server] tarpit_initial``, ``tarpit_exponent``, ``tarpit_max``).

Entry point: :func:`register`. Runs at the ``error`` stage, which the session driver
runs before it sends an error reply; ``session.errors`` is the session's error count.
"""

from __future__ import annotations

import asyncio

from ..envelope import SessionInfo
from ..policy.tarpit import Tarpit
from ..reply import Reply
from . import Option, PluginRegistry

PRIORITY = 0
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the error hook."""
    s = registry.config.server
    tarpit = Tarpit(s.tarpit_initial, s.tarpit_exponent, s.tarpit_max)

    async def error(session: SessionInfo, reply: Reply, command: str) -> None:
        delay = tarpit.delay(session.errors + 1)
        if delay > 0:
            await asyncio.sleep(delay)

    # The delay may be longer than [hooks] timeout: bound it by the tarpit's own maximum.
    registry.on("error", error, timeout=max(s.tarpit_max, s.tarpit_initial) + 5.0)

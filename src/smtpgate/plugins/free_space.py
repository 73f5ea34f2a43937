"""Built-in plugin ``free_space``: refuse new transactions while the spool's file system is
low on space (ZMailer ``min-availspace``; queue mode, ``[queue] min_free_space``).

Entry point: :func:`register`. Below the floor MAIL gets ``452 4.3.1 Insufficient system
storage`` (RFC 5321 §4.5.3.1.10, RFC 3463 X.3.1). Queue delivery checks again with the
message's size at the end of data.
"""

from __future__ import annotations

from ..envelope import SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..queue.delivery import FreeSpace
from . import Option, PluginRegistry

PRIORITY = -95
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the mail hook."""
    q = registry.config.queue
    space = FreeSpace(q.path, q.min_free_space)

    def mail(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        low = space.reply()
        return None if low is None else HookResult(Verdict.DENYSOFT, low)

    registry.on("mail", mail)

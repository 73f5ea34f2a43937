"""A plugin that adds a header at the data stage before the content filter runs."""

from __future__ import annotations

from smtpgate.envelope import SessionInfo
from smtpgate.hooks import Transaction
from smtpgate.plugins import PluginRegistry

PRIORITY = -10


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    def data(session: SessionInfo, transaction: Transaction) -> None:
        transaction.add_header("X-Earlier", "added before the filter")

    registry.on("data", data)

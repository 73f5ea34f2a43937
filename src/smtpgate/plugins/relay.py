"""Built-in plugin ``relay``: relay control at RCPT (nssmtpd relay/local domain lists).

Entry point: :func:`register`. Settings come from ``[relay]`` (``relay_domains``,
``local_networks``); authenticated clients may relay anywhere. A recipient that may not be
relayed gets ``554 5.7.1 Relay access denied`` (RFC 5321 §3.6.2, §7.1). The policy object is
offered to the application as ``"relay"`` for run-time changes (``app.relay.relay_add``).
Removing this plugin (``[[plugin]] use = "relay"`` with ``enabled = false``) needs another
plugin deciding at ``rcpt``, or ``allow_open_relay = true`` in that table.
"""

from __future__ import annotations

import logging

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..policy import RelayPolicy
from ..reply import R
from . import Option, PluginRegistry

log = logging.getLogger("smtpgate.plugins.relay")

PRIORITY = -90
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the rcpt hook; provide the :class:`~smtpgate.policy.RelayPolicy`."""
    cfg = registry.config.relay
    policy = RelayPolicy(cfg.relay_domains, cfg.local_networks)
    registry.provide("relay", policy)
    denied = HookResult(Verdict.DENY, R.RELAY_DENIED)

    def rcpt(session: SessionInfo, transaction: Transaction, recipient: Recipient) -> (
            HookResult | None):
        if policy.may_relay(session.peer_ip, session.auth_user, recipient.address):
            log.debug("relay allowed id=%s client=%s auth=%s to=<%s>", transaction.id,
                      session.peer_ip, session.auth_user or "-", recipient.address)
            return None
        log.info("relay denied id=%s client=%s from=<%s> to=<%s>", transaction.id,
                 session.peer_ip, transaction.envelope.mail_from, recipient.address)
        return denied

    registry.on("rcpt", rcpt)

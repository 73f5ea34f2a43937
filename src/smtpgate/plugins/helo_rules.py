"""Built-in plugin ``helo_rules``: ZMailer's per-HELO policy table (``[[helo_rule]]``).

Entry point: :func:`register`. At HELO/EHLO the first matching rule decides: refuse the
name (``refuse``), check its syntax (flag ``h``), refuse over a per-rule load average,
allow sloppy MAIL FROM paths (``s``); its other flags apply later in the session: strict
address syntax at MAIL/RCPT (``S``), VRFY/EXPN allowed (``v``/``e``), and the address
check of the sender/recipient (``f``/``t``, done by the ``address_check`` plugin, which
reads :data:`POLICY_NOTE`). See docs/zmailer.md.
"""

from __future__ import annotations

import logging

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..policy.helo_rules import (
    BAD_HELO,
    HeloPolicy,
    HeloRules,
    check_helo_syntax,
    strict_address_ok,
)
from ..reply import R, Reply
from . import Option, PluginRegistry
from .load_average import OVERLOADED, reader

log = logging.getLogger("smtpgate.plugins.helo_rules")

PRIORITY = -80
OPTIONS = {
    "loadavg_file": Option(str, default="/proc/loadavg",
                           help="file in /proc/loadavg format for the rules' load limits"),
}

POLICY_NOTE = "helo_policy"
"""``session.notes`` key holding the :class:`HeloPolicy` of the session's last HELO."""


def policy_of(session: SessionInfo) -> HeloPolicy | None:
    """The HELO rule policy in force for ``session`` (``None``: no rule matched yet)."""
    policy = session.notes.get(POLICY_NOTE)
    return policy if isinstance(policy, HeloPolicy) else None


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the helo, mail, rcpt and vrfy hooks."""
    registry.decides_relay = False  # it only refuses: never lets a recipient relay
    path = options["loadavg_file"]
    assert isinstance(path, str)
    rules = HeloRules.from_config(list(registry.config.helo_rules))
    load = reader(path)

    def helo(session: SessionInfo, name: str) -> HookResult | Reply | None:
        policy = rules.match(name, session.peer_ip)
        session.notes.pop(POLICY_NOTE, None)
        if policy.refused:
            log.info("HELO %r refused by rule %r client=%s", name, policy.pattern,
                     session.peer_ip)
            return HookResult(Verdict.DENY, policy.refuse_reply or R.ACCESS_DENIED)
        if policy.check_helo and not check_helo_syntax(name):
            return HookResult(Verdict.DENY, BAD_HELO)
        if load.over(policy.max_load_average):
            return HookResult(Verdict.DENYSOFT_DISCONNECT, OVERLOADED)
        session.notes[POLICY_NOTE] = policy
        session.allow_sloppy_paths = bool(policy.sloppy_mail_from)
        return None

    def mail(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        policy = policy_of(session)
        if policy is not None and policy.strict_addresses and not strict_address_ok(
                transaction.envelope.mail_from, recipient=False):
            return HookResult(Verdict.DENY, R.BAD_SENDER_SYNTAX)
        return None

    def rcpt(session: SessionInfo, transaction: Transaction, recipient: Recipient) -> (
            HookResult | None):
        policy = policy_of(session)
        if policy is not None and policy.strict_addresses and not strict_address_ok(
                recipient.address, recipient=True):
            return HookResult(Verdict.DENY, R.BAD_RCPT_SYNTAX)
        return None

    def vrfy(session: SessionInfo, address: str, kind: str) -> HookResult | None:
        policy = policy_of(session)
        if policy is None:
            return None
        allowed = policy.verify_vrfy if kind == "vrfy" else policy.verify_expn
        if allowed:
            return None
        return HookResult(Verdict.OK, R.VRFY) if kind == "vrfy" else HookResult(
            Verdict.DENY, R.NOT_IMPLEMENTED)

    registry.on("helo", helo)
    registry.on("mail", mail)
    registry.on("rcpt", rcpt)
    registry.on("vrfy", vrfy)

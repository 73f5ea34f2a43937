"""Built-in plugin ``scanners``: the content scanners of ``[[scanner]]`` (SpamAssassin,
rspamd, ClamAV, Sophos) in the data phase (nssmtpd ``checkspam``/``checkvirus``).

Entry point: :func:`register`. Two hooks at the ``data`` stage: at priority -50 every
scanner runs (concurrently), tags the message and records its finding in
``transaction.results`` (one entry per scanner: ``clean``, ``spam``, ``infected``,
``skipped``, ``error``) and the decision in ``transaction.scan_decision``; at priority 90,
after the site's own data hooks, the decision is enforced (DENY, DENYSOFT or QUARANTINE).
A data hook that answers OK in between therefore overrides the scanners, as it always
did. The scanner set is offered to the application as ``"scanners"``.
"""

from __future__ import annotations

from ..envelope import SessionInfo
from ..errors import ConfigError
from ..hooks import HookResult, Transaction, Verdict
from ..scanners.base import parse_scanner_address
from ..scanners.stage import ScannerSet
from . import Option, PluginRegistry

PRIORITY = -50
ENFORCE_PRIORITY = 90
OPTIONS: dict[str, Option] = {}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Check the scanner addresses, build the clients; register the scan and enforce hooks.

    Raises:
        ConfigError: a malformed ``scanner[N].address`` or ``controller``.
    """
    cfg = registry.config
    problems: list[str] = []
    for i, table in enumerate(cfg.scanners):
        for key, value in (("address", table.address), ("controller", table.controller)):
            if value:
                try:
                    parse_scanner_address(value)
                except ValueError as exc:
                    problems.append(f"scanner[{i}].{key}: {exc}")
    if problems:
        raise ConfigError(problems)
    scanners = ScannerSet.from_config(cfg.scanners, cfg.server.hostname)
    registry.provide("scanners", scanners)

    async def scan(session: SessionInfo, transaction: Transaction) -> None:
        await scanners.run(transaction, session)
        for r in transaction.scan_results:
            details: dict[str, str | float | list[str]] = {}
            if r.score is not None:
                details["score"] = r.score
            if r.symbols:
                details["symbols"] = list(r.symbols)[:20]
            transaction.results.add(r.scanner, r.verdict, **details)

    def enforce(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        decision = transaction.scan_decision
        if decision is None:
            return None
        reason = f"scanner {decision.reason}"
        if decision.action == "quarantine":
            return HookResult(Verdict.QUARANTINE, decision.reply,
                              quarantine=decision.quarantine_path, reason=reason)
        verdict = Verdict.DENYSOFT if decision.reply.is_transient else Verdict.DENY
        return HookResult(verdict, decision.reply, reason=reason)

    # The scanners run concurrently, each bounded by its own timeout.
    longest = max((c.timeout for c in cfg.scanners), default=30.0)
    registry.on("data", scan, timeout=max(registry.timeout or 0.0, longest + 5.0))
    registry.on("data", enforce, priority=ENFORCE_PRIORITY)

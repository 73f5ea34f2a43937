"""The scanner stage of the data phase: run the configured scanners, decide, tag.

Entry points: :class:`ScannerSet` (built from ``[[scanner]]`` tables; ``run`` for the
data phase; ``check_spam``/``check_virus``/``train_spam``/``spam_version``/
``virus_version`` for hooks and the CLI, named after nssmtpd's ``ns_smtpd`` API) and
:class:`ScanDecision`. Scanners run concurrently per message; headers are documented
in docs/scanning.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from .. import metrics as _metrics
from ..config import ScannerConfig
from ..envelope import Envelope, SessionInfo
from ..errors import ScannerError, ScannerTimeout
from ..reply import Reply
from .base import Scanner, ScanResult, SpamLearner

log = logging.getLogger("smtpgate.scanners")

SCAN_HEADER = "X-Smtpgate-Scan"
_TEMPFAIL = Reply(451, "4.3.0", "Content scanner unavailable, try again later")
_SOFT_REJECT = Reply(451, "4.7.1", "Message temporarily rejected by content filter, try later")
_GREYLIST = Reply(451, "4.7.1", "Greylisted, try again later")


@dataclass(slots=True)
class ScanDecision:
    """What the scanners decided for one message.

    Attributes:
        action: ``"reject"`` (5xx), ``"tempfail"`` (4xx) or ``"quarantine"``.
        reply: the reply for the client (for quarantine: 250 or 5xx per
            ``quarantine_reply``).
        quarantine_path: Maildir for ``"quarantine"``.
        reason: short text for logs.
    """

    action: str
    reply: Reply
    quarantine_path: str = ""
    reason: str = ""


_RANK = {"reject": 3, "tempfail": 2, "quarantine": 1}


@dataclass(slots=True)
class _Configured:
    config: ScannerConfig
    client: Scanner


def make_scanner(cfg: ScannerConfig) -> Scanner:
    """Build the client for one ``[[scanner]]`` table.

    Raises:
        ConfigError: (from the client) on an unusable address.
    """
    address = cfg.effective_address
    if cfg.type == "spamassassin":
        from .spamd import SpamdScanner

        return cast(Scanner, SpamdScanner(address, timeout=cfg.timeout, max_size=cfg.max_size))
    if cfg.type == "rspamd":
        from .rspamd import RspamdScanner

        return cast(
            Scanner,
            RspamdScanner(
                address,
                controller=cfg.controller or None,
                password=cfg.password or None,
                timeout=cfg.timeout,
                max_size=cfg.max_size,
            ),
        )
    if cfg.type == "clamav":
        from .clamd import ClamdScanner

        return cast(Scanner, ClamdScanner(address, timeout=cfg.timeout, max_size=cfg.max_size))
    from .sssp import SsspScanner

    return cast(Scanner, SsspScanner(address, timeout=cfg.timeout, max_size=cfg.max_size))


@dataclass(slots=True)
class ScannerSet:
    """The configured scanners, in configuration order.

    Args:
        scanners: ``(config, client)`` pairs; use :meth:`from_config` normally.
        hostname: smtpgate's host name, first item of the summary header.
    """

    scanners: list[_Configured] = field(default_factory=list)
    hostname: str = "localhost"

    @classmethod
    def from_config(cls, configs: Sequence[ScannerConfig], hostname: str) -> ScannerSet:
        """Build clients for every ``[[scanner]]`` table."""
        return cls([_Configured(c, make_scanner(c)) for c in configs], hostname)

    def __bool__(self) -> bool:
        return bool(self.scanners)

    # ------------------------------------------------------------ data phase

    async def run(self, tx: object, session: SessionInfo) -> ScanDecision | None:
        """Scan the transaction's message with every scanner, concurrently.

        Adds the tagging headers (X-Spam-*, X-Virus-Scanned, the summary header) to
        the message, fills ``tx.scan_results`` and ``tx.scan_decision``, and returns
        the decision (``None``: deliver normally). ``tx`` is a
        :class:`smtpgate.hooks.Transaction`.
        """
        from ..hooks import Transaction

        assert isinstance(tx, Transaction)
        tx.scanners = self
        # A long message stays in its file when every scanner would skip it for its size
        # (each client answers "skipped" for a message over its max_size).
        size = tx.size
        if any(size <= c.client.max_size for c in self.scanners):
            message = tx.raw
            envelope = tx.envelope
            outcomes = await asyncio.gather(
                *(self._scan_one(c, message, envelope, session) for c in self.scanners)
            )
        else:
            log.info("message of %d bytes over every scanner's max_size, not scanned", size)
            outcomes = [(ScanResult(c.client.name, c.client.kind, "skipped",
                                    detail=f"message size {size} > max_size "
                                           f"{c.client.max_size}"), None, [], "")
                        for c in self.scanners]
        decision: ScanDecision | None = None
        summary: list[str] = []
        for conf, (result, dec, headers, subject_prefix) in zip(
            self.scanners, outcomes, strict=True
        ):
            tx.scan_results.append(result)
            # smtpgate_scanner_duration_seconds / smtpgate_scanner_verdicts_total
            _metrics.M.scanner(conf.config.type, result.verdict, result.elapsed)
            summary.append(_summary_item(result))
            for name, value in headers:
                if name.lower() == "subject":
                    tx.set_header(name, value)
                else:
                    tx.add_header(name, value, prepend=True)
            if subject_prefix:
                _prefix_subject(tx, subject_prefix)
            if dec is not None and (decision is None or _RANK[dec.action] > _RANK[decision.action]):
                decision = dec
            del conf
        tx.remove_header(SCAN_HEADER)  # never trust one that came with the message
        tx.add_header(SCAN_HEADER, f"{self.hostname}; " + "; ".join(summary), prepend=True)
        tx.scan_decision = decision
        return decision

    async def _scan_one(
        self, conf: _Configured, message: bytes, envelope: Envelope, session: SessionInfo
    ) -> tuple[ScanResult, ScanDecision | None, list[tuple[str, str]], str]:
        cfg = conf.config
        started = time.monotonic()
        try:
            async with asyncio.timeout(cfg.timeout + 1.0):
                if cfg.type == "spamassassin" and cfg.per_user and len(envelope.rcpt_to) > 0:
                    users = sorted({r.address for r in envelope.rcpt_to})
                    results = await asyncio.gather(
                        *(conf.client.scan(message, envelope=envelope, session=session, user=u)
                          for u in users)
                    )
                    result = max(results, key=lambda r: r.score or 0.0)
                else:
                    result = await conf.client.scan(message, envelope=envelope, session=session)
        except (ScannerError, TimeoutError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                exc = ScannerTimeout(f"{cfg.type}: no answer within {cfg.timeout:g}s")
            elapsed = time.monotonic() - started
            log.warning("scanner %s at %s failed: %s", cfg.type, cfg.effective_address, exc)
            result = ScanResult(cfg.type, "virus" if cfg.kind == "virus" else "spam", "error",
                                detail=str(exc)[:200], elapsed=elapsed)
            if cfg.on_error == "tempfail":
                return result, ScanDecision("tempfail", _TEMPFAIL, reason=str(exc)[:200]), [], ""
            return result, None, [], ""
        if cfg.kind == "virus":
            return self._virus_policy(cfg, result)
        return self._spam_policy(cfg, result)

    @staticmethod
    def _virus_policy(
        cfg: ScannerConfig, result: ScanResult
    ) -> tuple[ScanResult, ScanDecision | None, list[tuple[str, str]], str]:
        label = "ClamAV" if cfg.type == "clamav" else "Sophos"
        if result.verdict == "skipped":
            return result, None, [], ""
        headers = [("X-Virus-Scanned", f"{label} using smtpgate")]
        if result.verdict != "infected":
            return result, None, headers, ""
        names = ", ".join(result.symbols) or "unknown"
        reply = Reply(554, "5.7.1", f"Virus found: {names}"[:400])
        if cfg.action == "quarantine":
            if cfg.quarantine_reply == "accept":
                reply = Reply(250, "2.0.0", "Message accepted")
            return result, ScanDecision("quarantine", reply, cfg.quarantine_path,
                                        f"virus {names}"), headers, ""
        return result, ScanDecision("reject", reply, reason=f"virus {names}"), headers, ""

    @staticmethod
    def _spam_policy(
        cfg: ScannerConfig, result: ScanResult
    ) -> tuple[ScanResult, ScanDecision | None, list[tuple[str, str]], str]:
        if result.verdict == "skipped":
            return result, None, [], ""
        score = result.score or 0.0
        required = result.threshold if result.threshold is not None else cfg.tag_score
        headers: list[tuple[str, str]] = list(result.headers)
        tests = ",".join(result.symbols[:40])
        reject = Reply(550, "5.7.1", cfg.reject_text)
        decision: ScanDecision | None = None
        tag = False
        prefix = ""
        if cfg.type == "rspamd" and result.action:
            action = result.action
            if action == "reject":
                decision = ScanDecision("reject", reject, reason=f"rspamd reject {score:.1f}")
            elif action == "soft reject":
                decision = ScanDecision("tempfail", _SOFT_REJECT, reason="rspamd soft reject")
            elif action == "greylist":
                decision = ScanDecision("tempfail", _GREYLIST, reason="rspamd greylist")
            elif action == "rewrite subject":
                tag = True
                prefix = cfg.subject_prefix or "***SPAM*** "
                if result.subject:
                    headers.append(("Subject", result.subject))
                    prefix = ""
            elif action == "add header":
                tag = True
        else:
            if cfg.reject_score and score >= cfg.reject_score:
                decision = ScanDecision("reject", reject, reason=f"spam score {score:.1f}")
            tag = score >= cfg.tag_score
            if tag:
                prefix = cfg.subject_prefix
        if decision is None and cfg.quarantine_score and score >= cfg.quarantine_score:
            reply = (Reply(250, "2.0.0", "Message accepted") if cfg.quarantine_reply == "accept"
                     else reject)
            decision = ScanDecision("quarantine", reply, cfg.quarantine_path,
                                    f"spam score {score:.1f}")
        headers.append(("X-Spam-Flag", "YES" if tag else "NO"))
        headers.append(("X-Spam-Score", f"{score:.1f}"))
        headers.append((
            "X-Spam-Status",
            f"{'Yes' if tag else 'No'}, score={score:.1f} required={required:.1f} tests={tests}"
            f" scanner={cfg.type}",
        ))
        return result, decision, headers, prefix

    # ------------------------------------------------------------------- API

    def _of_kind(self, kind: str) -> list[_Configured]:
        return [c for c in self.scanners if c.config.kind == kind]

    async def check_spam(self, message: bytes, user: str | None = None) -> list[ScanResult]:
        """Scan with every spam scanner (nssmtpd ``checkspam message ?email?``).

        Raises:
            ScannerError: a scanner failed (unreachable, timeout, protocol error).
        """
        return list(await asyncio.gather(
            *(c.client.scan(message, user=user) for c in self._of_kind("spam"))
        ))

    async def check_virus(self, message: bytes) -> list[ScanResult]:
        """Scan with every virus scanner (nssmtpd ``checkvirus data``).

        Raises:
            ScannerError: a scanner failed.
        """
        return list(await asyncio.gather(*(c.client.scan(message) for c in self._of_kind("virus"))))

    async def train_spam(
        self, spam: bool | None, message: bytes, user: str | None = None
    ) -> list[str]:
        """Train every spam scanner that learns (nssmtpd ``trainspam 1|0 email message``).

        Args:
            spam: True spam, False ham, None forget.

        Returns:
            One answer per trainable scanner, ``"<type>: <daemon's answer>"``.

        Raises:
            ScannerError: a scanner failed or refused.
        """
        out: list[str] = []
        for c in self._of_kind("spam"):
            if hasattr(c.client, "learn"):
                learner = cast(SpamLearner, c.client)
                answer = await learner.learn(message, spam, user=user)
                out.append(f"{c.config.type}: {answer}")
        return out

    async def spam_version(self) -> list[str]:
        """Versions of the spam scanners (nssmtpd ``spamversion``)."""
        return [f"{c.config.type}: {await c.client.version()}" for c in self._of_kind("spam")]

    async def virus_version(self) -> list[str]:
        """Versions of the virus scanners (nssmtpd ``virusversion``)."""
        return [f"{c.config.type}: {await c.client.version()}" for c in self._of_kind("virus")]


def _summary_item(result: ScanResult) -> str:
    if result.verdict == "skipped":
        return f"{result.scanner}=skipped (message too large)"
    if result.verdict == "error":
        return f"{result.scanner}=error (not scanned)"
    if result.kind == "virus":
        if result.verdict == "infected":
            return f"{result.scanner}=infected ({', '.join(result.symbols)})"
        return f"{result.scanner}=clean"
    score = f"{result.score:.1f}" if result.score is not None else "?"
    threshold = f"/{result.threshold:.1f}" if result.threshold is not None else ""
    action = f" action={result.action}" if result.action else ""
    return f"{result.scanner}={result.verdict} (score={score}{threshold}{action})"


def summary_text(results: Sequence[ScanResult]) -> str:
    """One-line summary of results for the transaction log line."""
    return ",".join(_summary_item(r).replace(" ", "") for r in results) or "-"


def _prefix_subject(tx: object, prefix: str) -> None:
    from ..hooks import Transaction

    assert isinstance(tx, Transaction)
    subject = tx.get_header("Subject")
    if subject is None:
        tx.add_header("Subject", prefix.strip())
    elif not subject.startswith(prefix):
        tx.set_header("Subject", prefix + subject)

"""The scanner interface shared by every content-scanner client.

Entry points: :class:`ScanResult`, :class:`Scanner` (protocol), :class:`SpamLearner`
(protocol), :func:`parse_scanner_address`, :func:`open_scanner_connection`.
A scanner client raises :class:`~smtpgate.errors.ScannerUnavailable`,
:class:`~smtpgate.errors.ScannerTimeout` or :class:`~smtpgate.errors.ScannerError`;
it never decides the SMTP reply (the scanner stage does, from the result).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal, Protocol

from ..envelope import Envelope, SessionInfo
from ..errors import ScannerTimeout, ScannerUnavailable

Kind = Literal["spam", "virus"]
Verdict = Literal["clean", "spam", "infected", "skipped", "error"]


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one scanner said about one message.

    Attributes:
        scanner: the scanner type (``"spamassassin"``, ``"rspamd"``, ``"clamav"``, ``"sophos"``).
        kind: ``"spam"`` or ``"virus"``.
        verdict: ``"clean"``, ``"spam"``, ``"infected"``, ``"skipped"`` (not scanned,
            e.g. over ``max_size``) or ``"error"`` (scanner failed and the policy accepted).
        score: spam score (SpamAssassin/rspamd), ``None`` for virus scanners.
        threshold: the scanner's own spam threshold (required score), if it reports one.
        symbols: matched rules (spam) or signature names (virus).
        action: rspamd's recommended action (``"reject"``, ``"soft reject"``,
            ``"rewrite subject"``, ``"add header"``, ``"greylist"``, ``"no action"``).
        subject: rewritten subject suggested by the scanner (rspamd), if any.
        headers: header fields the scanner asks to add, ``(name, value)`` pairs.
        detail: short human-readable text for logs and headers (no message content).
        elapsed: seconds spent waiting on the scanner.
    """

    scanner: str
    kind: Kind
    verdict: Verdict
    score: float | None = None
    threshold: float | None = None
    symbols: tuple[str, ...] = ()
    action: str | None = None
    subject: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    detail: str = ""
    elapsed: float = 0.0

    @property
    def is_clean(self) -> bool:
        """True when the scanner found nothing (or did not scan)."""
        return self.verdict in ("clean", "skipped", "error")


class Scanner(Protocol):
    """A content scanner client (one configured ``[[scanner]]``).

    Attributes:
        name: scanner type, as in :attr:`ScanResult.scanner`.
        kind: ``"spam"`` or ``"virus"``.
        max_size: bytes; a longer message is not sent (verdict ``"skipped"``).
    """

    name: str
    kind: Kind
    max_size: int

    async def scan(
        self,
        message: bytes,
        *,
        envelope: Envelope | None = None,
        session: SessionInfo | None = None,
        user: str | None = None,
    ) -> ScanResult:
        """Scan ``message`` (CRLF line endings, as it will be delivered).

        Args:
            message: the message bytes.
            envelope: the transaction's envelope (rspamd uses From/Rcpt).
            session: the SMTP session (rspamd uses IP/Helo/User).
            user: per-user preferences (spamd ``User:``; nssmtpd ``checkspam message ?email?``).

        Raises:
            ScannerUnavailable: cannot connect.
            ScannerTimeout: no answer within the scanner's timeout.
            ScannerError: protocol error or an error reply from the daemon.
        """
        ...

    async def version(self) -> str:
        """The daemon's version string (nssmtpd ``spamversion`` / ``virusversion``)."""
        ...


class SpamLearner(Protocol):
    """A spam scanner that can be trained (nssmtpd ``trainspam 1|0 email message``)."""

    async def learn(self, message: bytes, spam: bool | None, *, user: str | None = None) -> str:
        """Teach the scanner: ``spam=True`` spam, ``False`` ham, ``None`` forget.

        Returns:
            The daemon's answer, summarised (e.g. ``"DidSet: local"``).

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: as for ``scan``.
        """
        ...


def parse_scanner_address(address: str) -> tuple[str, int] | str:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``.

    Returns:
        ``(host, port)`` for TCP, the socket path (``str``) for a Unix socket.

    Raises:
        ValueError: on a malformed address.
    """
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"empty Unix socket path in {address!r}")
        return path
    if address.startswith("/"):
        return address
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"malformed address {address!r}")
        port_s = rest[1:]
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r} needs host:port or unix:/path")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"malformed address {address!r}")
    return host, int(port_s)


async def open_scanner_connection(
    address: tuple[str, int] | str, timeout: float, name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a scanner over TCP or a Unix socket within ``timeout`` seconds.

    Raises:
        ScannerUnavailable: connection refused, socket missing, DNS failure.
        ScannerTimeout: the connection did not complete in time.
    """
    try:
        async with asyncio.timeout(timeout):
            if isinstance(address, str):
                return await asyncio.open_unix_connection(address, limit=1 << 20)
            return await asyncio.open_connection(address[0], address[1], limit=1 << 20)
    except TimeoutError as exc:
        raise ScannerTimeout(f"{name}: connect timed out after {timeout:g}s") from exc
    except OSError as exc:
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        raise ScannerUnavailable(f"{name}: cannot connect to {where}: {exc}") from exc

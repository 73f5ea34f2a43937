"""SpamAssassin ``spamd`` client: scan (SYMBOLS), train (TELL), PING, version.

Entry points: :class:`SpamdScanner` (implements ``Scanner`` and ``SpamLearner``),
:class:`SpamdReply`. Protocol: SPAMC/1.5 as described in SpamAssassin's
``spamd/PROTOCOL``; one request per TCP or Unix-socket connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..envelope import Envelope, SessionInfo
from ..errors import ScannerError, ScannerTimeout, ScannerUnavailable
from .base import Kind, ScanResult, open_scanner_connection, parse_scanner_address

__all__ = ["SYSEXITS", "SpamdReply", "SpamdScanner"]

log = logging.getLogger("smtpgate.scanners.spamd")

#: sysexits(3) codes spamd puts in its status line (``SPAMD/1.1 76 Bad header line``);
#: 79 is libspamc's ``EX_TIMEOUT``.
SYSEXITS: Mapping[int, str] = {
    0: "EX_OK",
    64: "EX_USAGE",
    65: "EX_DATAERR",
    66: "EX_NOINPUT",
    67: "EX_NOUSER",
    68: "EX_NOHOST",
    69: "EX_UNAVAILABLE",
    70: "EX_SOFTWARE",
    71: "EX_OSERR",
    72: "EX_OSFILE",
    73: "EX_CANTCREAT",
    74: "EX_IOERR",
    75: "EX_TEMPFAIL",
    76: "EX_PROTOCOL",
    77: "EX_NOPERM",
    78: "EX_CONFIG",
    79: "EX_TIMEOUT",
}

PROTOCOL_VERSION = "1.5"
#: Largest reply accepted, in bytes (SYMBOLS/TELL/PING/HEADERS replies are small).
MAX_REPLY = 1 << 20

_STATUS_RE = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+)(?: +(.*))?$")
_SPAM_RE = re.compile(
    r"^\s*(true|false|yes|no)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I
)
_VERB_RE = re.compile(r"^[A-Z_]{1,32}$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Tiny message scanned by :meth:`SpamdScanner.version` to read ``X-Spam-Checker-Version``.
_VERSION_PROBE = (
    b"From: smtpgate <postmaster@localhost>\r\n"
    b"To: smtpgate <postmaster@localhost>\r\n"
    b"Subject: smtpgate spamd version probe\r\n"
    b"Message-ID: <spamd-version-probe@localhost>\r\n"
    b"\r\n"
    b"version probe\r\n"
)


@dataclass(frozen=True, slots=True)
class SpamdReply:
    """One parsed spamd reply (``spamd/PROTOCOL``, "Responses").

    Attributes:
        protocol: the version in the status line (``"1.1"``, ``"1.5"``); spamd answers
            ``SPAMD/1.5`` to PING and ``SPAMD/1.1`` to the scanning verbs.
        code: sysexits value, 0 (``EX_OK``) on success.
        message: the status text (``"EX_OK"``, ``"PONG"``).
        headers: reply headers, names lower-cased (``{"spam": "True ; 1000.0 / 5.0"}``);
            a repeated header keeps its values joined with ``", "``.
        body: the reply body (``b"GTUBE,NO_RELAYS"`` for SYMBOLS), possibly empty.
    """

    protocol: str
    code: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def status_line(self) -> str:
        """The status line as spamd sent it, e.g. ``"SPAMD/1.5 0 PONG"``."""
        return f"SPAMD/{self.protocol} {self.code} {self.message}".rstrip()


def _check_user(user: str) -> str:
    """Return ``user`` if it can go in a ``User:`` header, else raise ValueError."""
    if _CTL_RE.search(user):
        raise ValueError("user name contains control characters")
    if len(user) > 256:
        raise ValueError("user name longer than 256 characters")
    return user


def parse_reply(data: bytes) -> SpamdReply:
    """Parse a complete spamd reply (everything read up to EOF).

    Lenient on line endings (CRLF or LF) and on a missing blank line after the status
    line (PING's ``SPAMD/1.5 0 PONG\\r\\n`` has none).

    Args:
        data: the raw reply bytes.

    Returns:
        The parsed :class:`SpamdReply` (any code; callers check ``code``).

    Raises:
        ScannerError: not a spamd reply (bad status line, header without ``:``,
            body shorter than ``Content-length``).
    """
    head, _, rest = data.partition(b"\n")
    status = _STATUS_RE.match(head.rstrip(b"\r"))
    if status is None:
        raise ScannerError(f"spamassassin: malformed spamd status line {head[:80]!r}")
    protocol = status.group(1).decode("ascii")
    code = int(status.group(2))
    message = (status.group(3) or b"").decode("utf-8", "replace").strip()
    headers: dict[str, str] = {}
    body = b""
    while rest:
        line, _, rest = rest.partition(b"\n")
        line = line.rstrip(b"\r")
        if not line:
            body = rest
            break
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise ScannerError(f"spamassassin: malformed spamd header line {line[:80]!r}")
        key = name.strip().decode("ascii", "replace").lower()
        text = value.strip().decode("utf-8", "replace")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise ScannerError("spamassassin: malformed Content-length in spamd reply") from None
        if length < 0 or len(body) < length:
            raise ScannerError(
                f"spamassassin: spamd reply body truncated ({len(body)} of {length} bytes)"
            )
        body = body[:length]
    return SpamdReply(protocol, code, message, headers, body)


class SpamdScanner:
    """SpamAssassin spamd client, one request per connection (SPAMC/1.5).

    Implements :class:`~smtpgate.scanners.base.Scanner` (``name`` ``"spamassassin"``,
    ``kind`` ``"spam"``) and :class:`~smtpgate.scanners.base.SpamLearner`.

    Per-user preferences: the user name (the ``user`` argument, else the constructor's)
    is sent *as given* in the ``User:`` header. smtpgate passes the recipient address
    (nssmtpd ``checkspam message ?email?``); spamd's ``--virtual-config-dir`` patterns
    (``%u`` full name, ``%l`` local part, ``%d`` domain) and its SQL/LDAP preferences
    key on that form. A spamd using Unix accounts falls back to its default user
    (``-U``, ``nobody``) for an unknown name; map addresses to local parts before
    calling if that is what the site needs.

    Args:
        address: ``host:port``, ``[v6]:port`` or ``unix:/path`` (spamd's default port is 783).
        timeout: seconds allowed for one whole request (connect, send, reply), > 0.
        max_size: messages longer than this many bytes are not sent (verdict
            ``"skipped"``), > 0. spamc's own default cap is 500 KB.
        user: default ``User:`` for scans and training, ``None`` for none.

    Raises:
        ValueError: malformed address, non-positive timeout/max_size, or a user name
            with control characters.
    """

    name = "spamassassin"
    kind: Kind = "spam"

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_size: int = 1048576,
        user: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self.address = address
        self._target = parse_scanner_address(address)
        self.timeout = float(timeout)
        self.max_size = int(max_size)
        self.user = _check_user(user) if user else None

    def __repr__(self) -> str:
        return f"SpamdScanner({self.address!r}, timeout={self.timeout:g})"

    # -- low level ---------------------------------------------------------------------

    async def request(
        self,
        verb: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> SpamdReply:
        """Send one SPAMC/1.5 request and read the whole reply.

        Writes ``VERB SPAMC/1.5``, ``Content-length``, ``headers``, a blank line and
        ``body``; half-closes the write side; reads until spamd closes. The whole
        exchange is bounded by the scanner's ``timeout``.

        Args:
            verb: ``SYMBOLS``, ``CHECK``, ``REPORT``, ``HEADERS``, ``TELL``, ``PING``...
            body: the message bytes (may be empty).
            headers: extra request headers, ``(name, value)`` pairs.

        Returns:
            The reply; ``code`` is 0 (non-zero codes raise).

        Raises:
            ValueError: ``verb`` or a header is not a valid token / has control characters.
            ScannerUnavailable: cannot connect, or spamd closed without replying.
            ScannerTimeout: no complete reply within ``timeout`` seconds.
            ScannerError: malformed reply, reply over 1 MiB, or a non-zero status
                (the text names it, e.g. ``EX_PROTOCOL``).
        """
        if not _VERB_RE.match(verb):
            raise ValueError(f"invalid spamd verb {verb!r}")
        lines = [f"{verb} SPAMC/{PROTOCOL_VERSION}", f"Content-length: {len(body)}"]
        for hname, hvalue in headers:
            if not _HEADER_NAME_RE.match(hname) or _CTL_RE.search(hvalue):
                raise ValueError(f"invalid spamd request header {hname!r}")
            lines.append(f"{hname}: {hvalue}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                data = await self._exchange(payload)
        except TimeoutError:
            raise ScannerTimeout(
                f"spamassassin: no answer from {self.address} to {verb} within {self.timeout:g}s"
            ) from None
        reply = parse_reply(data)
        log.debug(
            "spamd %s: %d bytes sent, %s (%.3fs)",
            verb,
            len(body),
            reply.status_line,
            time.monotonic() - started,
        )
        if reply.code != 0:
            name = SYSEXITS.get(reply.code, "unknown code")
            raise ScannerError(
                f"spamassassin: spamd answered {verb} with {reply.code} {name}: "
                f"{reply.message[:200]}"
            )
        return reply

    async def _exchange(self, payload: bytes) -> bytes:
        """Connect, write ``payload``, half-close, read to EOF (at most :data:`MAX_REPLY`)."""
        reader, writer = await open_scanner_connection(self._target, self.timeout, self.name)
        try:
            try:
                writer.write(payload)
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
            except ConnectionError:
                # spamd may answer (an error) and close before reading everything:
                # whatever it said is still in the read buffer.
                pass
            chunks: list[bytes] = []
            total = 0
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError as exc:
                    if total:
                        break
                    raise ScannerUnavailable(
                        f"spamassassin: {self.address} dropped the connection: {exc}"
                    ) from exc
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_REPLY:
                    raise ScannerError(f"spamassassin: spamd reply larger than {MAX_REPLY} bytes")
                chunks.append(chunk)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if not total:
            raise ScannerUnavailable(
                f"spamassassin: {self.address} closed the connection without a reply"
            )
        return b"".join(chunks)

    def _user_headers(self, user: str | None) -> list[tuple[str, str]]:
        """The ``User:`` header for ``user`` (else the default); ScannerError if invalid."""
        chosen = user or self.user
        if not chosen:
            return []
        try:
            return [("User", _check_user(chosen))]
        except ValueError as exc:
            raise ScannerError(f"spamassassin: invalid user name: {exc}") from None

    # -- Scanner -------------------------------------------------------------------------

    async def scan(
        self,
        message: bytes,
        *,
        envelope: Envelope | None = None,
        session: SessionInfo | None = None,
        user: str | None = None,
    ) -> ScanResult:
        """Scan ``message`` with spamd's SYMBOLS verb.

        Args:
            message: the message bytes (CRLF line endings).
            envelope: unused (spamd reads the envelope from the headers).
            session: unused.
            user: ``User:`` for per-user preferences (overrides the constructor's).

        Returns:
            ``ScanResult`` with verdict ``"spam"`` or ``"clean"`` (spamd's ``Spam:``
            header), ``score`` and ``threshold`` (required score), ``symbols`` (rule
            names), ``detail`` ``"score=S required=T"``; or verdict ``"skipped"``
            with detail ``"message larger than max_size"`` when
            ``len(message) > max_size`` (nothing is sent then).

        Raises:
            ScannerUnavailable: cannot connect / connection closed without a reply.
            ScannerTimeout: no answer within ``timeout`` seconds.
            ScannerError: error status, malformed reply, missing ``Spam:`` header,
                or an invalid user name.
        """
        if len(message) > self.max_size:
            log.debug("spamd: %d-byte message over max_size %d", len(message), self.max_size)
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="skipped",
                detail="message larger than max_size",
            )
        headers = self._user_headers(user)
        started = time.monotonic()
        reply = await self.request("SYMBOLS", message, headers)
        elapsed = time.monotonic() - started
        spam = _SPAM_RE.match(reply.headers.get("spam", ""))
        if spam is None:
            raise ScannerError("spamassassin: spamd reply has no valid Spam: header")
        is_spam = spam.group(1).lower() in ("true", "yes")
        score, threshold = float(spam.group(2)), float(spam.group(3))
        text = reply.body.decode("utf-8", "replace")
        symbols = tuple(s.strip() for s in text.split(",") if s.strip())
        return ScanResult(
            scanner=self.name,
            kind=self.kind,
            verdict="spam" if is_spam else "clean",
            score=score,
            threshold=threshold,
            symbols=symbols,
            detail=f"score={score:g} required={threshold:g}",
            elapsed=elapsed,
        )

    async def version(self) -> str:
        """The daemon's version (nssmtpd ``spamversion``).

        spamd has no version verb. This sends PING (the status line gives the protocol,
        ``SPAMD/1.5``), then HEADERS on a tiny built-in message and reads SpamAssassin's
        version from ``X-Spam-Checker-Version`` (the host name after ``on`` is dropped)
        or, failing that, ``version=`` in ``X-Spam-Status``.

        Returns:
            ``"SpamAssassin 4.0.1 (2024-03-25); SPAMD/1.5"``, or just ``"SPAMD/1.5"``
            when the HEADERS probe fails or the site removed those headers.

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: the PING failed.
        """
        pong = await self.request("PING")
        proto = f"SPAMD/{pong.protocol}"
        try:
            reply = await self.request("HEADERS", _VERSION_PROBE, self._user_headers(None))
        except ScannerError as exc:
            log.debug("spamd version probe failed: %s", exc)
            return proto
        found = _software_version(reply.body)
        return f"{found}; {proto}" if found else proto

    async def ping(self) -> bool:
        """PING spamd (``SPAMD/1.5 0 PONG``).

        Returns:
            True if spamd answered PONG within ``timeout``; False on any scanner error
            (never raises :class:`~smtpgate.errors.ScannerError`).
        """
        try:
            reply = await self.request("PING")
        except ScannerError as exc:
            log.debug("spamd ping failed: %s", exc)
            return False
        return reply.message.upper() == "PONG"

    # -- SpamLearner ----------------------------------------------------------------------

    async def learn(self, message: bytes, spam: bool | None, *, user: str | None = None) -> str:
        """Train spamd's Bayes database with TELL (spamd must run with ``--allow-tell``).

        ``spam=True`` sends ``Message-class: spam`` + ``Set: local``; ``False`` sends
        ``Message-class: ham`` + ``Set: local``; ``None`` (forget) sends ``Remove: local``.

        Args:
            message: the message bytes. Not subject to ``max_size``: training is explicit.
            spam: True spam, False ham, None forget.
            user: ``User:`` whose database is trained (overrides the constructor's).

        Returns:
            spamd's answer: ``"DidSet: local"``, ``"DidRemove: local"`` (both joined
            with ``"; "`` if present), or ``"unchanged"`` when spamd changed nothing
            (message already learned that way, or not known when forgetting).

        Raises:
            ScannerUnavailable / ScannerTimeout: as for :meth:`scan`.
            ScannerError: error status, e.g. ``EX_NOPERM`` when TELL is not allowed.
        """
        headers = self._user_headers(user)
        if spam is None:
            headers.append(("Remove", "local"))
        else:
            headers.append(("Message-class", "spam" if spam else "ham"))
            headers.append(("Set", "local"))
        reply = await self.request("TELL", message, headers)
        parts = [
            f"{label}: {reply.headers[key]}"
            for key, label in (("didset", "DidSet"), ("didremove", "DidRemove"))
            if reply.headers.get(key)
        ]
        return "; ".join(parts) if parts else "unchanged"


def _software_version(headers: bytes) -> str:
    """SpamAssassin's version from a HEADERS reply body, ``""`` if absent."""
    text = headers.decode("utf-8", "replace").replace("\r\n\t", " ").replace("\r\n ", " ")
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-spam-checker-version":
            return re.sub(r"\s+on\s+\S+\s*$", "", value.strip())
    found = re.search(r"\bversion=(\S+)", text)
    return f"SpamAssassin {found.group(1)}" if found else ""

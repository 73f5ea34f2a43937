"""rspamd client: scan over the normal worker (``POST /checkv2``), train over the controller.

Entry points: :class:`RspamdScanner` (implements ``Scanner`` and ``SpamLearner``),
:data:`SPAM_ACTIONS`. Protocol: rspamd's HTTP protocol (rspamd.com/doc/developers/protocol.html)
over HTTP/1.1 (RFC 9110/9112) with aiohttp's client (the project's one HTTP stack), one
request per TCP or Unix-socket connection.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..envelope import Envelope, SessionInfo
from ..errors import ScannerError, ScannerTimeout, ScannerUnavailable
from .base import Kind, ScanResult, Verdict, parse_scanner_address

__all__ = [
    "CLEAN_ACTIONS",
    "DEFAULT_CONTROLLER_PORT",
    "DEFAULT_PORT",
    "MAX_REPLY",
    "SPAM_ACTIONS",
    "RspamdScanner",
]

log = logging.getLogger("smtpgate.scanners.rspamd")

#: rspamd's normal (scanning) worker port.
DEFAULT_PORT = 11333
#: rspamd's controller worker port (learning, statistics; may require ``Password:``).
DEFAULT_CONTROLLER_PORT = 11334
#: Largest HTTP reply accepted (status line, headers and body), in bytes.
MAX_REPLY = 16 << 20

#: rspamd actions that make the verdict ``"spam"``: each one asks the MTA to do something
#: about the message (reject it, defer it, or mark it). Any action rspamd may add later
#: (custom actions such as ``"discard"`` or ``"quarantine"``) counts as spam too.
SPAM_ACTIONS = frozenset({"reject", "soft reject", "rewrite subject", "add header", "greylist"})
#: The only action that makes the verdict ``"clean"``.
CLEAN_ACTIONS = frozenset({"no action"})

_HEADER_NAME_RE = re.compile(r"^[!-9;-~]{1,128}$")  # RFC 5322 §2.2 field-name (ftext)
_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")
_CTL_NO_TAB_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LINEBREAK_RE = re.compile(r"\r\n|\r|\n")
_ALREADY_LEARNED = "already learned"


@dataclass(frozen=True, slots=True)
class _HttpReply:
    """One HTTP reply, as :meth:`RspamdScanner._exchange` read it with aiohttp's client.

    Attributes:
        status: the status code (``200``).
        reason: the reason phrase; rspamd puts its error text there (``"204 <id> contains
            less tokens than required..."``).
        headers: header fields, names lower-cased; a repeated field keeps the last value.
        body: the decoded body (chunked transfer coding removed).
    """

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ScannerError: the body is not UTF-8 JSON.
        """
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ScannerError(f"rspamd: reply is not JSON ({exc})") from exc

    def error_text(self) -> str:
        """rspamd's error text: the ``error`` member of a JSON body, else the reason phrase.

        Never longer than 300 characters and free of control characters (log safe).
        """
        text = ""
        try:
            data = json.loads(self.body.decode("utf-8")) if self.body else None
        except (UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
        if not text:
            text = self.reason
        return _CTL_RE.sub(" ", text)[:300]


class RspamdScanner:
    """Client for one rspamd (``[[scanner]] type = "rspamd"``).

    Scanning posts the message to ``/checkv2`` on the normal worker with the envelope and
    session in rspamd's request headers (protocol doc, "HTTP headers"):

    ================  ==========================================================
    ``From``          envelope reverse-path; ``<>`` for the null reverse-path
    ``Rcpt``          one header per envelope recipient, in order
    ``IP``            the client's IP address (``session.peer_ip``)
    ``Helo``          the HELO/EHLO argument
    ``Hostname``      the client's reverse-DNS name, sent only when known (see below)
    ``User``          the SMTP AUTH identity (``session.auth_user``)
    ``Queue-Id``      ``queue_id`` if given, else ``session.session_id`` (rspamd logs it)
    ``Deliver-To``    ``user`` (per-user settings and statistics)
    ``MTA-Name``      smtpgate's host name (``session.hostname``), for Authentication-Results
    ``TLS-Version``,  the session's TLS parameters, when TLS is active
    ``TLS-Cipher``
    ``Settings-ID``   the configured ``settings_id``, if any
    ================  ==========================================================

    ``Hostname`` means the *client's* resolved host name to rspamd (without it rspamd's
    hfilter adds ``HFILTER_HOSTNAME_UNKNOWN``); :class:`SessionInfo` has no such field, so it
    is read from a ``peer_hostname`` attribute or ``session.notes["peer_hostname"]`` when a
    hook or stage has set one. smtpgate's own name goes in ``MTA-Name`` instead.

    Verdict mapping (rspamd's ``action``): ``"no action"`` gives ``"clean"`` (or
    ``"skipped"`` when rspamd also reports ``is_skipped``, i.e. its settings skipped the
    checks); ``"reject"``, ``"soft reject"``, ``"rewrite subject"``, ``"add header"``,
    ``"greylist"`` and any other action give ``"spam"``. rspamd's ``action`` is kept in
    :attr:`ScanResult.action` so the scanner stage can answer 5xx/4xx per action. Note that
    rspamd also uses ``soft reject`` for rate limits and greylisting, not only for spam.

    Learning posts to ``/learnspam`` or ``/learnham`` on the controller, with ``Password:``
    when one is configured. rspamd has no "forget" endpoint for its Bayes classifier
    (learning a message as the other class moves it there), so ``learn(..., None)`` raises.

    Args:
        address: normal worker, ``host:port``, ``[v6]:port`` or ``unix:/path``
            (rspamd's default port is 11333).
        controller: controller worker address, same forms; default: the host of a TCP
            ``address`` with port 11334, none for a Unix-socket ``address``.
        password: controller password (``Password:`` header); never logged or shown.
        timeout: seconds allowed for each whole exchange (connect, send, read reply).
        max_size: messages longer than this many bytes are not scanned (verdict
            ``"skipped"``).
        settings_id: rspamd settings id sent as ``Settings-ID`` with every scan.

    Raises:
        ValueError: malformed address, non-positive ``timeout``/``max_size``, or control
            characters in ``settings_id`` or ``password``.
    """

    name: str = "rspamd"
    kind: Kind = "spam"

    def __init__(
        self,
        address: str,
        *,
        controller: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        max_size: int = 1048576,
        settings_id: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        if settings_id is not None and (not settings_id or _CTL_RE.search(settings_id)):
            raise ValueError("settings_id must be a non-empty string without control characters")
        self.address = address
        self._target = parse_scanner_address(address)
        if controller:
            self.controller: str | None = controller
            self._controller_target: tuple[str, int] | str | None = parse_scanner_address(
                controller
            )
        elif isinstance(self._target, tuple):
            self._controller_target = (self._target[0], DEFAULT_CONTROLLER_PORT)
            self.controller = _host_header(self._controller_target)
        else:
            self.controller = None
            self._controller_target = None
        if password is not None and _CTL_RE.search(password):
            raise ValueError("password must not contain control characters")
        self._password = password or None
        self.timeout = float(timeout)
        self.max_size = int(max_size)
        self.settings_id = settings_id

    def __repr__(self) -> str:
        return (
            f"RspamdScanner({self.address!r}, controller={self.controller!r}, "
            f"password={'<set>' if self._password else None}, timeout={self.timeout:g}, "
            f"max_size={self.max_size})"
        )

    # -- Scanner -----------------------------------------------------------------------

    async def scan(
        self,
        message: bytes,
        *,
        envelope: Envelope | None = None,
        session: SessionInfo | None = None,
        user: str | None = None,
        queue_id: str | None = None,
    ) -> ScanResult:
        """Scan ``message`` with ``POST /checkv2`` (protocol doc, "Rspamd HTTP request").

        Args:
            message: the message bytes (CRLF line endings, as delivered).
            envelope: gives ``From`` and the ``Rcpt`` headers.
            session: gives ``IP``, ``Helo``, ``User`` (AUTH identity), ``Queue-Id``
                (session id), ``MTA-Name``, TLS and ``Hostname`` (see the class doc).
            user: the recipient whose preferences apply, sent as ``Deliver-To``.
            queue_id: overrides ``Queue-Id`` (e.g. the queue file name).

        Returns:
            The result; ``verdict`` per the class doc's mapping, ``score``/``threshold``
            from ``score``/``required_score``, ``symbols`` sorted by score (highest first,
            then by name), ``subject`` from ``subject`` (action ``rewrite subject``) and
            ``headers`` from ``milter.add_headers``. Over ``max_size``: ``"skipped"``.

        Raises:
            ScannerUnavailable: cannot connect, or rspamd closed without a full reply.
            ScannerTimeout: no complete reply within ``timeout`` seconds.
            ScannerError: HTTP status other than 200, or a reply that is not the
                expected JSON object.
        """
        if len(message) > self.max_size:
            log.debug("rspamd: not scanning %d bytes (max_size %d)", len(message), self.max_size)
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="skipped",
                detail=f"message size {len(message)} bytes over max_size {self.max_size}",
            )
        headers = self._scan_headers(envelope, session, user, queue_id)
        started = time.monotonic()
        reply = await self._exchange(self._target, "POST", "/checkv2", headers, message)
        elapsed = time.monotonic() - started
        if reply.status != 200:
            raise ScannerError(
                f"rspamd: /checkv2 failed: HTTP {reply.status}: {reply.error_text()}"
            )
        result = _parse_check_reply(reply.json(), self.name, self.kind, elapsed)
        log.debug("rspamd: %s in %.3fs", result.detail, elapsed)
        return result

    async def version(self) -> str:
        """The daemon's version, e.g. ``"rspamd 3.4"``.

        Read from the ``Server: rspamd/3.4`` header of ``GET /ping`` on the normal worker;
        if that header is missing, from the ``version`` member of the controller's
        ``GET /stat`` reply.

        Raises:
            ScannerUnavailable / ScannerTimeout: as for :meth:`scan`.
            ScannerError: neither source gave a version.
        """
        reply = await self._exchange(self._target, "GET", "/ping", [], b"")
        if reply.status != 200:
            raise ScannerError(f"rspamd: /ping failed: HTTP {reply.status}: {reply.error_text()}")
        server = reply.headers.get("server", "")
        if server.lower().startswith("rspamd/") and len(server) > 7:
            return f"rspamd {server[7:]}"
        if self._controller_target is not None:
            stat = await self._exchange(
                self._controller_target, "GET", "/stat", self._password_header(), b""
            )
            if stat.status == 200:
                data = stat.json()
                if isinstance(data, dict) and isinstance(data.get("version"), str):
                    return f"rspamd {_CTL_RE.sub('', data['version'])}"
        raise ScannerError("rspamd: the reply carries no version")

    # -- SpamLearner -------------------------------------------------------------------

    async def learn(self, message: bytes, spam: bool | None, *, user: str | None = None) -> str:
        """Train rspamd's Bayes classifier via the controller (``/learnspam``, ``/learnham``).

        Args:
            message: the message bytes.
            spam: ``True`` learn as spam, ``False`` as ham; ``None`` (forget) is not
                supported by rspamd and raises.
            user: sent as ``Deliver-To`` (used by a ``per_user`` classifier).

        Returns:
            ``"success: learned as spam"`` (HTTP 200 ``{"success": true}``);
            ``"already learned: <rspamd's text>"`` when rspamd already learned this message
            as that class (rspamd 3.x answers 208, later versions 404);
            ``"not learned: <rspamd's text>"`` when rspamd declined without error (HTTP 204,
            e.g. ``"contains less tokens than required for bayes classifier"``).

        Raises:
            ScannerError: ``spam`` is ``None``; no controller address; the controller
                refused the password (401/403); any other error reply.
            ScannerUnavailable / ScannerTimeout: as for :meth:`scan`.
        """
        if spam is None:
            raise ScannerError(
                "rspamd cannot forget a message: it has no unlearn endpoint "
                "(learn it as the other class instead)"
            )
        if self._controller_target is None:
            raise ScannerError("rspamd: no controller address configured for learning")
        klass = "spam" if spam else "ham"
        path = f"/learn{klass}"
        headers = self._password_header()
        if user:
            headers.append(("Deliver-To", _clean(user)))
        reply = await self._exchange(self._controller_target, "POST", path, headers, message)
        text = reply.error_text()
        if reply.status == 200:
            data = reply.json()
            if isinstance(data, dict) and data.get("success") is True:
                log.debug("rspamd: learned a message as %s", klass)
                return f"success: learned as {klass}"
            raise ScannerError(f"rspamd: {path}: unexpected answer {text!r}")
        if _ALREADY_LEARNED in text.lower():
            log.debug("rspamd: %s: %s", path, text)
            return f"already learned: {text}"
        if reply.status == 204:
            return f"not learned: {text}"
        if reply.status in (401, 403):
            raise ScannerError(
                f"rspamd: {path}: the controller refused the "
                f"{'password' if self._password else 'request (no password configured)'}"
                f" (HTTP {reply.status})"
            )
        raise ScannerError(f"rspamd: {path} failed: HTTP {reply.status}: {text}")

    # -- internals ---------------------------------------------------------------------

    def _password_header(self) -> list[tuple[str, str]]:
        return [("Password", self._password)] if self._password else []

    def _scan_headers(
        self,
        envelope: Envelope | None,
        session: SessionInfo | None,
        user: str | None,
        queue_id: str | None,
    ) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        if envelope is not None:
            headers.append(("From", _clean(envelope.mail_from) or "<>"))
            headers.extend(("Rcpt", _clean(r)) for r in envelope.recipients if _clean(r))
        if session is not None:
            if _is_ip(session.peer_ip):
                headers.append(("IP", session.peer_ip))
            if session.helo_name:
                headers.append(("Helo", _clean(session.helo_name)))
            peer_hostname = getattr(session, "peer_hostname", None) or session.notes.get(
                "peer_hostname"
            )
            if isinstance(peer_hostname, str) and _clean(peer_hostname):
                headers.append(("Hostname", _clean(peer_hostname)))
            if session.auth_user:
                headers.append(("User", _clean(session.auth_user)))
            if session.hostname:
                headers.append(("MTA-Name", _clean(session.hostname)))
            if session.tls_version:
                headers.append(("TLS-Version", _clean(session.tls_version)))
            if session.tls_cipher:
                headers.append(("TLS-Cipher", _clean(session.tls_cipher)))
        qid = queue_id or (session.session_id if session is not None else None)
        if qid and _clean(qid):
            headers.append(("Queue-Id", _clean(qid)))
        if user and _clean(user):
            headers.append(("Deliver-To", _clean(user)))
        if self.settings_id:
            headers.append(("Settings-ID", self.settings_id))
        return headers

    async def _exchange(
        self,
        target: tuple[str, int] | str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> _HttpReply:
        """One HTTP/1.1 request on a fresh connection through aiohttp's client, bounded by
        ``timeout`` seconds overall (connect, send, read the whole reply).

        aiohttp frames the request (``Host``, ``Content-Length`` for POST,
        ``Connection: close``) and parses the reply (RFC 9112: ``Content-Length``, chunked
        coding, or the end of the connection); the body is read up to :data:`MAX_REPLY`
        bytes.

        Raises:
            ScannerUnavailable: cannot connect (refused, missing socket, DNS), or the
                connection ended before a complete reply.
            ScannerTimeout: no complete reply within ``timeout`` seconds.
            ScannerError: the reply is not HTTP, is malformed or is over :data:`MAX_REPLY`.
        """
        import aiohttp

        if isinstance(target, str):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=target, force_close=True)
            where = target
        else:
            connector = aiohttp.TCPConnector(force_close=True, use_dns_cache=False)
            where = _host_header(target)
        _use_head_first_protocol(connector)
        url = f"http://{_host_header(target)}{path}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline), aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("Accept-Encoding", "Content-Type"),
                auto_decompress=False,
            ) as http, http.request(
                method, url, headers=list(headers), data=body if method == "POST" else None,
                allow_redirects=False,
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_REPLY:
                        raise ScannerError(f"rspamd: reply to {method} {path} is too large "
                                           f"(over {MAX_REPLY} bytes)")
                    chunks.append(chunk)
                return _HttpReply(
                    status=response.status,
                    reason=response.reason or "",
                    headers={k.lower(): v for k, v in response.headers.items()},
                    body=b"".join(chunks),
                )
        except TimeoutError as exc:
            raise ScannerTimeout(
                f"rspamd: no reply to {method} {path} within {self.timeout:g}s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ScannerUnavailable(
                f"rspamd: cannot connect to {where}: {exc.os_error.strerror or exc.os_error}"
            ) from exc
        except aiohttp.ClientResponseError as exc:  # aiohttp could not parse the reply
            text = _CTL_RE.sub(" ", exc.message.split("\n", 1)[0]).strip()[:120]
            if "content-length" in exc.message.lower():
                what = "bad Content-Length in the reply"
            elif "status line" in exc.message.lower():
                what = "not an HTTP reply"
            else:
                what = "malformed HTTP reply"
            raise ScannerError(f"rspamd: {what} to {method} {path}: {text}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise ScannerUnavailable(
                f"rspamd: connection closed before a complete reply to {method} {path}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:  # reset, broken pipe
            raise ScannerUnavailable(
                f"rspamd: connection failed during {method} {path}: {exc}"
            ) from exc


def _use_head_first_protocol(connector: Any) -> None:
    """Make ``connector``'s connections hand aiohttp's parser the reply head on its own.

    rspamd 3.x answers ``204`` (e.g. "contains less tokens than required") with a JSON
    body as well, which RFC 9112 §6.3 forbids: aiohttp's parser, given the head and that
    body in one read, refuses the whole read ("Data after `Connection: close`") and the
    reply is lost. Fed the head first, it completes the bodiless reply (which is all
    rspamd means: the text is in its reason phrase too); the stray body is then refused
    on a connection whose reply is already complete and is discarded with it. Replies
    with a body are parsed exactly as before (the parser is incremental).

    Uses aiohttp's ``BaseConnector._factory`` (the protocol factory).
    """
    from aiohttp.client_proto import ResponseHandler

    class _HeadFirst(ResponseHandler):
        _head_seen = False
        _carry = b""

        def data_received(self, data: bytes) -> None:
            if not self._head_seen and data:
                joined = self._carry + data
                end = joined.find(b"\r\n\r\n")
                if end >= 0:
                    self._head_seen = True
                    split = end + 4 - len(self._carry)
                    if 0 < split < len(data):
                        super().data_received(data[:split])
                        data = data[split:]
                else:
                    self._carry = joined[-3:]
            super().data_received(data)

    loop = connector._loop
    connector._factory = functools.partial(_HeadFirst, loop=loop)  # noqa: SLF001


def _parse_check_reply(data: Any, scanner: str, kind: Kind, elapsed: float) -> ScanResult:
    """Turn a ``/checkv2`` JSON reply (protocol doc, "Rspamd HTTP reply") into a result.

    Raises:
        ScannerError: not an object, or ``action``/``score`` missing or of the wrong type.
    """
    if not isinstance(data, dict):
        raise ScannerError("rspamd: reply is not a JSON object")
    action = data.get("action")
    score = _as_float(data.get("score"))
    if not isinstance(action, str) or not action:
        raise ScannerError("rspamd: reply has no action")
    if score is None:
        raise ScannerError("rspamd: reply has no numeric score")
    threshold = _as_float(data.get("required_score"))
    verdict: Verdict
    if action in CLEAN_ACTIONS:
        verdict = "skipped" if data.get("is_skipped") is True else "clean"
    else:
        verdict = "spam"
    symbols: list[tuple[float, str]] = []
    raw_symbols = data.get("symbols")
    if isinstance(raw_symbols, dict):
        for name, sym in raw_symbols.items():
            sym_score = _as_float(sym.get("score")) if isinstance(sym, dict) else None
            symbols.append((sym_score or 0.0, str(name)))
    symbols.sort(key=lambda item: (-item[0], item[1]))
    subject = data.get("subject")
    subject = _fold(subject, " ") if isinstance(subject, str) and subject else None
    milter = data.get("milter")
    add_headers = milter.get("add_headers") if isinstance(milter, dict) else None
    headers = tuple(_added_headers(add_headers)) if isinstance(add_headers, dict) else ()
    detail = f"{action} (score {score:.2f}"
    detail += f"/{threshold:.2f})" if threshold is not None else ")"
    messages = data.get("messages")
    if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
        detail += f": {_CTL_RE.sub(' ', messages['smtp_message'])[:200]}"
    return ScanResult(
        scanner=scanner,
        kind=kind,
        verdict=verdict,
        score=score,
        threshold=threshold,
        symbols=tuple(name for _, name in symbols),
        action=action,
        subject=subject,
        headers=headers,
        detail=detail,
        elapsed=elapsed,
    )


def _added_headers(add_headers: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """``milter.add_headers`` entries as ``(name, value)`` pairs, in rspamd's order.

    An entry is ``"value"``, ``{"value": ..., "order": n}`` or a list of those (several
    fields of one name); ``order`` (the insert position) is not kept. Values are
    re-folded with CRLF + TAB so that no bare CR/LF reaches the message; fields with an
    invalid name are dropped.
    """
    for name, entry in add_headers.items():
        if not _HEADER_NAME_RE.match(name):
            log.warning("rspamd: ignoring header with invalid name %r", name[:60])
            continue
        for item in entry if isinstance(entry, list) else [entry]:
            value = item.get("value") if isinstance(item, dict) else item
            if isinstance(value, str):
                yield name, _fold(value, "\r\n\t")


def _fold(value: str, joiner: str) -> str:
    """Join the non-empty lines of ``value`` with ``joiner``; drop other control chars."""
    lines = (_CTL_NO_TAB_RE.sub("", ln).strip() for ln in _LINEBREAK_RE.split(value))
    return joiner.join(ln for ln in lines if ln)


def _clean(value: str) -> str:
    """``value`` without control characters (an HTTP header value cannot carry them)."""
    return _CTL_RE.sub("", value).strip()


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _as_float(value: Any) -> float | None:
    """A JSON number as ``float``; ``None`` for anything else (booleans included)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _host_header(target: tuple[str, int] | str) -> str:
    """RFC 9110 §7.2 ``Host`` value: ``host:port`` (``[v6]:port``); ``localhost`` for Unix."""
    if isinstance(target, str):
        return "localhost"
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

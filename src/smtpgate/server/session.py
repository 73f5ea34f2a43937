"""The session driver: one asyncio protocol per client connection.

Entry point: :class:`Session` (an ``asyncio.Protocol``), created by
:class:`smtpgate.server.listener.SmtpServer`. It feeds received bytes to the sans-IO
core, runs the plugin chain of each stage (it knows no individual check) and the
delivery, and writes the replies,
batched while the client pipelines (RFC 2920). Timeouts (RFC 5321 §4.5.3.2) are
deadlines per request, as Postfix's ``smtpd_per_request_deadline`` and
``smtpd_min_data_rate``: a whole command line within ``command_timeout``, message data
at ``min_data_rate`` (see :meth:`Session._wait_data`); expiry gives ``421 4.4.2``.
STARTTLS per RFC 3207 and implicit TLS per RFC 8314 (``loop.start_tls``, asyncio and
uvloop alike), AUTH per RFC 4954. No protocol rules here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import itertools
import logging
import os
import re
import socket
import struct
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

from .. import metrics as _metrics
from ..delivery.received import build_received
from ..envelope import Envelope, Recipient, SessionInfo
from ..errors import AuthError, DeliveryError
from ..hooks import HookResult, Stage, Transaction, Verdict, default_reply
from ..hooks.verdict import CONT_RESULT
from ..logs import Event, send_log
from ..message import Message, MessageSpool
from ..net import client_key, parse_client_ip
from ..protocol import (
    NEED_DATA,
    AuthCredentials,
    AutoReply,
    BdatStart,
    Data,
    DataComplete,
    Etrn,
    Expn,
    Helo,
    MailFrom,
    MessageChunk,
    Quit,
    RcptTo,
    Rset,
    ServerConnection,
    StartTls,
    UnknownCommand,
    Vrfy,
)
from ..reply import R, Reply
from .admission import AdmissionKind

if TYPE_CHECKING:
    from .context import ServerContext
    from .listener import SmtpServer

log = logging.getLogger("smtpgate.session")

# A long message's temporary file could not be written (RFC 3463 X.3.1 / X.3.0).
_STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
_STORAGE_FAILED = Reply(451, "4.3.0", "Local error writing the message, try again later")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# Session.kill() (admin API): RFC 5321 §3.8 421, RFC 3463 X.3.2 "system not accepting".
_KILLED = Reply(421, "4.3.2", "Connection closed by the administrator")

_PAUSE_AT = 1 << 20  # bytes of unprocessed command input before we stop reading
_REFUSED_HOLD = 2.0  # seconds a refused connection keeps its slot (see connection_made)
_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid() & 0xFFFF:04X}{int(time.time()) & 0xFFFFFF:06X}"


# The ``stage`` of a reply in the logs and in ``smtpgate_replies_total`` (a bounded set).
_STAGE_OF: dict[type, str] = {
    RcptTo: "rcpt", MailFrom: "mail", Data: "data", BdatStart: "data",
    DataComplete: "message", Helo: "helo", Rset: "rset", Quit: "quit", StartTls: "starttls",
    AuthCredentials: "auth", Vrfy: "vrfy", Expn: "expn", UnknownCommand: "unknown",
    Etrn: "etrn",
}
_VERBS = {"helo": "helo", "ehlo": "helo", "lhlo": "helo", "mail": "mail", "rcpt": "rcpt",
          "data": "data", "bdat": "data", "rset": "rset", "noop": "noop", "quit": "quit",
          "vrfy": "vrfy", "expn": "expn", "help": "help", "starttls": "starttls",
          "auth": "auth", "etrn": "etrn"}


def _stage_of_line(command: str) -> str:
    """The stage of an automatic reply from its command line (``"other"`` for any verb
    not in :data:`_VERBS`: a bounded label)."""
    verb = command.split(None, 1)[0].lower() if command.strip() else ""
    return _VERBS.get(verb, "other")


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def _message_id(tx: Transaction) -> str | None:
    """The Message-ID header field's value (its first line), for the transaction log line:
    a search of the header block, cheaper than parsing the header (``None``: no field or
    no message)."""
    try:
        source = tx.source()
    except RuntimeError:
        return None
    head = source if isinstance(source, bytes) else source.prefix
    end = head.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(head, 0, end + 2 if end >= 0 else len(head))
    if found is None:
        return None
    return found.group(1).strip().decode("utf-8", "replace") or None


def _new_session_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):06X}"


def _expand_greeting(template: str, hostname: str) -> str:
    """ZMailer hdr220-style banner: %H host name, %V version, %T current time (RFC 5322).

    Only a banner with ``%T`` changes from one session to the next; the others are
    expanded once (:func:`_expand_fixed`), not at every connection.
    """
    if "%T" not in template:
        return _expand_fixed(template, hostname)
    from email.utils import formatdate

    return _expand_fixed(template, hostname).replace("%T", formatdate(localtime=True))


@functools.lru_cache(maxsize=64)
def _expand_fixed(template: str, hostname: str) -> str:
    from .. import __version__

    return template.replace("%H", hostname).replace("%V", __version__)


def _trusted(ip: str, networks: tuple[Any, ...]) -> bool:
    addr = parse_client_ip(ip)
    if addr is None:
        return False
    return any(addr in net for net in networks if addr.version == net.version)


def _feed_protocol(proto: Any, data: bytes) -> None:
    """Hand bytes to a (possibly buffered) protocol, as its transport would."""
    if hasattr(proto, "get_buffer"):
        while data:
            buf = proto.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            proto.buffer_updated(n)
            data = data[n:]
    else:
        proto.data_received(data)


class _Deadlines:
    """The request deadlines of all sessions on one event loop, behind one loop timer.

    A ``TimerHandle`` per waiting session costs about 570 bytes under uvloop (its
    ``uv_timer_t`` and the Python handle); an entry here, ``[when, seq, session]``,
    about 130 (issue 13, idle connection memory). Expiry is as exact as with one timer
    per session: the loop timer is always armed for the earliest live entry, and
    :meth:`_fire` calls ``Session._on_timer`` for every entry due by the loop's clock.
    A cancelled entry only drops its session reference; the heap is rebuilt without
    cancelled entries once they are more than half of it (as asyncio does with its own
    cancelled timers).
    """

    __slots__ = ("_loop", "_heap", "_handle", "_handle_at", "_seq", "_cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list[Any]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._seq = itertools.count()
        self._cancelled = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        """The scheduler of ``loop`` (created on first use; dropped with the loop)."""
        sched = _deadlines.get(loop)
        if sched is None:
            sched = _deadlines[loop] = cls(loop)
        return sched

    def add(self, when: float, session: Session) -> list[Any]:
        """Call ``session._on_timer()`` at loop time ``when``; returns the entry to cancel."""
        entry = [when, next(self._seq), session]
        heapq.heappush(self._heap, entry)
        if self._handle is None or when < self._handle_at:
            self._arm(when)
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Forget an entry from :meth:`add` (a no-op once it fired or was cancelled)."""
        if entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and self._cancelled * 2 > len(heap):
            heap[:] = [e for e in heap if e[2] is not None]  # in place: _fire may hold it
            heapq.heapify(heap)
            self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        now = self._loop.time()
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)
            session = entry[2]
            if session is None:
                self._cancelled -= 1
                continue
            entry[2] = None
            try:
                session._on_timer()  # may add entries (and arm the loop timer) again
            except Exception:  # one session's failure must not stop the others' deadlines
                log.exception("session deadline callback raised")
        if heap and (self._handle is None or heap[0][0] < self._handle_at):
            self._arm(heap[0][0])
        elif not heap and self._handle is not None:
            self._handle.cancel()
            self._handle = None


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)


class _Timeout(Exception):
    pass


class _PeerGone(Exception):
    pass


class Session(asyncio.Protocol):
    """One SMTP session over one connection.

    Lifecycle: ``connection_made`` → admission by the server (connection limits) →
    a task runs :meth:`_run` until QUIT, 421, timeout or disconnect → the quit hook
    runs → ``connection_lost`` releases the connection slot.
    """

    # No per-instance __dict__ (asyncio.Protocol and BaseProtocol declare empty
    # __slots__; asyncio and uvloop only call the protocol's methods): a session lives as
    # long as its connection (issue 13, idle connection memory).
    __slots__ = (
        "conn", "ctx", "info", "server", "transaction", "transport", "_admitted",
        "_data_phase", "_data_rate", "_deadline", "_disconnect_after", "_drain_waiter",
        "_fresh", "_idle", "_ip", "_loop", "_lost", "_messages", "_out", "_paused",
        "_proxy_buf", "_proxy_done", "_shutdown", "_spool", "_spool_error", "_task",
        "_timer", "_deadlines", "_tls",
        "_tls_early", "_tls_leftover", "_tls_wait", "_tx_count", "_upstream", "_waiter",
        "_write_paused", "_bytes_in", "_bytes_out", "_killed", "__weakref__",
    )

    def __init__(self, server: SmtpServer, ctx: ServerContext) -> None:
        self.server = server
        self.ctx = ctx
        self.conn = ServerConnection(ctx.protocol)
        self.info: SessionInfo | None = None
        self.transport: asyncio.Transport | None = None
        self.transaction: Transaction | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._lost = False
        self._paused = False
        self._write_paused = False
        self._shutdown = False
        self._idle = False
        # Deadlines (Postfix smtpd_per_request_deadline / smtpd_min_data_rate): see
        # _wait_data. _fresh: an event was taken since the last wait, so the next wait
        # starts a new request and a new deadline.
        self._deadline = 0.0
        # The deadline's entry in the loop's shared _Deadlines, or None.
        self._timer: list[Any] | None = None
        self._deadlines = _Deadlines.of(self._loop)
        self._fresh = True
        self._data_phase = False
        self._data_rate = float(ctx.min_data_rate)
        self._tls = ctx.implicit_tls  # TLS on (or being set up): see eof_received
        self._tls_wait = False  # implicit TLS: raw bytes go to _tls_leftover
        # STARTTLS: bytes decrypted before the session has seen the handshake complete
        # (None while no STARTTLS handshake is under way); see _on_starttls.
        self._tls_early: bytearray | None = None
        self._admitted = False
        self._tx_count = 0
        self._messages = 0
        self._ip = ""
        self._proxy_buf: bytearray | None = bytearray() if ctx.proxy_protocol else None
        self._proxy_done: asyncio.Future[None] | None = None
        self._tls_leftover = b""
        # The open upstream transaction in proxy mode (see ``_on_mail``), else ``None``.
        self._upstream: Any = None
        self._disconnect_after = False  # a hook asked to drop the client after this reply
        # A long message being received: the file its pieces go to, or the reply for the
        # end of data when writing it failed.
        self._spool: MessageSpool | None = None
        self._spool_error: Reply | None = None
        # Bytes read from / written to the client (after TLS), for the admin API.
        self._bytes_in = 0
        self._bytes_out = 0
        self._killed = False  # ended by kill(): 421 _KILLED instead of R.SHUTDOWN

    # ----------------------------------------------------------- asyncio glue

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio callback: admit the connection (limits, PROXY trust), then start the session."""
        # uvloop's transports do not subclass asyncio.Transport; duck typing suffices.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        if not isinstance(peer, tuple):  # a Unix socket pair (stdio run modes)
            peer = ("", 0)
        if not isinstance(sock, tuple):
            sock = ("", 0)
        ip = client_key(str(peer[0])) if peer and isinstance(peer, tuple) else ""
        if self.ctx.forced_peer_ip:
            ip = self.ctx.forced_peer_ip
        self._ip = ip
        behind_proxy = self._proxy_buf is not None and _trusted(ip, self.ctx.trusted_proxies)
        exempt = not behind_proxy and _trusted(ip, self.ctx.limit_exceptions)
        admission = self.server.admit(self, ip, per_ip=not behind_proxy, exempt=exempt)
        if admission.kind is AdmissionKind.DROP:
            self.transport.close()  # far over the limit: close without a word (ZMailer)
            return
        self._admitted = True  # counted: released in connection_lost
        refusal = admission.reply
        if refusal is not None:
            self.transport.write(refusal.to_bytes())
            _metrics.M.connections_refused_total.inc()
            if log.isEnabledFor(logging.INFO):
                log.info(Event("reject", stage="connect", client=ip, code=refusal.code,
                               reply=str(refusal), reason="admission"))
            if refusal is R.SHUTDOWN or exempt:
                self.transport.close()
                return
            # Like a ZMailer child that prints 421 and exits, the refused connection holds
            # its slot for a moment (until the client hangs up, at most _REFUSED_HOLD s),
            # so that a flood from one address escalates to silent closes.
            self.transport.pause_reading()
            self._loop.call_later(_REFUSED_HOLD, self.transport.close)
            return
        self.info = SessionInfo(
            session_id=_new_session_id(),
            peer_ip=ip,
            peer_port=int(peer[1]) if len(peer) > 1 else 0,
            local_ip=client_key(str(sock[0])) if sock else "",
            local_port=int(sock[1]) if len(sock) > 1 else 0,
            hostname=self.ctx.protocol.hostname,
            dry_run=self.ctx.dry_run,
        )
        if self._proxy_buf is not None:
            if not _trusted(ip, self.ctx.trusted_proxies):
                log.warning("PROXY header expected from untrusted peer %s: closing", ip)
                self.transport.close()
                return
            self._proxy_done = self._loop.create_future()
        elif self.ctx.implicit_tls:
            # Nothing may reach the SMTP core before the TLS layer is in place. uvloop
            # starts reading only after connection_made returns (this pause is then a
            # no-op), so bytes that still come in (the ClientHello) are kept by
            # data_received for the TLS layer (see _implicit_tls).
            self._tls_wait = True
            self.transport.pause_reading()
        self._task = self._loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        """asyncio callback: feed bytes to the PROXY parser or the core; pause on a backlog."""
        self._bytes_in += len(data)
        if self._proxy_buf is not None:
            self._proxy_data(data)
            return
        if self._tls_wait:  # implicit TLS not started yet: these bytes belong to TLS
            self._tls_leftover += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self._tls_early is not None:  # STARTTLS: protected bytes, core not told yet
            self._tls_early += data
            return
        conn = self.conn
        if self._data_phase and self._data_rate > 0:
            # Postfix smtpd_min_data_rate: each read extends the DATA/BDAT deadline by
            # N / rate seconds, never past data_timeout from now.
            now = self._loop.time()
            self._deadline = min(self._deadline + len(data) / self._data_rate,
                                 now + self.ctx.data_timeout)
        elif self._data_phase:
            self._deadline = self._loop.time() + self.ctx.data_timeout  # idle timeout
        conn.receive_data(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)  # the session takes the bytes in now
        elif conn.buffered > _PAUSE_AT and not self._paused and self.transport is not None:
            # The session is busy (a hook, delivery) and input piles up: stop reading
            # until it waits for bytes again (at most one more read is taken).
            self._paused = True
            self.transport.pause_reading()

    def _proxy_data(self, data: bytes) -> None:
        """Collect and parse the PROXY v1/v2 header (HAProxy spec), then hand over the rest."""
        from .proxy_protocol import ProxyProtocolError, parse_proxy_header

        buf = self._proxy_buf
        assert buf is not None and self.info is not None
        buf += data
        try:
            parsed = parse_proxy_header(bytes(buf))
        except ProxyProtocolError as exc:
            log.warning("bad PROXY header from %s: %s", self._ip, exc)
            self._proxy_buf = None
            self._fail_proxy()
            return
        if parsed is None:
            return
        info_p, used = parsed
        rest = bytes(buf[used:])
        self._proxy_buf = None
        if info_p.command == "PROXY" and info_p.source is not None:
            real_ip = client_key(info_p.source[0])
            over = self.server.rebind(
                self, self._ip, real_ip, exempt=_trusted(real_ip, self.ctx.limit_exceptions)
            )
            if over is not None:
                log.info("refused client=%s (behind proxy %s): %s", real_ip, self._ip, over.text)
                if self.transport is not None and not self.ctx.implicit_tls:
                    self.transport.write(over.to_bytes())
                self._fail_proxy()
                return
            self._ip = real_ip
            self.info.peer_ip = real_ip
            self.info.peer_port = info_p.source[1]
            if info_p.destination is not None:
                self.info.local_ip = client_key(info_p.destination[0])
                self.info.local_port = info_p.destination[1]
        if self.ctx.implicit_tls:
            if self.transport is not None:
                self.transport.pause_reading()
            self._tls_wait = True
            self._tls_leftover = rest
        elif rest:
            self.conn.receive_data(rest)
        fut = self._proxy_done
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail_proxy(self) -> None:
        fut = self._proxy_done
        if fut is not None and not fut.done():
            fut.set_exception(_PeerGone())
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        """asyncio callback: the client half-closed its side.

        Returns:
            True on a plain connection (keep the transport open so that the replies
            to pipelined commands still reach the client; the session closes it when
            it ends); None once TLS is on, where asyncio and uvloop close the TLS
            transport anyway and log a warning when True is returned.
        """
        self.conn.receive_data(b"")
        self._wake()
        return None if self._tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio callback: wake the session task and release the connection slot."""
        self._lost = True
        pf = self._proxy_done
        if pf is not None and not pf.done():
            pf.set_exception(_PeerGone())
        self.conn.receive_data(b"")
        self._wake()
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_result(None)
        if self._timer is not None:
            self._deadlines.cancel(self._timer)
            self._timer = None
        if self._admitted:
            self._admitted = False
            self.server.release(self, self._ip)

    def pause_writing(self) -> None:
        """asyncio flow control: the transport's write buffer is full."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """asyncio flow control: the write buffer drained; wake a waiting drain."""
        self._write_paused = False
        dw = self._drain_waiter
        if dw is not None and not dw.done():
            dw.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --------------------------------------------------------------- plumbing

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            if self.transport is not None and not self._lost:
                self._bytes_out += len(data)
                self.transport.write(data)

    async def _drain(self) -> None:
        """Wait until the client has read enough of our replies (flow control).

        A client that reads nothing for ``command_timeout`` seconds (a write-side
        slowloris) is cut off: a 421 could not reach it, so the connection is aborted.

        Raises:
            _PeerGone: the client stopped reading (connection aborted).
        """
        if self._write_paused and not self._lost:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(self.ctx.command_timeout):
                    await self._drain_waiter
            except TimeoutError:
                assert self.info is not None
                log.info("session %s: client=%s read none of our replies for %gs: aborting",
                         self.info.session_id, self.info.peer_ip, self.ctx.command_timeout)
                self._lost = True
                if self.transport is not None:
                    # Reset, not FIN: a FIN would wait behind the unread replies while the
                    # kernel keeps the orphaned socket.
                    sock = self.transport.get_extra_info("socket")
                    if sock is not None:
                        try:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                        except OSError:
                            pass
                    self.transport.abort()
                raise _PeerGone() from None
            finally:
                self._drain_waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._loop.time() < self._deadline:  # moved on by data (min_data_rate)
            self._arm_timer()
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(_Timeout())

    def _arm_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            if timer[0] <= self._deadline:
                return  # fires first; _on_timer re-arms for the later deadline
            self._deadlines.cancel(timer)
        self._timer = self._deadlines.add(self._deadline, self)

    def _wait_data(self, data_phase: bool) -> asyncio.Future[None]:
        """The future to await for bytes from the client within the current request's
        deadline (the caller awaits it and then sets ``_waiter`` to ``None``; a plain
        method, not a coroutine, so no second frame is kept per waiting session).

        A request is a command line (``command_timeout`` for the whole line, counted
        from when the wait for it starts; bytes of a partial line do not extend it) or
        the message text of one DATA or BDAT (``data_timeout``, extended by N /
        ``min_data_rate`` seconds per read of N bytes in :meth:`data_received`, never
        past ``data_timeout`` from that read; ``min_data_rate = 0``: ``data_timeout``
        of silence). Postfix ``smtpd_per_request_deadline`` and ``smtpd_min_data_rate``.

        Returns:
            The waiter: done when bytes came or the peer closed; its exception is
            ``_Timeout`` when the deadline passed (the caller answers 421 4.4.2 and
            closes), ``_PeerGone`` never (see Raises).

        Raises:
            _PeerGone: the client has closed the connection (raised at once).
        """
        if self._lost or self.conn.peer_closed:
            raise _PeerGone()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._fresh or data_phase != self._data_phase:
            self._fresh = False
            self._data_phase = data_phase
            self._deadline = self._loop.time() + (
                self.ctx.data_timeout if data_phase else self.ctx.command_timeout
            )
        self._arm_timer()
        waiter = self._waiter = self._loop.create_future()
        return waiter

    # ------------------------------------------------------------ session run

    async def _run(self) -> None:
        info = self.info
        assert info is not None
        conn = self.conn
        ctx = self.ctx
        hooks = ctx.hooks
        reason = "quit"
        m = _metrics.M
        done_tx: Transaction | None = None
        m.session_started()
        try:
            if self._proxy_done is not None:
                try:
                    async with asyncio.timeout(ctx.proxy_timeout):
                        await self._proxy_done
                except TimeoutError:
                    log.info("no PROXY header from %s within %gs", self._ip, ctx.proxy_timeout)
                    raise _PeerGone() from None
            if ctx.implicit_tls:
                if not await self._implicit_tls():
                    reason = "TLS handshake failed"
                    return
            greeting = Reply(220, None, _expand_greeting(ctx.greeting, ctx.protocol.hostname))
            if hooks.has(Stage.CONNECT):
                result = await hooks.run(Stage.CONNECT, info)
                if result.verdict.is_denial:
                    greeting = self._denial(Stage.CONNECT, result)
                    if greeting.is_transient and greeting.code != 421:
                        # RFC 5321 §3.1/§3.8: the only 4xx greeting is 421 (then close)
                        greeting = Reply(421, greeting.enhanced, greeting.text)
                    self._refused("connect", greeting)
                    if result.disconnect or greeting.code == 421:
                        self._out.append(conn.close_reply(greeting))
                        reason = "rejected"
                        return
            self._out.append(conn.send(greeting))
            m.reply("connect", greeting.code)
            # This frame lives as long as the session: keep no reply (the EHLO reply is
            # the largest) alive while waiting for the client (issue 13, idle memory).
            reply = greeting = R.OK
            out = self._out
            while True:
                ev = conn.next_event()  # NEED_DATA once the session is closed
                if ev is NEED_DATA:
                    if conn.closed:
                        break
                    if conn.peer_closed:
                        reason = "disconnected"
                        break
                    self._flush()
                    if self._write_paused:
                        await self._drain()
                    in_tx = conn.in_transaction
                    if self._shutdown and not in_tx:
                        out.append(conn.close_reply(R.SHUTDOWN))
                        reason = "shutdown"
                        break
                    self._idle = not in_tx
                    reply = R.OK  # drop the last reply sent (see above)
                    try:
                        await self._wait_data(conn.in_data)
                    finally:
                        self._idle = False
                        self._waiter = None
                    continue
                t = type(ev)
                if t is MessageChunk:  # a piece of a long message: to its file, no reply
                    assert isinstance(ev, MessageChunk)
                    self._spool_piece(ev.data)
                    continue
                self._fresh = True  # the next wait is for a new request
                if t is AutoReply:
                    assert isinstance(ev, AutoReply)
                    reply = ev.reply
                    stage = _stage_of_line(ev.command)
                    m.reply(stage, reply.code)
                    if reply.code >= 400:
                        self._refused(stage, reply)
                        await self._error_stage(reply, ev.command)
                    out.append(conn.send(reply) if ctx.multiline_replies
                               else self._render(conn.send(reply), reply))
                    continue
                if t is DataComplete:
                    assert isinstance(ev, DataComplete)
                    self._flush()
                    done_tx = self.transaction
                    reply = await self._on_message(ev)
                    if conn.config.lmtp:
                        # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
                        m.reply("message", reply.code)
                        if reply.code >= 400:
                            self._refused("message", reply, done_tx)
                            await self._error_stage(reply, "DATA")
                        self._out.append(conn.send_lmtp([reply] * conn.lmtp_reply_count))
                        continue
                elif t is RcptTo:
                    assert isinstance(ev, RcptTo)
                    reply = await self._on_rcpt(ev)
                elif t is MailFrom:
                    assert isinstance(ev, MailFrom)
                    reply = await self._on_mail(ev)
                elif t is Data:
                    reply = await self._on_data_start()
                elif t is BdatStart:
                    # CHUNKING: the same decision as at DATA; a refusal is sent by the
                    # core once the chunk has been read (RFC 3030 §2).
                    conn.send(await self._on_data_start())
                    continue
                elif t is Helo:
                    assert isinstance(ev, Helo)
                    reply = await self._on_helo(ev)
                elif t is Rset:
                    self._drop_transaction()
                    await self._abort_upstream()
                    if hooks.has(Stage.RSET):
                        await hooks.run(Stage.RSET, info)
                    reply = R.RESET
                elif t is Quit:
                    self._out.append(conn.send(R.BYE))
                    m.reply("quit", 221)
                    reason = "quit"
                    break
                elif t is StartTls:
                    await self._on_starttls()
                    continue
                elif t is AuthCredentials:
                    assert isinstance(ev, AuthCredentials)
                    reply = await self._on_auth(ev)
                elif t is Vrfy:
                    assert isinstance(ev, Vrfy)
                    reply = await self._on_vrfy(ev.argument, "vrfy")
                elif t is Expn:
                    assert isinstance(ev, Expn)
                    reply = await self._on_vrfy(ev.argument, "expn")
                elif t is UnknownCommand:
                    assert isinstance(ev, UnknownCommand)
                    reply = await self._on_unknown(ev)
                elif t is Etrn:
                    assert isinstance(ev, Etrn)
                    reply = self._on_etrn(ev)
                else:  # pragma: no cover - every event type is handled above
                    reply = R.TEMP_ERROR
                disconnect = self._disconnect_after
                self._disconnect_after = False
                stage = _STAGE_OF.get(t, "other")
                m.reply(stage, reply.code)
                if reply.code >= 400:
                    self._refused(stage, reply, done_tx if t is DataComplete else None, ev)
                    await self._error_stage(reply, type(ev).__name__)
                out.append(conn.send(reply) if ctx.multiline_replies
                           else self._render(conn.send(reply), reply))
                if disconnect and not conn.closed:
                    conn.close_reply(reply)  # state only: the reply is already queued
                    reason = "dropped by hook"
            if conn.closed and reason == "quit" and not isinstance(ev, Quit):
                reason = "closed"
        except _Timeout:
            phase = "data" if self._data_phase else "command"
            log.info("session %s: %s deadline exceeded client=%s (%s_timeout=%gs%s)",
                     info.session_id, phase, info.peer_ip, phase,
                     ctx.data_timeout if self._data_phase else ctx.command_timeout,
                     f", min_data_rate={self._data_rate:g}B/s" if self._data_phase else "")
            self._out.append(conn.close_reply(R.TIMEOUT))
            reason = "timeout"
        except _PeerGone:
            reason = "disconnected"
        except asyncio.CancelledError:
            if not self._lost:
                self._out.append(conn.close_reply(_KILLED if self._killed else R.SHUTDOWN))
            reason = "killed" if self._killed else "shutdown"
        except Exception:
            log.exception("session %s: internal error", info.session_id)
            if not self._lost:
                self._out.append(conn.close_reply(R.TEMP_ERROR.with_text(
                    "Local error, closing connection")))
            reason = "internal error"
        finally:
            await self._finish(reason)

    def _render(self, wire: bytes, reply: Reply) -> bytes:
        """Apply ``multiline_replies = false`` (ZMailer no-multiline-replies): first line only.

        EHLO replies stay multi-line (the extensions are in the continuation lines).
        """
        if self.ctx.multiline_replies or reply.enhanced is None or "\n" not in reply.text:
            return wire
        enh = self.ctx.protocol.enhanced_status_codes
        full = reply.to_bytes(enh)
        if not wire.startswith(full):
            return wire
        return reply.to_bytes(enh, multiline=False) + wire[len(full) :]

    async def _implicit_tls(self) -> bool:
        """TLS from the first byte (RFC 8314); after the PROXY header when there is one."""
        ctx = self.ctx
        assert ctx.tls_context is not None and self.transport is not None
        raw = self.transport
        try:
            handshake = self._loop.create_task(self._loop.start_tls(
                raw, self, ctx.tls_context, server_side=True,
                ssl_handshake_timeout=ctx.tls_handshake_timeout,
            ))
            # start_tls pauses reading and puts the TLS protocol in place before its
            # first await; the bytes received before that (the ClientHello under
            # uvloop, which reads right after connection_made; bytes after the PROXY
            # header) go to it before reading resumes (scheduled after this step).
            await asyncio.sleep(0)
            self._tls_wait = False
            leftover, self._tls_leftover = self._tls_leftover, b""
            if leftover:
                _feed_protocol(raw.get_protocol(), leftover)
            new_transport = await handshake
        except Exception as exc:
            _metrics.M.tls_failures_total.inc()
            log.info("implicit TLS handshake with %s failed: %s", self._ip, exc)
            self._lost = True
            raw.abort()
            return False
        if new_transport is None:
            return False
        self.transport = new_transport
        self._record_tls(new_transport)
        return True

    async def _finish(self, reason: str) -> None:
        info = self.info
        assert info is not None
        self._flush()
        if self._timer is not None:
            self._deadlines.cancel(self._timer)
            self._timer = None
        if self.transport is not None and not self._lost:
            self.transport.close()
        await self._abort_upstream()
        if self._spool is not None:  # the client went away in the middle of a message
            self._spool.close()
            self._spool = None
        self._drop_transaction()
        _metrics.M.session_ended()
        if self.ctx.hooks.has(Stage.QUIT):
            try:
                await self.ctx.hooks.run(Stage.QUIT, info)
            except Exception:  # the runner logs hook errors; never let them escape
                log.exception("session %s: quit hook failed", info.session_id)
        if log.isEnabledFor(logging.INFO):
            log.info(Event(
                "session", id=info.session_id, client=info.peer_ip,
                helo=info.helo_name or "-", tls=info.tls_version or "-",
                auth=info.auth_user or "-", messages=self._messages, errors=self.conn.errors,
                duration=f"{time.time() - info.start_time:.3f}s", end=reason,
                results=info.results.summary() if info.results else "-"))

    def _drop_transaction(self) -> None:
        """Forget the open transaction (RSET, HELO, STARTTLS, end of session): counted as
        ``aborted`` in ``smtpgate_transactions_total`` when there was one."""
        if self.transaction is not None:
            self.transaction = None
            _metrics.M.transaction("aborted")

    def _refused(self, stage: str, reply: Reply, tx: Transaction | None = None,
                 ev: object = None) -> None:
        """Log a refusal (a 4xx/5xx reply to a command) at INFO, whatever refused it (the
        core, a plugin, the upstream): the stage, client, HELO name, sender, recipient
        (at RCPT) and the reply, as Postfix's ``NOQUEUE: reject: RCPT from ...`` line."""
        if not log.isEnabledFor(logging.INFO):
            return
        info = self.info
        assert info is not None
        tx = tx or self.transaction
        sender: str | None = None
        rcpt: str | None = None
        if type(ev) is MailFrom:
            sender = ev.address
        elif tx is not None:
            sender = tx.envelope.mail_from
        if type(ev) is RcptTo:
            rcpt = f"<{ev.address}>"
        elif tx is not None and stage == "message":
            rcpt = ",".join(f"<{r.address}>" for r in tx.envelope.rcpt_to) or None
        fields: dict[str, object] = {
            "session": info.session_id, "stage": stage, "client": info.peer_ip,
            "helo": info.helo_name or "-",
        }
        if sender is not None:
            fields["from"] = f"<{sender}>"
        if rcpt is not None:
            fields["to"] = rcpt
        if tx is not None and stage == "message":
            fields["id"] = tx.id
        fields["code"] = reply.code
        fields["reply"] = str(reply)
        log.info(Event("reject", **fields))

    def _denial(self, stage: Stage, result: HookResult) -> Reply:
        reply = result.reply or default_reply(stage, result.verdict)
        if reply is None:
            reply = R.TEMP_ERROR if result.verdict.is_transient else R.ACCESS_DENIED
        if result.disconnect:
            self._disconnect_after = True
        return reply

    async def _error_stage(self, reply: Reply, command: str) -> None:
        """The ``error`` stage, before an error reply is sent (nssmtpd ``errorproc``; the
        tarpit plugin waits here). Replies queued so far go out first."""
        if self.ctx.hooks.has(Stage.ERROR):
            info = self.info
            assert info is not None
            info.errors = self.conn.errors
            self._flush()
            await self.ctx.hooks.run(Stage.ERROR, info, reply, command)

    # -------------------------------------------------------------- commands

    async def _on_helo(self, ev: Helo) -> Reply:
        info = self.info
        assert info is not None
        hooks = self.ctx.hooks
        if hooks.has(Stage.HELO):
            # The helo chain sees which command it checks (HELO or EHLO) in info.esmtp.
            was, info.esmtp = info.esmtp, ev.esmtp
            result = await hooks.run(Stage.HELO, info, ev.name)
            if result.verdict.is_denial:
                info.esmtp = was
                return self._denial(Stage.HELO, result)
        self.conn.allow_sloppy_paths = info.allow_sloppy_paths
        info.helo_name = ev.name
        info.esmtp = ev.esmtp
        self._drop_transaction()
        await self._abort_upstream()
        return self.conn.helo_reply(ev)

    def _on_etrn(self, ev: Etrn) -> Reply:
        assert self.info is not None
        if self.ctx.etrn is None:
            return Reply(458, "4.0.0", f"Unable to queue messages for node {ev.node}")
        return self.ctx.etrn(ev.node, self.info)

    async def _on_vrfy(self, argument: str, kind: str) -> Reply:
        """VRFY/EXPN: 252 (or 502 for EXPN) unless enabled; then the ``vrfy`` stage decides
        (no opinion: ``252 2.5.0``, RFC 5321 §3.5.3)."""
        enabled = self.ctx.vrfy_enabled if kind == "vrfy" else self.ctx.expn_enabled
        if not enabled:
            return R.VRFY if kind == "vrfy" else R.NOT_IMPLEMENTED
        info = self.info
        assert info is not None
        hooks = self.ctx.hooks
        if hooks.has(Stage.VRFY):
            result = await hooks.run(Stage.VRFY, info, argument.strip("<> "), kind)
            if result.verdict.is_denial:
                return self._denial(Stage.VRFY, result)
            if result.verdict is Verdict.OK and result.reply is not None:
                return result.reply
        return R.VRFY

    async def _on_unknown(self, ev: UnknownCommand) -> Reply:
        """An unrecognised command: the ``unknown`` stage may answer it (OK with a reply);
        else the core's ``500 5.5.1`` (RFC 5321 §4.2.4), which counts toward
        ``max_unknown_commands``."""
        hooks = self.ctx.hooks
        if hooks.has(Stage.UNKNOWN):
            assert self.info is not None
            result = await hooks.run(Stage.UNKNOWN, self.info, ev.verb, ev.line)
            if result.verdict.is_denial:
                return self._denial(Stage.UNKNOWN, result)
            if result.verdict is Verdict.OK and result.reply is not None:
                return result.reply
        return ev.reply

    async def _on_data_start(self) -> Reply:
        """DATA or the first BDAT: the ``data_start`` stage, then ``354`` (RFC 5321
        §4.1.1.4; for BDAT the go-ahead is not sent, the chunk is read)."""
        hooks = self.ctx.hooks
        if hooks.has(Stage.DATA_START):
            assert self.info is not None and self.transaction is not None
            result = await hooks.run(Stage.DATA_START, self.info, self.transaction)
            if result is not CONT_RESULT and result.verdict.is_denial:
                return self._denial(Stage.DATA_START, result)
        return R.DATA_GO

    async def _on_mail(self, ev: MailFrom) -> Reply:
        info = self.info
        assert info is not None
        self._tx_count += 1
        tx = Transaction(
            Envelope(ev.address, dict(ev.params)), f"{info.session_id}.{self._tx_count}"
        )
        hooks = self.ctx.hooks
        hook_reply: Reply | None = None
        if hooks.has(Stage.MAIL):
            result = await hooks.run(Stage.MAIL, info, tx)
            if result is not CONT_RESULT:
                if result.verdict.is_denial:
                    return self._denial(Stage.MAIL, result)
                if result.verdict is Verdict.OK and result.reply is not None:
                    hook_reply = result.reply
        if self._upstream is not None:
            await self._abort_upstream()
        # Proxy mode (a delivery with open_transaction, like Postfix's smtpd_proxy_filter):
        # the upstream transaction opens now; its refusal is the client's reply.
        opener = getattr(self.ctx.delivery, "open_transaction", None)
        if opener is not None:
            try:
                self._upstream = await opener(tx.envelope, info)
            except DeliveryError as exc:
                log.info("transaction %s: upstream refused MAIL from=<%s>: %s", tx.id,
                         ev.address, exc.reply)
                return exc.reply
            except Exception:
                log.exception("transaction %s: opening the upstream transaction raised", tx.id)
                return R.TEMP_ERROR
        self.transaction = tx
        if hook_reply is not None:
            return hook_reply
        if self._upstream is not None:
            return cast(Reply, self._upstream.mail_reply)
        return R.SENDER_OK

    async def _abort_upstream(self) -> None:
        """End the open upstream transaction, if any (RSET upstream): at RSET, a new MAIL,
        HELO/EHLO, STARTTLS and the end of the session. Never raises."""
        utx, self._upstream = self._upstream, None
        if utx is not None:
            try:
                await utx.abort()
            except Exception:
                log.exception("session: aborting the upstream transaction raised")

    async def _on_rcpt(self, ev: RcptTo) -> Reply:
        info = self.info
        tx = self.transaction
        assert info is not None and tx is not None
        rcpt = Recipient(ev.address, dict(ev.params))
        hooks = self.ctx.hooks
        reply: Reply | None = None
        if hooks.has(Stage.RCPT):
            result = await hooks.run(Stage.RCPT, info, tx, rcpt)
            if result is not CONT_RESULT:
                if result.verdict.is_denial:
                    return self._denial(Stage.RCPT, result)
                if result.verdict is Verdict.OK and result.reply is not None:
                    reply = result.reply
        utx = self._upstream
        if utx is not None:  # proxy mode: the upstream's verdict is the client's reply
            upstream = cast(Reply, await utx.rcpt(rcpt))
            if not upstream.is_positive:
                log.info("transaction %s: upstream refused to=<%s>: %s", tx.id, ev.address,
                         upstream)
                return upstream
            reply = reply or upstream
        tx.envelope.rcpt_to.append(rcpt)
        return reply or R.RCPT_OK

    async def _on_starttls(self) -> None:
        ctx = self.ctx
        conn = self.conn
        info = self.info
        assert info is not None and self.transport is not None
        if ctx.tls_context is None:  # the core does not offer STARTTLS without one
            _metrics.M.reply("starttls", R.TLS_NOT_AVAILABLE.code)
            self._refused("starttls", R.TLS_NOT_AVAILABLE)
            self._out.append(conn.send(R.TLS_NOT_AVAILABLE))
            return
        _metrics.M.reply("starttls", R.STARTTLS_GO.code)
        self._out.append(conn.send(R.STARTTLS_GO))
        self._flush()
        self._tls = True  # from here on the client's EOF reaches us through the TLS layer
        # start_tls puts the TLS layer in place before its first await: every byte that
        # reaches data_received from then on was decrypted. With TLS 1.3 the client's
        # first command may come with its Finished message, and the TLS layer hands it
        # over before this task resumes: it is kept in _tls_early, not dropped as
        # plaintext injected before the handshake (CVE-2011-0411; the core discards
        # bytes received while the handshake is pending).
        self._tls_early = bytearray()
        try:
            new_transport = await self._loop.start_tls(
                self.transport,
                self,
                ctx.tls_context,
                server_side=True,
                ssl_handshake_timeout=ctx.tls_handshake_timeout,
            )
        except (TimeoutError, OSError, ConnectionError, Exception) as exc:
            self._tls_early = None
            _metrics.M.tls_failures_total.inc()
            log.info("session %s: TLS handshake failed: %s", info.session_id, exc)
            conn.close_reply(R.TLS_NOT_AVAILABLE)
            self._lost = True
            if self.transport is not None:
                self.transport.abort()
            return
        early, self._tls_early = self._tls_early, None
        if new_transport is None:
            conn.close_reply(R.TLS_NOT_AVAILABLE)
            return
        self.transport = new_transport
        conn.tls_established()
        if early:
            conn.receive_data(bytes(early))
        self._drop_transaction()
        await self._abort_upstream()
        info.helo_name = None
        info.esmtp = False
        info.auth_user = None
        self._record_tls(new_transport)

    def _record_tls(self, transport: asyncio.BaseTransport) -> None:
        info = self.info
        assert info is not None
        sslobj: Any = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            info.tls_version = sslobj.version()
            _metrics.M.tls_total.labels(info.tls_version or "unknown").inc()
            cipher = sslobj.cipher()
            info.tls_cipher = cipher[0] if cipher else None
            try:
                cert = sslobj.getpeercert()  # only a verified client certificate (cafile)
            except (ValueError, AttributeError):
                cert = None
            if cert:
                subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ())
                                    for k, v in rdn)
                info.notes["tls_peer"] = subject

    async def _on_auth(self, ev: AuthCredentials) -> Reply:
        ctx = self.ctx
        info = self.info
        assert info is not None
        if ctx.authenticator is None:
            return R.AUTH_TEMP
        limiter = ctx.auth_limiter
        if limiter.is_blocked(info.peer_ip):
            log.warning("auth rate-limited client=%s", info.peer_ip)
            return R.AUTH_RATE
        if ev.authzid and ev.authzid != ev.username:
            ok = False
        else:
            try:
                ok = await ctx.authenticator.authenticate(ev.username, ev.password, info)
            except AuthError as exc:
                log.error("auth back end failed client=%s: %s", info.peer_ip, exc)
                _metrics.M.auth_total.labels("error", ev.mechanism).inc()
                return R.AUTH_TEMP
            except Exception:
                log.exception("auth back end raised client=%s", info.peer_ip)
                _metrics.M.auth_total.labels("error", ev.mechanism).inc()
                return R.AUTH_TEMP
        hooks = ctx.hooks
        if hooks.has(Stage.AUTH):
            result = await hooks.run(Stage.AUTH, info, ev.mechanism, ev.username, ok)
            if result.verdict.is_denial:
                log.info("auth refused by plugin id=%s client=%s user=%r mechanism=%s",
                         info.session_id, info.peer_ip, ev.username[:64], ev.mechanism)
                _metrics.M.auth_total.labels("failure", ev.mechanism).inc()
                return self._denial(Stage.AUTH, result)
        if ok:
            _metrics.M.auth_total.labels("success", ev.mechanism).inc()
            limiter.record_success(info.peer_ip)
            info.auth_user = ev.username
            log.info("auth ok id=%s client=%s user=%s mechanism=%s",
                     info.session_id, info.peer_ip, ev.username, ev.mechanism)
            return R.AUTH_OK
        limiter.record_failure(info.peer_ip)
        _metrics.M.auth_total.labels("failure", ev.mechanism).inc()
        log.warning("auth failed id=%s client=%s user=%r mechanism=%s",
                    info.session_id, info.peer_ip, ev.username[:64], ev.mechanism)
        return R.AUTH_FAILED

    # --------------------------------------------------------------- message

    def _spool_piece(self, data: bytes) -> None:
        """Write a piece of a long message to its temporary file (created at the first
        piece: in the spool's ``tmp/`` in queue mode). A failed write is remembered and
        answered at the end of data (452 4.3.1 when the disk is full, else 451 4.3.0);
        the rest of the message is read and dropped."""
        if self._spool_error is not None:
            return
        spool = self._spool
        try:
            if spool is None:
                spool = self._spool = MessageSpool(self.ctx.message_dir)
            spool.write(data)
        except OSError as exc:
            self._spool_error = _STORAGE_FULL if exc.errno in _NO_SPACE else _STORAGE_FAILED
            log.error("session %s: cannot write the message to a temporary file in %s: %s",
                      self.info.session_id if self.info else "-",
                      self.ctx.message_dir or "the temporary directory", exc)
            if spool is not None:
                spool.close()
            self._spool = None

    async def _on_message(self, ev: DataComplete) -> Reply:
        utx, self._upstream = self._upstream, None
        tx = self.transaction
        try:
            return await self._message(ev, utx)
        finally:
            if utx is not None and not utx.done:  # refused, quarantined, no recipients ...
                await utx.abort()
            if tx is not None:
                tx.close()

    async def _message(self, ev: DataComplete, utx: Any) -> Reply:
        """End of data: the ``headers`` and ``data`` stages (QUARANTINE stores the message
        aside), the ``queue`` stage, then delivery (or the upstream transaction's data in
        proxy mode, whose reply is the client's) and the ``delivered`` stage."""
        info = self.info
        tx = self.transaction
        assert info is not None and tx is not None
        self.transaction = None
        started = time.monotonic()
        envelope = tx.envelope
        spool, self._spool = self._spool, None
        spool_error, self._spool_error = self._spool_error, None
        if ev.problem is not None:
            if spool is not None:
                spool.close()
            self._log_tx(tx, len(ev.data), ev.problem, started, "refused by core")
            return ev.problem
        if spool_error is not None:
            self._log_tx(tx, 0, spool_error, started, "temporary file failed")
            return spool_error
        if spool is None:
            tx.message = ev.data
        else:
            try:
                if ev.data:
                    spool.write(ev.data)
                tx.set_message_file(spool.message())
            except (OSError, ValueError) as exc:
                spool.close()
                reply = _STORAGE_FULL if getattr(exc, "errno", None) in _NO_SPACE \
                    else _STORAGE_FAILED
                log.error("transaction %s: temporary message file failed: %s", tx.id, exc)
                self._log_tx(tx, 0, reply, started, "temporary file failed")
                return reply
        hooks = self.ctx.hooks
        quarantine: HookResult | None = None
        for stage in (Stage.HEADERS, Stage.DATA):
            if not hooks.has(stage):
                continue
            result = await hooks.run(stage, info, tx)
            if result.verdict is Verdict.QUARANTINE:
                quarantine = result
                break
            if result.verdict.is_denial:
                reply = self._denial(stage, result)
                self._log_tx(tx, tx.size, reply, started,
                             result.reason or f"{stage.value} hook")
                return reply
            # OK skips the rest of that stage's chain only
        if not envelope.rcpt_to:
            reply = tx.reply or R.OK.with_text("Message accepted; no recipients left")
            self._log_tx(tx, tx.size, reply, started, "no recipients after data hook")
            return reply
        received = build_received(
            info,
            envelope,
            queue_id=tx.id,
            include_tls=self.ctx.received_tls,
            include_auth=self.ctx.received_auth,
            lmtp=self.conn.config.lmtp,
            tls_peer=info.notes.get("tls_peer") if self.ctx.received_tls_peer else None,
        )
        if quarantine is not None:  # stored durably, then 250 or 5xx as configured
            return await self._quarantine(tx, quarantine, tx.source(received), started)
        if hooks.has(Stage.QUEUE):
            result = await hooks.run(Stage.QUEUE, info, tx)
            if result.verdict.is_denial:
                reply = self._denial(Stage.QUEUE, result)
                self._log_tx(tx, tx.size, reply, started, "queue hook")
                return reply
            if result.verdict is Verdict.OK and result.reply is not None:
                self._messages += 1
                self._log_tx(tx, tx.size, result.reply, started, "taken by queue hook")
                return result.reply
        # The message as it stands after the plugins (a queue hook may still have edited
        # it, e.g. results_header); a long one stays in its file.
        message = tx.source(received)
        try:
            if utx is not None:
                try:
                    reply = await utx.data(envelope, message)
                except DeliveryError as exc:
                    self._relayed(tx, utx, exc.reply)
                    raise
                self._relayed(tx, utx, reply)
            else:
                reply = await self.ctx.delivery.deliver(envelope, message, info)
        except DeliveryError as exc:
            reply = exc.reply
            await self._delivered(tx, reply)
            self._log_tx(tx, tx.size, reply, started, "delivery failed")
            return reply
        except Exception:
            log.exception("transaction %s: delivery raised", tx.id)
            reply = R.TEMP_ERROR
            await self._delivered(tx, reply)
            self._log_tx(tx, tx.size, reply, started, "delivery error")
            return reply
        await self._delivered(tx, reply)
        if not reply.is_positive:
            self._log_tx(tx, tx.size, reply, started, "delivery refused")
            return reply
        self._messages += 1
        if tx.reply is not None and tx.reply.code < 300:
            reply = tx.reply
        self._log_tx(tx, tx.size, reply, started, "delivered")
        return reply

    @staticmethod
    def _relayed(tx: Transaction, utx: Any, reply: Reply) -> None:
        """Proxy mode: the upstream answered the message: count the attempt per recipient
        (``smtpgate_delivery_attempts_total``) and write the send-log line."""
        upstream = str(getattr(utx, "_label", "") or "upstream")
        rcpts = [r.address for r in tx.envelope.rcpt_to]
        for _ in rcpts:
            _metrics.M.delivery(upstream, reply.code)
        send_log(tx.id, tx.envelope.mail_from, rcpts, upstream, reply, status=(
            "sent" if reply.code < 400 else "tempfailed" if reply.code < 500 else "refused"))

    async def _delivered(self, tx: Transaction, reply: Reply) -> None:
        """The ``delivered`` stage, per recipient, when the outcome is known here (local
        and proxy delivery; in queue mode the delivery process runs it)."""
        hooks = self.ctx.hooks
        if self.ctx.delivered_in_session and hooks.has(Stage.DELIVERED):
            assert self.info is not None
            for rcpt in tx.envelope.rcpt_to:
                await hooks.run(Stage.DELIVERED, self.info, tx, rcpt, reply)

    async def _quarantine(
        self, tx: Transaction, result: HookResult, message: Message, started: float
    ) -> Reply:
        """Store the message in the QUARANTINE result's Maildir; answer its reply."""
        from ..delivery.maildir import MaildirDelivery

        path, reply = result.quarantine, result.reply
        assert path is not None and reply is not None
        try:
            await MaildirDelivery(path).deliver(tx.envelope, message, self.info)
        except DeliveryError as exc:
            log.error("transaction %s: quarantine failed: %s", tx.id, exc)
            self._log_tx(tx, tx.size, exc.reply, started, "quarantine failed")
            return exc.reply
        self._log_tx(tx, tx.size, reply, started,
                     f"quarantined ({result.reason or 'plugin'}) in {path}")
        return reply

    def _log_tx(self, tx: Transaction, size: int, reply: Reply, started: float, what: str) -> None:
        """Count the transaction's outcome (``smtpgate_transactions_total``, bytes received)
        and log its line at INFO (with the Message-ID header field's value)."""
        code = reply.code
        _metrics.M.transaction("quarantined" if what.startswith("quarantined") else "accepted"
                               if code < 400 else "tempfailed" if code < 500 else "rejected",
                               size)
        if not log.isEnabledFor(logging.INFO):  # hot path: build nothing for no record
            return
        info = self.info
        assert info is not None
        env = tx.envelope
        message_id = _message_id(tx) if size else None
        log.info(Event(
            "transaction", id=tx.id, client=info.peer_ip, helo=info.helo_name or "-",
            **{"from": f"<{env.mail_from}>"},
            to=",".join(f"<{r.address}>" for r in env.rcpt_to) or "-",
            size=size, message_id=message_id[:200] if message_id else "-",
            result=f"{reply.code} {reply.enhanced or ''} {reply.text}".replace("  ", " ")[:300],
            outcome=what, results=tx.results.summary() if tx.results else "-",
            elapsed=f"{time.monotonic() - started:.3f}s"))

    # -------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Ask the session to end: now if idle between transactions, else after the transaction."""
        self._shutdown = True
        if self._idle and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def abort(self) -> None:
        """End the session now (graceful shutdown bound exceeded): 421 and close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def kill(self) -> bool:
        """End the session now at an administrator's request (admin API): the client
        gets ``421 4.3.2`` (RFC 5321 §3.8, RFC 3463 X.3.2) and the connection is closed,
        whatever the session was doing (a transaction in flight is abandoned; a message
        whose end of data had not been answered with 250 was not accepted).

        Returns:
            False when the session had already ended (nothing done).
        """
        if self._task is None or self._task.done():
            return False
        self._killed = True
        self._task.cancel()
        return True

    @property
    def bytes_in(self) -> int:
        """Bytes received from the client so far (after TLS decryption)."""
        return self._bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes of replies written to the client so far (before TLS encryption)."""
        return self._bytes_out

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task running the session, ``None`` if the connection was refused."""
        return self._task

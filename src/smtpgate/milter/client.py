"""A thin asyncio milter client (the MTA side of the Sendmail milter protocol, version 6).

Entry points: :func:`parse_socket` (``inet:8891@127.0.0.1``, ``inet:127.0.0.1:8891``,
``inet6:8891@::1``, ``inet:[::1]:8891``, ``unix:/path``), :class:`MilterClient` (one
connection to one milter, for one SMTP session), :class:`MilterError` (the milter is down,
timed out or broke the protocol: the caller applies its ``default_action``).

The client negotiates options (:meth:`MilterClient.open`), then sends each event with its
macros, honouring the milter's ``SMFIP_NO*`` flags (the event and its macros are not sent)
and ``SMFIP_NR_*`` flags (no reply is awaited), skips ``SMFIR_PROGRESS`` and collects the
modification actions of the end of message. Encoding and decoding are
:mod:`smtpgate.milter.codec`'s (sans-IO). One client never serves two SMTP sessions at
once, so sessions never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import codec
from .codec import SMFIM, SMFIP

__all__ = [
    "OFFERED_PROTOCOL",
    "EndOfMessageResult",
    "MilterAddress",
    "MilterClient",
    "MilterError",
    "parse_socket",
]

log = logging.getLogger("smtpgate.milter")

#: The protocol flags smtpgate offers: everything of version 6 except ``SMFIP_RCPT_REJ``
#: (a milter plugin only sees the recipients the earlier plugins accepted).
OFFERED_PROTOCOL = (
    codec.PROTOCOL_NOSEND_MASK | codec.PROTOCOL_NOREPLY_MASK | SMFIP.SKIP | SMFIP.HDR_LEADSPC
)

# Macro stage letter (the command the macros precede) -> SMFIM_* list index.
_MACRO_STAGE = {"C": SMFIM.CONNECT, "H": SMFIM.HELO, "M": SMFIM.ENVFROM, "R": SMFIM.ENVRCPT,
                "T": SMFIM.DATA, "E": SMFIM.EOM, "N": SMFIM.EOH}

_FINAL = (codec.Continue, codec.Accept, codec.Reject, codec.TempFail, codec.Discard,
          codec.ReplyCode, codec.Skip, codec.ConnFail, codec.Shutdown)


class MilterError(Exception):
    """The milter cannot be used: connection refused or lost, a timeout, or a protocol
    violation. The message says which; the connection is closed."""


@dataclass(frozen=True, slots=True)
class MilterAddress:
    """Where a milter listens.

    Attributes:
        family: ``"unix"``, ``"inet"`` or ``"inet6"``.
        host: the IP address or host name (inet/inet6).
        port: the TCP port (inet/inet6).
        path: the socket path (unix).
    """

    family: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"milter socket {spec!r}: bad port {text!r}")
    return int(text)


def parse_socket(spec: str) -> MilterAddress:
    """Parse a milter socket in Sendmail or Postfix notation.

    Accepted: ``unix:/path``, ``local:/path``, ``/path``; ``inet:PORT@HOST`` (Sendmail),
    ``inet:HOST:PORT`` (Postfix), ``inet:PORT`` (localhost); ``inet6:PORT@HOST``,
    ``inet6:[HOST]:PORT``, ``inet:[HOST]:PORT``.

    Raises:
        ValueError: an empty path, a missing or invalid port, an unknown prefix.
    """
    s = spec.strip()
    if s.startswith("/"):
        return MilterAddress("unix", path=s)
    kind, sep, rest = s.partition(":")
    if not sep:
        raise ValueError(f"milter socket {spec!r}: expected unix:/path or inet:port@host")
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest:
            raise ValueError(f"milter socket {spec!r}: empty path")
        return MilterAddress("unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise ValueError(f"milter socket {spec!r}: unknown type {kind!r} (unix, inet, inet6)")
    if "@" in rest:  # Sendmail: port@host
        port, _, host = rest.partition("@")
    elif rest.startswith("["):  # [v6addr]:port
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    elif rest.count(":") == 1:  # Postfix: host:port
        host, _, port = rest.partition(":")
    elif rest.isdigit():
        host, port = ("::1" if kind == "inet6" else "127.0.0.1"), rest
    else:
        raise ValueError(f"milter socket {spec!r}: expected {kind}:port@host or {kind}:host:port")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"milter socket {spec!r}: empty host")
    if ":" in host:
        kind = "inet6"
    return MilterAddress(kind, host=host, port=_port(port, spec))


@dataclass(slots=True)
class EndOfMessageResult:
    """What a milter answered at the end of the message.

    Attributes:
        final: the final response (Continue, Accept, Reject, TempFail, Discard,
            ReplyCode, ConnFail, Shutdown).
        modifications: the modification actions that came before it, in order.
    """

    final: codec.Response
    modifications: list[codec.Response] = field(default_factory=list)


class MilterClient:
    """One connection to a milter (the MTA side).

    Args:
        address: where the milter listens (:func:`parse_socket`).
        connect_timeout: seconds for the connection and option negotiation.
        command_timeout: seconds to wait for a reply to a command (each
            ``SMFIR_PROGRESS`` restarts it).
        content_timeout: seconds to wait for a reply to a body chunk or the end of message.
        actions: the ``SMFIF_*`` actions offered.
        protocol: the ``SMFIP_*`` flags offered.

    Attributes (after :meth:`open`): ``version``, ``actions``, ``protocol`` (what the milter
    asked for, limited to what was offered) and ``macro_lists`` (``SMFIM_*`` → names).
    """

    def __init__(
        self,
        address: MilterAddress,
        *,
        connect_timeout: float = 30.0,
        command_timeout: float = 30.0,
        content_timeout: float = 300.0,
        actions: int = codec.ACTIONS_ALL,
        protocol: int = OFFERED_PROTOCOL,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.macro_lists: dict[int, tuple[str, ...]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = codec.FrameDecoder()
        self._frames: list[codec.Frame] = []

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._writer is not None

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        """Connect and negotiate options (SMFIC_OPTNEG, protocol version 6).

        Flags the milter asks for beyond the offer are dropped (logged).

        Raises:
            MilterError: connection refused, timeout, a version other than 2..6, or an
                answer that is not OPTNEG.
        """
        a = self.address
        try:
            async with asyncio.timeout(self.connect_timeout):
                if a.family == "unix":
                    self._reader, self._writer = await asyncio.open_unix_connection(a.path)
                else:
                    self._reader, self._writer = await asyncio.open_connection(a.host, a.port)
                await self._send(codec.OptNeg(6, self.offered_actions, self.offered_protocol))
                reply = await self._read()
        except TimeoutError:
            self.close()
            raise MilterError(f"milter {a}: connect/negotiation timed out") from None
        except OSError as exc:
            self.close()
            raise MilterError(f"milter {a}: cannot connect: {exc}") from None
        if not isinstance(reply, codec.OptNeg):
            self.close()
            raise MilterError(f"milter {a}: answered OPTNEG with {type(reply).__name__}")
        if not 2 <= reply.version <= 6:
            self.close()
            raise MilterError(f"milter {a}: unsupported protocol version {reply.version}")
        extra_p = reply.protocol & ~self.offered_protocol
        extra_a = reply.actions & ~self.offered_actions
        if extra_p or extra_a:
            log.warning("milter %s: asked for unsupported protocol flags 0x%x / actions 0x%x;"
                        " ignored", a, extra_p, extra_a)
        self.version = reply.version
        self.actions = reply.actions & self.offered_actions
        self.protocol = reply.protocol & self.offered_protocol
        self.macro_lists = dict(reply.macros)

    def close(self) -> None:
        """Close the connection (idempotent, never raises)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    async def quit(self) -> None:
        """Send SMFIC_QUIT and close; errors are ignored (the session is over anyway)."""
        if self._writer is not None:
            with contextlib.suppress(MilterError):
                await self._send(codec.Quit())
        self.close()

    async def abort(self) -> None:
        """SMFIC_ABORT: forget the current transaction (no reply).

        Raises:
            MilterError: the connection is gone.
        """
        await self._send(codec.Abort())

    # ---------------------------------------------------------------------- I/O

    async def _send(self, *messages: codec.Command) -> None:
        writer = self._writer
        if writer is None:
            raise MilterError(f"milter {self.address}: not connected")
        try:
            writer.write(b"".join(codec.encode(m) for m in messages))
            async with asyncio.timeout(self.command_timeout):
                await writer.drain()
        except TimeoutError:
            self.close()
            raise MilterError(f"milter {self.address}: write timed out") from None
        except (OSError, RuntimeError) as exc:
            self.close()
            raise MilterError(f"milter {self.address}: write failed: {exc}") from None

    async def _read(self) -> codec.Response:
        """The next response (no timeout here: callers bound it)."""
        while not self._frames:
            reader = self._reader
            if reader is None:
                raise MilterError(f"milter {self.address}: not connected")
            try:
                data = await reader.read(65536)
            except OSError as exc:
                self.close()
                raise MilterError(f"milter {self.address}: read failed: {exc}") from None
            if not data:
                self.close()
                raise MilterError(f"milter {self.address}: connection closed by the milter")
            try:
                self._frames.extend(self._decoder.feed(data))
            except codec.MilterProtocolError as exc:
                self.close()
                raise MilterError(f"milter {self.address}: {exc}") from None
        frame = self._frames.pop(0)
        try:
            return codec.decode_response(frame)
        except codec.MilterProtocolError as exc:
            self.close()
            raise MilterError(f"milter {self.address}: {exc}") from None

    async def _reply(
        self, timeout: float, what: str, modifications: list[codec.Response] | None = None
    ) -> codec.Response:
        """Read until a final response; Progress restarts the timeout; modification
        actions are collected into ``modifications`` (end of message only)."""
        while True:
            try:
                async with asyncio.timeout(timeout):
                    resp = await self._read()
            except TimeoutError:
                self.close()
                raise MilterError(f"milter {self.address}: no reply to {what} "
                                  f"within {timeout:g}s") from None
            if isinstance(resp, codec.Progress):
                continue
            if modifications is not None and isinstance(resp, codec.MODIFICATIONS):
                modifications.append(resp)
                continue
            if isinstance(resp, _FINAL):
                return resp
            self.close()
            raise MilterError(f"milter {self.address}: unexpected {type(resp).__name__} "
                              f"in reply to {what}")

    def macros_for(self, stage: str, values: Mapping[str, str]) -> dict[str, str]:
        """The macros to send before the ``stage`` command: those the milter listed for
        that stage (``SMFIF_SETSYMLIST``), else all of ``values``. Empty values are left out."""
        wanted = self.macro_lists.get(_MACRO_STAGE.get(stage, -1))
        if wanted is None:
            return {k: v for k, v in values.items() if v}
        out: dict[str, str] = {}
        for name in wanted:
            key = name if len(name) == 1 or name.startswith("{") else "{" + name + "}"
            value = values.get(key)
            if value:
                out[key] = value
        return out

    async def event(
        self,
        command: codec.Command,
        *,
        macros: Mapping[str, str] | None = None,
        nosend: int = 0,
        noreply: int = 0,
        timeout: float | None = None,
    ) -> codec.Response | None:
        """Send one event (with its macros) and wait for the milter's final reply.

        Args:
            command: the event (Connect, Helo, Mail, Rcpt, Data, Header, EndOfHeaders,
                Unknown, Body).
            macros: macro values for the event's stage (filtered by :meth:`macros_for`).
            nosend: the ``SMFIP_NO*`` flag of this event: when negotiated, nothing is sent.
            noreply: the ``SMFIP_NR_*`` flag: when negotiated, no reply is awaited.
            timeout: seconds for the reply (default ``command_timeout``).

        Returns:
            The final response, or ``None`` when nothing was sent or no reply is due.

        Raises:
            MilterError: connection lost, timeout or protocol violation.
        """
        if nosend and self.protocol & nosend:
            return None
        out: list[codec.Command] = []
        if macros:
            stage = command.CMD.decode("ascii")
            values = self.macros_for(stage, macros)
            if values:
                out.append(codec.Macro(stage, values))
        out.append(command)
        await self._send(*out)
        if noreply and self.protocol & noreply:
            return None
        what = type(command).__name__
        return await self._reply(timeout or self.command_timeout, what)

    async def body(self, body: bytes) -> codec.Response | None:
        """Send the body in SMFIC_BODY chunks of at most 65535 bytes.

        Stops early on SMFIR_SKIP (then returns ``None``) or on a final response other
        than continue (returned: the caller ends the message with it).

        Raises:
            MilterError: connection lost, timeout or protocol violation (SKIP without
                ``SMFIP_SKIP`` negotiated is one).
        """
        if self.protocol & SMFIP.NOBODY:
            return None
        for start in range(0, len(body), codec.MAX_BODY_CHUNK):
            chunk = body[start : start + codec.MAX_BODY_CHUNK]
            resp = await self.event(codec.Body(chunk), noreply=SMFIP.NR_BODY,
                                    timeout=self.content_timeout)
            if resp is None or isinstance(resp, codec.Continue):
                continue
            if isinstance(resp, codec.Skip):
                if not self.protocol & SMFIP.SKIP:
                    self.close()
                    raise MilterError(f"milter {self.address}: SKIP without SMFIP_SKIP")
                return None
            return resp
        return None

    async def end_of_message(self, macros: Mapping[str, str] | None = None
                             ) -> EndOfMessageResult:
        """SMFIC_BODYEOB: collect the modification actions and the final response.

        Raises:
            MilterError: connection lost, timeout or protocol violation.
        """
        out: list[codec.Command] = []
        if macros:
            values = self.macros_for("E", macros)
            if values:
                out.append(codec.Macro("E", values))
        out.append(codec.EndOfMessage())
        await self._send(*out)
        mods: list[codec.Response] = []
        final = await self._reply(self.content_timeout, "end of message", mods)
        if isinstance(final, codec.Skip):
            self.close()
            raise MilterError(f"milter {self.address}: SKIP in reply to end of message")
        return EndOfMessageResult(final, mods)

    async def headers(self, fields: Sequence[tuple[str, str]],
                      macros: Mapping[str, str] | None = None) -> codec.Response | None:
        """Send each header field (SMFIC_HEADER), stopping at the first final response
        other than continue, which is returned; ``None`` when all were accepted.

        Raises:
            MilterError: connection lost, timeout or protocol violation.
        """
        if self.protocol & SMFIP.NOHDRS:
            return None
        for name, value in fields:
            resp = await self.event(codec.Header(name, value), macros=macros,
                                    noreply=SMFIP.NR_HDR)
            if resp is not None and not isinstance(resp, codec.Continue):
                return resp
        return None

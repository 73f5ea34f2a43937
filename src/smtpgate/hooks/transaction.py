"""One mail transaction as hooks see it: envelope, per-recipient flags/data and the message.

Entry point: :class:`Transaction`, the nssmtpd ``ns_smtpd`` message API in Python (getfrom,
addrcpt, setflag, gethdr, gethdrs, getbody, setreply, dump, ...). Header edits work on the raw
bytes. RFC 5321 §2.3.1 (envelope), RFC 5322 §2.2 (header fields, folding), §3.6.8 (ftext).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email import policy as _policy
from email.header import Header as _Header
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from ..envelope import Envelope, Recipient
from ..message import DATA_CHUNK, Message, MessageFile
from ..reply import Reply
from ..results import Results

__all__ = ["Transaction"]

# A header field's first line: RFC 5322 §3.6.8 ftext name, optional WSP (obs-syntax), colon.
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FTEXT_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
# The line break that ends the header block: an LF followed by an empty line.
_BLANK_LINE = re.compile(rb"\n(\r?\n)")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_STR_FOLD = re.compile(r"\r\n(?=[ \t])")
# Characters never allowed in a header value (CR and LF are checked separately).
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x1f\x7f<>]")
_SURROGATE = re.compile(r"[\udc80-\udcff]")
_FOLD_TOKENS = re.compile(r"[ \t]*[^ \t]+|[ \t]+$")
_SOFT_LIMIT = 78  # RFC 5322 §2.1.1 SHOULD
# A header block longer than this (no empty line within it) makes a file-backed message
# load whole: header edits need the header block in memory.
_MAX_HEAD = 1 << 20
_HARD_LIMIT = 998  # RFC 5322 §2.1.1 MUST, octets without CRLF


@dataclass(slots=True)
class _Field:
    name: str  # as written in the message
    start: int  # offset of the field's first byte in the raw message
    colon: int  # offset just after the colon
    end: int  # offset after the field's last line terminator (or end of header block)


@dataclass(slots=True)
class _Index:
    fields: list[_Field] = field(default_factory=list)
    top: int = 0  # where a prepended field goes: 0, or after a leading mbox "From " line
    end: int = 0  # end of the header block (start of the empty line, or len(raw))
    body_start: int = 0  # first byte after the empty line (len(raw) when there is none)
    separator: bool = False  # an empty line ends the header block


def _build_index(raw: bytes) -> _Index:
    if raw.startswith(b"\r\n"):
        return _Index(end=0, body_start=2, separator=True)
    if raw.startswith(b"\n"):
        return _Index(end=0, body_start=1, separator=True)
    m = _BLANK_LINE.search(raw)
    if m:
        idx = _Index(end=m.start() + 1, body_start=m.end(), separator=True)
    else:
        idx = _Index(end=len(raw), body_start=len(raw))
    end = idx.end
    pos = 0
    current: _Field | None = None
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        if raw[pos] in b" \t":
            if current is not None:  # continuation line (RFC 5322 §2.2.3)
                current.end = line_end
        else:
            fm = _FIELD_START.match(raw, pos, line_end)
            if fm:
                current = _Field(fm.group(1).decode("ascii"), pos, fm.end(), line_end)
                idx.fields.append(current)
            else:  # not a field (mbox From_ line, garbage): kept as it is
                current = None
                if pos == 0 and raw.startswith(b"From "):
                    idx.top = line_end
        pos = line_end
    return idx


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _address_key(address: str) -> tuple[str, str]:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()


def _check_address(address: object, allow_empty: bool) -> str:
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, not {type(address).__name__}")
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address and not allow_empty:
        raise ValueError("empty address")
    if _BAD_ADDRESS_CHARS.search(address) or " " in address.split("@")[-1]:
        raise ValueError(f"invalid characters in address {address!r}")
    return address


class Transaction:
    """One mail transaction: envelope, hook state, and the message once DATA ended.

    The nssmtpd ``ns_smtpd`` commands map to: getfrom/setfrom → :attr:`mail_from`;
    getfromdata/setfromdata → :attr:`sender_data`; getrcpt/addrcpt/delrcpt →
    :meth:`get_recipient`, :meth:`add_recipient`, :meth:`delete_recipient`;
    setflag/unsetflag/getflag → :meth:`set_flag`, :meth:`unset_flag`, :meth:`get_flags`;
    setrcptdata/getrcptdata → :meth:`set_recipient_data`, :meth:`get_recipient_data`;
    gethdr/gethdrs/getbody → :meth:`get_header`, :meth:`get_headers`, :attr:`body`;
    setreply → :meth:`set_reply`; dump → :meth:`dump`.

    Message bytes are CRLF lines, not dot-stuffed (what the protocol core delivers;
    LF-only input also works, new lines then use LF). Header edits splice the raw bytes,
    so every byte outside the edited fields stays identical; nothing is parsed unless a
    hook asks (the header index and :attr:`email` are built lazily and cached until the
    bytes change). The message API raises ``RuntimeError("no message yet")`` before the
    end of data.

    A long message stays in the file it was written to while it arrived: only its header
    block is in memory, so the header methods, :attr:`size` and :meth:`iter_message`
    cost no more than for a short one. :attr:`raw`, :attr:`message`, :attr:`body`,
    :meth:`set_body` and :attr:`email` load the whole message into memory (once); a
    plugin that reads a long message should use :meth:`iter_message` instead.

    Args:
        envelope: the transaction's envelope (kept by reference, not copied).
        transaction_id: id for logs and Received headers.

    Attributes:
        envelope: the :class:`~smtpgate.envelope.Envelope`.
        id: the transaction id.
        notes: free-form per-transaction state for hooks.
        results: the plugins' findings for this transaction (:class:`~smtpgate.results.Results`).
        reply: the final reply a hook chose for the end of data (nssmtpd setreply),
            ``None`` for the server's usual reply.
        sender_data: free-form data attached to the sender (nssmtpd setfromdata).
        scan_results: :class:`~smtpgate.scanners.ScanResult` list from the scanner stage.
        scan_decision: the :class:`~smtpgate.scanners.stage.ScanDecision` the scanners
            reached (reject, tempfail, quarantine); a data hook may set it to ``None`` (or
            return ``accept()``) to override it.
        scanners: the :class:`~smtpgate.scanners.stage.ScannerSet` (``check_spam``,
            ``check_virus``, ``train_spam``, ``spam_version``, ``virus_version``), or None.
    """

    __slots__ = (
        "envelope",
        "id",
        "notes",
        "results",
        "reply",
        "sender_data",
        "scan_results",
        "scan_decision",
        "scanners",
        "_raw",
        "_tail",
        "_file",
        "_modified",
        "_index",
        "_email",
    )

    def __init__(self, envelope: Envelope, transaction_id: str) -> None:
        self.envelope = envelope
        self.id = transaction_id
        self.notes: dict[str, Any] = {}
        self.results = Results()
        self.reply: Reply | None = None
        self.sender_data: Any = None
        # Filled by the scanner stage before the data hooks run (see smtpgate.scanners.stage):
        # the results of every scanner, the decision they lead to (a hook may set it to None
        # to override), and the scanner set itself (check_spam/check_virus/train_spam ...).
        self.scan_results: list[Any] = []
        self.scan_decision: Any = None
        self.scanners: Any = None
        # The message: ``_raw`` in memory, followed (for a long message) by ``_tail``, the
        # rest of it in the file ``_file`` it was received into.
        self._raw: bytes | None = None
        self._tail: MessageFile | None = None
        self._file: MessageFile | None = None
        self._modified = False
        self._index: _Index | None = None
        self._email: EmailMessage | None = None

    def __repr__(self) -> str:
        size = "-" if self._raw is None else str(self.size)
        return (
            f"<Transaction {self.id} from=<{self.envelope.mail_from}> "
            f"rcpts={len(self.envelope.rcpt_to)} size={size}>"
        )

    # ----------------------------------------------------------------- sender

    @property
    def mail_from(self) -> str:
        """The reverse-path without brackets; ``""`` is the null path ``<>`` (getfrom/setfrom).

        Setting it validates the address (angle brackets are stripped).

        Raises:
            ValueError: on assignment of an address with control characters or ``<>``.
            TypeError: on assignment of a non-string.
        """
        return self.envelope.mail_from

    @mail_from.setter
    def mail_from(self, address: str) -> None:
        self.envelope.mail_from = _check_address(address, allow_empty=True)

    @property
    def mail_params(self) -> dict[str, str | None]:
        """The MAIL FROM ESMTP parameters (the live dict; keys upper-cased, RFC 1869)."""
        return self.envelope.mail_params

    # ------------------------------------------------------------- recipients

    @property
    def recipients(self) -> list[Recipient]:
        """The accepted recipients in order (the live list, ``envelope.rcpt_to``)."""
        return self.envelope.rcpt_to

    def _find(self, address_or_index: str | int) -> int:
        rcpts = self.envelope.rcpt_to
        if isinstance(address_or_index, bool):
            raise TypeError("recipient index must be an int or an address")
        if isinstance(address_or_index, int):
            n = len(rcpts)
            i = address_or_index + n if address_or_index < 0 else address_or_index
            if not 0 <= i < n:
                raise IndexError(f"recipient index {address_or_index} out of range")
            return i
        if isinstance(address_or_index, str):
            key = _address_key(address_or_index)
            for i, rcpt in enumerate(rcpts):
                if _address_key(rcpt.address) == key:
                    return i
            raise KeyError(address_or_index)
        raise TypeError("recipient index must be an int or an address")

    def get_recipient(self, address_or_index: str | int) -> Recipient:
        """A recipient by position or address (getrcpt).

        Addresses match exactly in the local part and case-insensitively in the
        domain (RFC 5321 §2.4); surrounding angle brackets are ignored.

        Raises:
            IndexError: no recipient at that position (negative indexes count from the end).
            KeyError: no recipient with that address.
        """
        return self.envelope.rcpt_to[self._find(address_or_index)]

    def add_recipient(
        self,
        address: str,
        flags: Iterable[str] = (),
        data: Any = None,
        params: dict[str, str | None] | None = None,
    ) -> Recipient:
        """Append a recipient (addrcpt). Duplicates are allowed, as in SMTP.

        Args:
            address: the mailbox (angle brackets are stripped).
            flags: initial flags.
            data: free-form data.
            params: RCPT ESMTP parameters (RFC 3461 NOTIFY/ORCPT, ...).

        Returns:
            The new :class:`~smtpgate.envelope.Recipient`.

        Raises:
            ValueError: empty address, control characters or angle brackets in it.
        """
        rcpt = Recipient(
            _check_address(address, allow_empty=False), dict(params or {}), set(flags), data
        )
        self.envelope.rcpt_to.append(rcpt)
        return rcpt

    def delete_recipient(self, address_or_index: str | int) -> Recipient:
        """Remove and return a recipient (delrcpt); errors as :meth:`get_recipient`."""
        return self.envelope.rcpt_to.pop(self._find(address_or_index))

    def set_flag(self, address_or_index: str | int, flag: str) -> None:
        """Set a flag on a recipient (setflag); errors as :meth:`get_recipient`."""
        self.get_recipient(address_or_index).flags.add(flag)

    def unset_flag(self, address_or_index: str | int, flag: str) -> None:
        """Clear a flag (unsetflag); clearing an unset flag is not an error."""
        self.get_recipient(address_or_index).flags.discard(flag)

    def get_flags(self, address_or_index: str | int) -> set[str]:
        """A copy of a recipient's flags (getflag); errors as :meth:`get_recipient`."""
        return set(self.get_recipient(address_or_index).flags)

    def set_recipient_data(self, address_or_index: str | int, data: Any) -> None:
        """Attach free-form data to a recipient (setrcptdata)."""
        self.get_recipient(address_or_index).data = data

    def get_recipient_data(self, address_or_index: str | int) -> Any:
        """A recipient's data (getrcptdata), ``None`` when never set."""
        return self.get_recipient(address_or_index).data

    # ---------------------------------------------------------------- message

    @property
    def message(self) -> bytes | None:
        """The message bytes, ``None`` until the end of data (loads a long message whole).

        Assigning is for the server, which loads the received bytes (CRLF lines,
        dot-unstuffed): it resets :attr:`modified` and the caches. Hooks change
        the message with :meth:`set_raw`, :meth:`set_body`, the header methods or
        :meth:`set_email`.
        """
        if self._tail is not None:
            self._materialize()
        return self._raw

    @message.setter
    def message(self, data: bytes | None) -> None:
        if data is not None and not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("message must be bytes")
        self._raw = None if data is None else bytes(data)
        self._tail = None
        self._modified = False
        self._invalidate()

    def set_message_file(self, message: MessageFile) -> None:
        """Server: the received message is in ``message`` (which this transaction now
        owns: :meth:`close` closes it). Only the header block is read into memory (the
        whole message when no empty line comes within 1 MiB); resets :attr:`modified`.

        Raises:
            OSError / ValueError: the file cannot be read.
        """
        if message.prefix:
            raise ValueError("a received message file has no prefix")
        head = bytearray()
        end = -1
        for chunk in message.region_chunks(64 * 1024):
            scan = max(0, len(head) - 3)
            head += chunk
            if head.startswith(b"\r\n"):
                end = 2
            elif head.startswith(b"\n"):
                end = 1
            else:
                m = _BLANK_LINE.search(head, scan)
                end = m.end() if m else -1
            if end >= 0 or len(head) > _MAX_HEAD:
                break
        if end < 0:  # no empty line: all headers (RFC 5322 §2.1) or garbage
            head += b"".join(message.region_chunks(start=len(head)))
            end = len(head)
        self.message = bytes(head[:end])
        if end < message.region:
            self._tail = message.view(skip=end)
        self._file = message

    def _materialize(self) -> None:
        """Load the file-backed rest of the message into memory (offsets stay valid)."""
        tail = self._tail
        if tail is not None:
            assert self._raw is not None
            self._raw += b"".join(tail.region_chunks())
            self._tail = None
            self._email = None

    def _drop_tail(self) -> None:
        """The rest of a long message is replaced: forget it (the message changed)."""
        if self._tail is not None:
            self._tail = None
            self._modified = True
            self._invalidate()

    def source(self, prefix: bytes = b"") -> Message:
        """The current message with ``prefix`` (e.g. a trace header) in front, without
        loading a long one: bytes, or a :class:`~smtpgate.message.MessageFile` view of
        the file it is in (valid until :meth:`close`).

        Raises:
            RuntimeError: before the end of data.
        """
        raw = self._need()
        tail = self._tail
        if tail is None:
            return prefix + raw if prefix else raw
        return MessageFile(tail.fd, tail.region, prefix=prefix + raw, offset=tail.offset,
                           owner=False)

    def iter_message(self, chunk_size: int = DATA_CHUNK) -> Iterator[bytes]:
        """The current message in pieces of at most ``chunk_size`` bytes (a long message
        is read from its file as it goes: blocking reads; run it in a thread if it must
        not hold the event loop).

        Raises:
            RuntimeError: before the end of data. OSError: the file cannot be read.
        """
        raw = self._need()
        for i in range(0, len(raw), chunk_size):
            yield raw[i : i + chunk_size]
        if self._tail is not None:
            yield from self._tail.region_chunks(chunk_size)

    def close(self) -> None:
        """Server: release the file a long message was received into. Idempotent."""
        if self._tail is not None:
            self._tail = None
            self._raw = None
            self._invalidate()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _need(self) -> bytes:
        if self._raw is None:
            raise RuntimeError("no message yet")
        return self._raw

    def _invalidate(self) -> None:
        self._index = None
        self._email = None

    def _replace(self, data: bytes) -> None:
        if data != self._raw:
            self._raw = data
            self._modified = True
            self._invalidate()

    def _idx(self) -> _Index:
        if self._index is None:
            self._index = _build_index(self._need())
        return self._index

    def _eol(self) -> bytes:
        raw = self._need()
        nl = raw.find(b"\n")
        if nl < 0 or (nl > 0 and raw[nl - 1] == 0x0D):
            return b"\r\n"
        return b"\n"

    @property
    def raw(self) -> bytes:
        """The current message bytes (CRLF lines, not dot-stuffed); loads a long message
        whole (see :meth:`iter_message`).

        Raises:
            RuntimeError: before the end of data.
        """
        self._need()
        if self._tail is not None:
            self._materialize()
        return self._need()

    def set_raw(self, data: bytes) -> None:
        """Replace the whole message (CRLF lines, not dot-stuffed).

        Raises:
            RuntimeError: before the end of data.
            TypeError: ``data`` is not bytes-like.
        """
        self._need()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("message must be bytes")
        self._drop_tail()
        self._replace(bytes(data))

    @property
    def modified(self) -> bool:
        """True once a hook changed the message bytes."""
        return self._modified

    @property
    def size(self) -> int:
        """Length of the current message in bytes; 0 before the end of data."""
        if self._raw is None:
            return 0
        return len(self._raw) + (self._tail.region if self._tail is not None else 0)

    @property
    def header_bytes(self) -> bytes:
        """The header block: every line before the first empty line, with their line ends.

        A message without an empty line is all headers (RFC 5322 §2.1).

        Raises:
            RuntimeError: before the end of data.
        """
        return self._need()[: self._idx().end]

    @property
    def body(self) -> bytes:
        """Everything after the first empty line (getbody); ``b""`` when there is none.
        Loads a long message whole.

        Raises:
            RuntimeError: before the end of data.
        """
        if self._tail is not None:
            self._materialize()
        return self._need()[self._idx().body_start :]

    def set_body(self, data: bytes) -> None:
        """Replace the body, keeping the header block byte for byte.

        Adds the empty separator line when the message had none.

        Raises:
            RuntimeError: before the end of data.
            TypeError: ``data`` is not bytes-like.
        """
        self._need()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("body must be bytes")
        self._drop_tail()  # the header block (all there is in memory) stays
        raw = self._need()
        idx = self._idx()
        if idx.separator:
            self._replace(raw[: idx.body_start] + bytes(data))
            return
        eol = self._eol()
        head = raw[: idx.end]
        if head and not head.endswith(b"\n"):
            head += eol
        self._replace(head + eol + bytes(data))

    # ---------------------------------------------------------------- headers

    def _value(self, f: _Field) -> str:
        chunk = self._need()[f.colon : f.end]
        return _decode(_FOLD.sub(b"", chunk).strip(b" \t\r\n"))

    def get_header(self, name: str) -> str | None:
        """The first field called ``name`` (case-insensitive), unfolded (gethdr).

        The value is unfolded (RFC 5322 §2.2.3), stripped of surrounding white
        space and decoded as UTF-8 with ``surrogateescape`` (undecodable bytes
        survive a get/set round trip). RFC 2047 encoded-words are not decoded;
        use :attr:`email` for decoded values.

        Returns:
            The value, or ``None`` when there is no such field.

        Raises:
            RuntimeError: before the end of data.
        """
        lname = name.lower()
        for f in self._idx().fields:
            if f.name.lower() == lname:
                return self._value(f)
        return None

    def get_headers(self, name: str | None = None) -> list[tuple[str, str]]:
        """All fields in message order, or all fields called ``name`` (gethdrs).

        Returns:
            ``[(name as written, unfolded value), ...]``; values as in :meth:`get_header`.
            Lines that are not header fields (an mbox ``From`` line) are skipped.

        Raises:
            RuntimeError: before the end of data.
        """
        fields = self._idx().fields
        if name is not None:
            lname = name.lower()
            fields = [f for f in fields if f.name.lower() == lname]
        return [(f.name, self._value(f)) for f in fields]

    def _format_field(self, name: str, value: str) -> bytes:
        if not isinstance(name, str) or not _FTEXT_NAME.match(name):
            raise ValueError(f"invalid header field name {name!r} (RFC 5322 §3.6.8)")
        if not isinstance(value, str):
            raise TypeError("header value must be a str")
        if _BAD_VALUE_CHARS.search(value):
            raise ValueError(f"control character in the value of {name}")
        lines = value.split("\r\n")
        for i, line in enumerate(lines):
            if "\r" in line or "\n" in line:
                raise ValueError(f"bare CR or LF in the value of {name}")
            if i and (line[:1] not in (" ", "\t") or not line.strip(" \t")):
                raise ValueError(
                    f"CRLF in the value of {name} must be followed by white space "
                    "and text (RFC 5322 §2.2.3 folding)"
                )
        eol = self._eol()
        eol_s = eol.decode("ascii")
        folded = len(lines) > 1
        if not value.isascii() and not _SURROGATE.search(value) and not self.envelope.smtputf8:
            # RFC 2047 encoded-words: 8-bit header text needs SMTPUTF8 (RFC 6532).
            plain = _STR_FOLD.sub("", value)
            text = _Header(plain, "utf-8", header_name=name, maxlinelen=_SOFT_LIMIT).encode(
                linesep=eol_s
            )
            out = f"{name}: {text}"
        elif folded:
            out = f"{name}: {value}".replace("\r\n", eol_s)
        else:
            out = _fold(name, value, eol_s)
        data = out.encode("utf-8", "surrogateescape")
        if any(len(line) > _HARD_LIMIT for line in data.split(eol)):
            raise ValueError(
                f"header {name} has a line over {_HARD_LIMIT} octets that cannot be folded"
            )
        return data + eol

    def _insert_point(self, prepend: bool) -> tuple[int, bytes, bytes]:
        """Where a new field goes, plus bytes to put before and after it."""
        raw = self._need()
        idx = self._idx()
        eol = self._eol()
        headerless = not idx.fields and not idx.separator and idx.end > idx.top
        if prepend or headerless:
            before = eol if idx.top and not raw[: idx.top].endswith(b"\n") else b""
            return idx.top, before, eol if headerless else b""
        before = eol if idx.end and not raw[: idx.end].endswith(b"\n") else b""
        return idx.end, before, b""

    def add_header(self, name: str, value: str, *, prepend: bool = False) -> None:
        """Add a header field at the end of the header block (or at the top).

        ``value`` may be pre-folded with CRLF + white space; otherwise lines longer
        than 78 characters are folded at white space (RFC 5322 §2.2.3). Non-ASCII
        text becomes RFC 2047 encoded-words unless the transaction uses SMTPUTF8
        (RFC 6532); strings holding ``surrogateescape`` bytes are written back raw.
        With ``prepend=True`` the field goes first (after a leading mbox ``From``
        line), where trace fields belong (RFC 5321 §4.4). A message whose first
        lines are not header fields and which has no empty line gets the field at
        the top followed by an empty line.

        Raises:
            RuntimeError: before the end of data.
            ValueError: name not RFC 5322 ftext; bare CR or LF, a CRLF not followed by
                folding white space, a control character, or an unfoldable line over
                998 octets in the value (so a hook cannot inject header fields).
        """
        data = self._format_field(name, value)
        raw = self._need()
        pos, before, after = self._insert_point(prepend)
        self._replace(raw[:pos] + before + data + after + raw[pos:])

    def set_header(self, name: str, value: str) -> None:
        """Replace the first ``name`` field in place and delete the others; add it if absent.

        Errors as :meth:`add_header`.
        """
        data = self._format_field(name, value)
        lname = name.lower()
        matches = [f for f in self._idx().fields if f.name.lower() == lname]
        if not matches:
            self.add_header(name, value)
            return
        raw = self._need()
        parts: list[bytes] = []
        pos = 0
        for n, f in enumerate(matches):
            parts.append(raw[pos : f.start])
            if n == 0:
                parts.append(data)
            pos = f.end
        parts.append(raw[pos:])
        self._replace(b"".join(parts))

    def remove_header(self, name: str, where: Callable[[str], bool] | None = None) -> int:
        """Delete every field called ``name`` (case-insensitive), continuation lines
        included; with ``where``, only the fields whose unfolded value (as
        :meth:`get_header` gives it) it accepts. The other fields keep their place.

        Returns:
            How many fields were removed.

        Raises:
            RuntimeError: before the end of data.
        """
        lname = name.lower()
        matches = [f for f in self._idx().fields if f.name.lower() == lname
                   and (where is None or where(self._value(f)))]
        if matches:
            raw = self._need()
            parts: list[bytes] = []
            pos = 0
            for f in matches:
                parts.append(raw[pos : f.start])
                pos = f.end
            parts.append(raw[pos:])
            self._replace(b"".join(parts))
        return len(matches)

    # ------------------------------------------------------------ email view

    @property
    def email(self) -> EmailMessage:
        """The message parsed by :mod:`email` (``policy.default``), cached until the bytes change.

        Changing the returned object does not change the message: pass it to
        :meth:`set_email`.

        Raises:
            RuntimeError: before the end of data.
        """
        if self._email is None:
            parsed = BytesParser(policy=_policy.default).parsebytes(self.raw)
            self._email = parsed
        return self._email

    def set_email(self, msg: EmailMessage) -> None:
        """Replace the message with ``msg`` serialised with CRLF lines (``policy.SMTP``).

        Raises:
            RuntimeError: before the end of data.
        """
        self._need()
        self._drop_tail()
        self._replace(msg.as_bytes(policy=_policy.SMTP))

    # ------------------------------------------------------------------ misc

    def set_reply(self, reply: Reply | str, code: int = 250, enhanced: str = "2.0.0") -> None:
        """Choose the reply to the end of data (nssmtpd setreply).

        Args:
            reply: a :class:`~smtpgate.reply.Reply`, or text for ``Reply(code, enhanced, text)``.
            code: reply code when ``reply`` is text.
            enhanced: RFC 3463 enhanced status code when ``reply`` is text.

        Raises:
            ValueError: invalid code, enhanced code, or CR in the text (from ``Reply``).
        """
        self.reply = reply if isinstance(reply, Reply) else Reply(code, enhanced, reply)

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the current message bytes to ``path`` (nssmtpd dump), mode 0600 if created.

        Raises:
            RuntimeError: before the end of data.
            OSError: the file cannot be written.
        """
        self._need()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for chunk in self.iter_message():
                fh.write(chunk)


def _fold(name: str, value: str, eol: str) -> str:
    """``name: value`` folded at white space into lines of at most 78 characters if possible."""
    first = f"{name}: {value}" if value else f"{name}:"
    if len(first) <= _SOFT_LIMIT:
        return first
    tokens = _FOLD_TOKENS.findall(value)
    lines: list[str] = []
    current = f"{name}:"
    sep = " "
    for token in tokens:
        piece = sep + token if sep else token
        sep = ""
        if (
            len(current) + len(piece) > _SOFT_LIMIT
            and current.strip(" \t")
            and piece[:1] in (" ", "\t")
            and piece.strip(" \t")
            and not current.endswith(":")
        ):
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    return eol.join(lines)

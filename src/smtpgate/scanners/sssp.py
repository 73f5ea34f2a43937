"""Sophos SAVDI client speaking SSSP/1.0 (Sophos Simple Scanning Protocol) over TCP or Unix.

Entry point: :class:`SsspScanner` (``scan``, ``version``, ``query``).
Protocol: Sophos "SSSP" / SAVDI user manual as summarised in docs/design protocols.md
("Sophos SAVDI / SSSP"): LF-terminated requests, CRLF replies, blocks end with an empty line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ..envelope import Envelope, SessionInfo
from ..errors import ScannerError, ScannerTimeout, ScannerUnavailable
from .base import Kind, ScanResult, open_scanner_connection, parse_scanner_address

log = logging.getLogger("smtpgate.scanners.sssp")

T = TypeVar("T")

#: The greeting every SSSP/1.0 server sends on connect.
GREETING = "OK SSSP/1.0"
#: SAVI result codes on the ``DONE`` line (hex, four digits).
DONE_CLEAN = "0000"
DONE_VIRUS = "0203"  # SOPHOS_SAVI_ERROR_VIRUSPRESENT
#: Meaning of ``REJ <n>`` (SSSP manual, "Rejections").
REJECTIONS = {
    "1": "request not recognised",
    "2": "SSSP version number incorrect",
    "3": "error in the OPTIONS list",
    "4": "SCANDATA was trying to send too much data",
    "5": "request not permitted",
}
#: Most lines accepted in one reply block (a scan of a big archive lists many objects).
MAX_BLOCK_LINES = 100_000


class SsspScanner:
    """Client for one Sophos SAVDI daemon, one SSSP connection per call.

    A call connects, checks the ``OK SSSP/1.0`` greeting, sends ``OPTIONS`` (when
    ``options`` is not empty), does its work and says ``BYE``. Connections are not
    pooled: SSSP allows reuse, but per-call connections keep failure handling simple.

    Args:
        address: ``host:port``, ``[v6]:port`` or ``unix:/path`` (e.g.
            ``unix:/var/run/savdi/sssp.sock``; SAVDI commonly listens on TCP 4010).
        timeout: seconds allowed for one whole exchange (connect to ``BYE``).
        max_size: messages larger than this many bytes are not sent (verdict ``"skipped"``);
            keep it at or below SAVDI's ``maxscandata``.
        options: ``name:value`` lines for ``SSSP/1.0 OPTIONS`` (default ``output:brief``:
            only ``VIRUS`` and ``DONE`` lines per scan); empty to send no OPTIONS.

    Raises:
        ValueError: ``address`` is malformed, ``timeout``/``max_size`` not positive, or an
            option contains a line break.
    """

    name: str = "sophos"
    kind: Kind = "virus"

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_size: int = 26214400,
        options: Sequence[str] = ("output:brief",),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size!r}")
        for option in options:
            if "\n" in option or "\r" in option or not option.strip():
                raise ValueError(f"invalid SSSP option {option!r}")
        self.address = address
        self._target = parse_scanner_address(address)
        self.timeout = float(timeout)
        self.max_size = int(max_size)
        self.options = tuple(options)

    def __repr__(self) -> str:
        return f"SsspScanner({self.address!r}, timeout={self.timeout:g}, max_size={self.max_size})"

    async def scan(
        self,
        message: bytes,
        *,
        envelope: Envelope | None = None,
        session: SessionInfo | None = None,
        user: str | None = None,
    ) -> ScanResult:
        """Scan ``message`` with ``SSSP/1.0 SCANDATA <n>``.

        Sends the request line, waits for ``ACC`` (``REJ <n>`` is an error), sends the
        ``n`` raw bytes, then reads the block: ``VIRUS <name> <location>`` lines give
        the symbols; ``OK``/``FAIL``/``EVENT`` lines are logged; ``DONE OK 0000`` means
        clean and ``DONE OK 0203`` infected; the block ends with an empty line.

        Args:
            message: the message bytes (SAVDI unpacks MIME and archives itself).
            envelope: unused.
            session: unused.
            user: unused.

        Returns:
            ``verdict="clean"``, ``"infected"`` (``symbols`` = virus names, in order, no
            duplicates) or ``"skipped"`` when ``len(message) > max_size``.

        Raises:
            ScannerUnavailable: cannot connect, or the daemon closed the connection early.
            ScannerTimeout: not finished within ``timeout`` seconds.
            ScannerError: bad greeting, ``REJ``, a ``DONE`` other than ``OK 0000``/
                ``OK 0203``, or a block without ``DONE``.
        """
        size = len(message)
        if size > self.max_size:
            log.info(
                "sophos: message of %d bytes over max_size %d, not scanned", size, self.max_size
            )
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="skipped",
                detail=f"message size {size} > max_size {self.max_size}",
            )
        started = time.monotonic()

        async def scandata(conn: _Connection) -> list[str]:
            first = await conn.request(f"SSSP/1.0 SCANDATA {size}")
            _expect_acc(first, "SCANDATA")
            conn.writer.write(message)
            await conn.writer.drain()
            return await conn.read_block()

        block = await self._exchange("SCANDATA", scandata)
        elapsed = time.monotonic() - started
        viruses: list[str] = []
        done: str | None = None
        for line in block:
            word, _, rest = line.partition(" ")
            if word == "VIRUS":
                name = rest.split(" ", 1)[0] or "unknown"
                if name not in viruses:
                    viruses.append(name)
            elif word == "DONE":
                done = rest
            elif word in ("OK", "FAIL", "EVENT"):
                log.debug("sophos: %s", line)
            else:
                log.debug("sophos: ignoring unexpected line %r", line)
        if done is None:
            raise ScannerError(f"sophos: SCANDATA reply without DONE: {block!r}")
        parts = done.split(" ", 2)
        status = parts[0]
        code = parts[1] if len(parts) > 1 else ""
        text = parts[2] if len(parts) > 2 else ""
        if status != "OK" or code not in (DONE_CLEAN, DONE_VIRUS):
            raise ScannerError(f"sophos: scan failed: DONE {done}")
        if code == DONE_VIRUS or viruses:
            names = tuple(viruses) or ("unknown",)
            return ScanResult(
                scanner=self.name,
                kind=self.kind,
                verdict="infected",
                symbols=names,
                detail=", ".join(names),
                elapsed=elapsed,
            )
        return ScanResult(
            scanner=self.name,
            kind=self.kind,
            verdict="clean",
            detail=f"{code} {text}".strip(),
            elapsed=elapsed,
        )

    async def query(self, what: str) -> list[tuple[str, str]]:
        """``SSSP/1.0 QUERY <what>`` (``ENGINE``, ``SERVER``, ``SAVI``) as key/value pairs.

        Args:
            what: the query name; upper-cased before sending.

        Returns:
            the ``key: value`` lines in order (keys may repeat, e.g. one ``method`` per
            supported request); ``ACC``/``DONE`` lines are not included.

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: as for :meth:`scan`;
            ``ValueError`` when ``what`` is not a single word.
        """
        what = what.strip().upper()
        if not what.isalnum():
            raise ValueError(f"invalid SSSP query {what!r}")

        async def query(conn: _Connection) -> list[tuple[str, str]]:
            return await conn.query(what)

        return await self._exchange(f"QUERY {what}", query)

    async def version(self) -> str:
        """SAVDI and engine versions from ``QUERY SERVER`` and ``QUERY ENGINE``.

        Returns:
            e.g. ``"SAVDI 2.6.0; engine 3.92.0; SAV 10.8.1; data 5.87; 1234 viruses"``
            (parts present in the answers only; all ``key=value`` pairs of QUERY ENGINE
            when none of the known keys is there).

        Raises:
            ScannerUnavailable / ScannerTimeout / ScannerError: as for :meth:`scan`.
        """

        async def queries(conn: _Connection) -> tuple[list[tuple[str, str]], ...]:
            return await conn.query("SERVER"), await conn.query("ENGINE")

        server_pairs, engine_pairs = await self._exchange("QUERY SERVER/ENGINE", queries)
        server, engine = dict(server_pairs), dict(engine_pairs)
        parts: list[str] = []
        if server.get("version"):
            parts.append(f"SAVDI {server['version']}")
        for key, label in (
            ("engineversion", "engine"),
            ("savversion", "SAV"),
            ("virusdataversion", "data"),
        ):
            if engine.get(key):
                parts.append(f"{label} {engine[key]}")
        if engine.get("viruscount"):
            parts.append(f"{engine['viruscount']} viruses")
        if not parts:
            parts = [f"{k}={v}" for k, v in engine_pairs] or ["SSSP/1.0"]
        return "; ".join(parts)

    async def _exchange(self, what: str, work: Callable[[_Connection], Awaitable[T]]) -> T:
        """Connect, check the greeting, send OPTIONS, run ``work``, say ``BYE``.

        Everything runs under one deadline of ``timeout`` seconds.

        Raises:
            ScannerTimeout: the deadline passed.
            ScannerUnavailable: cannot connect, or the connection broke or closed early.
            ScannerError: protocol errors (from ``work`` or the handshake).
        """
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await open_scanner_connection(
                    self._target, self.timeout, self.name
                )
                conn = _Connection(reader, writer, what)
                try:
                    greeting = await conn.read_line()
                    if greeting is None:
                        raise ScannerUnavailable("sophos: connection closed before the greeting")
                    if not greeting.startswith(GREETING):
                        raise ScannerError(f"sophos: unexpected greeting {greeting[:200]!r}")
                    if self.options:
                        await conn.send_options(self.options)
                    result = await work(conn)
                    await conn.bye()
                    return result
                finally:
                    writer.close()
        except TimeoutError as exc:
            raise ScannerTimeout(f"sophos: {what} not finished within {self.timeout:g}s") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise ScannerUnavailable(f"sophos: connection lost during {what}: {exc}") from exc
        except ValueError as exc:  # StreamReader.readline: line over the 1 MiB limit
            raise ScannerError(f"sophos: reply line too long during {what}") from exc


class _Connection:
    """One SSSP connection's line I/O (LF-terminated requests; CRLF, or LF, replies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, what: str):
        self.reader = reader
        self.writer = writer
        self.what = what

    async def send_options(self, options: Sequence[str]) -> None:
        """``SSSP/1.0 OPTIONS``, one ``name:value`` line each, an empty line; expect
        ``ACC`` ... ``DONE OK``."""
        body = "SSSP/1.0 OPTIONS\n" + "".join(f"{o}\n" for o in options) + "\n"
        self.writer.write(body.encode("utf-8"))
        await self.writer.drain()
        block = await self.read_block()
        _expect_acc(block[0] if block else "", "OPTIONS")
        done = next((line for line in block if line.startswith("DONE ")), "")
        if not done.startswith("DONE OK"):
            raise ScannerError(f"sophos: OPTIONS failed: {done or block!r}")

    async def bye(self) -> None:
        """Say ``BYE`` without waiting for the answer (the work is done); errors ignored."""
        with contextlib.suppress(OSError):
            self.writer.write(b"BYE\n")
            await self.writer.drain()

    async def query(self, what: str) -> list[tuple[str, str]]:
        """``SSSP/1.0 QUERY <what>``: the ``key: value`` lines of the reply block, in order.

        ``ACC``/``DONE`` lines are skipped; ``REJ`` raises :class:`ScannerError`.
        """
        self.writer.write(f"SSSP/1.0 QUERY {what}\n".encode("ascii"))
        await self.writer.drain()
        pairs: list[tuple[str, str]] = []
        for line in await self.read_block():
            word = line.split(" ", 1)[0]
            if word in ("ACC", "DONE"):
                continue
            key, sep, value = line.partition(":")
            if sep:
                pairs.append((key.strip(), value.strip()))
        return pairs

    async def request(self, line: str) -> str:
        """Send one LF-terminated request line and return the first reply line."""
        self.writer.write(line.encode("ascii") + b"\n")
        await self.writer.drain()
        reply = await self.read_line()
        if reply is None:
            raise ScannerUnavailable(f"sophos: connection closed after {self.what}")
        return reply

    async def read_line(self) -> str | None:
        """One reply line without its CRLF (a bare LF is accepted); None at EOF."""
        raw = await self.reader.readline()
        if not raw:
            return None
        if not raw.endswith(b"\n"):
            raise ScannerUnavailable(f"sophos: connection closed mid-line during {self.what}")
        return raw.rstrip(b"\r\n").decode("utf-8", "replace")

    async def read_block(self) -> list[str]:
        """Reply lines up to (not including) the empty line that ends a block.

        A ``REJ`` first line is an error at once (no block follows a rejection).
        """
        lines: list[str] = []
        while True:
            line = await self.read_line()
            if line is None:
                raise ScannerUnavailable(f"sophos: connection closed during {self.what}")
            if line == "":
                return lines
            if not lines and line.startswith("REJ"):
                raise ScannerError(f"sophos: {self.what} rejected: {_rejection(line)}")
            lines.append(line)
            if len(lines) > MAX_BLOCK_LINES:
                raise ScannerError(f"sophos: reply to {self.what} too long")


def _expect_acc(line: str, what: str) -> None:
    """Raise :class:`ScannerError` unless ``line`` is ``ACC <id>``."""
    if line.startswith("ACC"):
        return
    if line.startswith("REJ"):
        raise ScannerError(f"sophos: {what} rejected: {_rejection(line)}")
    raise ScannerError(f"sophos: {what} not accepted: {line[:200]!r}")


def _rejection(line: str) -> str:
    """``"REJ 4"`` -> ``"REJ 4 (SCANDATA was trying to send too much data)"``."""
    code = line[3:].strip().split(" ", 1)[0]
    meaning = REJECTIONS.get(code)
    return f"{line} ({meaning})" if meaning else line

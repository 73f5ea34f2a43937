"""A small SSSP/1.0 server (Sophos SAVDI stand-in) for tests, over TCP or a Unix socket.

No Sophos engine can run here (SAVDI is proprietary and not packaged), so this server is
written from the SSSP 1.0 protocol description (docs/design protocols.md, "Sophos SAVDI /
SSSP": Sophos SSSP/SAVDI manuals, Samba's vfs_virusfilter_sophos.c), not from captures.
Entry points: :class:`SsspTestServer` (async context manager) and the fixture
:func:`sssp_server`. It "detects" the EICAR string and any configured byte signature, in
the raw data and in every decoded MIME part, and can be told to hang, to fail the scan,
to send a wrong greeting or none, or to close at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import itertools
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Literal

import pytest

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: The name Sophos gives the EICAR test file.
EICAR_NAME = "EICAR-AV-Test"

Mode = Literal["normal", "hang", "fail", "close"]

_session_ids = itertools.count(0x5E55_0001)


@dataclass
class SsspTestServer:
    """An SSSP/1.0 server. Replies end in CRLF; requests may end in LF or CRLF.

    Attributes:
        signatures: extra ``(virus name, byte string)`` pairs to "detect".
        mode: ``"normal"``; ``"hang"`` (after receiving SCANDATA's bytes, say nothing
            more); ``"fail"`` (answer a scan with :attr:`fail_lines`); ``"close"``
            (close every connection at once, before the greeting).
        greeting: the greeting line (``None``: send none and wait forever).
        fail_lines: the scan answer in ``"fail"`` mode (``{location}`` is replaced).
        max_scan_data: SCANDATA larger than this gets ``REJ 4`` and the connection closes.
        engine_info / server_info: ``QUERY ENGINE`` / ``QUERY SERVER`` answers.
        eol: the reply line terminator (SSSP says CRLF; ``b"\\n"`` to test tolerance).
        requests: every request line received, terminator stripped (OPTIONS lines too).
        raw_requests: the same lines as received, terminators included.
        scanned: the bytes of every SCANDATA received.
        options: the ``name:value`` options of the last OPTIONS request.
        connections: connections accepted so far.
        address: ``"127.0.0.1:<port>"`` or ``"unix:<path>"`` once started.
    """

    signatures: Iterable[tuple[str, bytes]] = ()
    mode: Mode = "normal"
    greeting: bytes | None = b"OK SSSP/1.0\r\n"
    fail_lines: tuple[str, ...] = ("FAIL 0212 {location}", "DONE FAIL 0212 Corrupt data")
    max_scan_data: int = 64 * 1024 * 1024
    engine_info: tuple[tuple[str, str], ...] = (
        ("engineversion", "0.0.0-smtpgate-test"),
        ("savversion", "0.0.0-smtpgate-test"),
        ("virusdataversion", "0.0"),
        ("viruscount", "1"),
    )
    server_info: tuple[tuple[str, str], ...] = (
        ("version", "0.0-smtpgate-test"),
        ("method", "QUERY SERVER"),
        ("method", "QUERY ENGINE"),
        ("method", "OPTIONS"),
        ("method", "SCANDATA"),
        ("maxscandata", str(64 * 1024 * 1024)),
    )
    eol: bytes = b"\r\n"
    requests: list[str] = field(default_factory=list)
    raw_requests: list[bytes] = field(default_factory=list)
    scanned: list[bytes] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    connections: int = 0
    address: str = ""
    _server: asyncio.Server | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)

    async def start(self, host: str = "127.0.0.1") -> str:
        """Listen on ``host``, a free TCP port; returns ``"host:port"``."""
        self._server = await asyncio.start_server(self._handle, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    async def start_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on the Unix socket ``path``; returns ``"unix:<path>"``."""
        self._server = await asyncio.start_unix_server(self._handle, str(path))
        self.address = f"unix:{path}"
        return self.address

    async def close(self) -> None:
        """Stop listening and drop every open connection (hung ones too)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SsspTestServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- protocol ---------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "close":
            return
        if self.greeting is None:
            await _forever()
            return
        writer.write(self.greeting)
        await writer.drain()
        session = f"{next(_session_ids):08X}"
        brief = False
        for number in itertools.count(1):
            raw = await reader.readline()
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.requests.append(line)
            self.raw_requests.append(raw)
            acc = f"ACC {session}/{number}"
            if line == "BYE":
                await self._reply(writer, "BYE")
                return
            version, _, rest = line.partition(" ")
            if not version.startswith("SSSP/"):
                await self._reply(writer, "REJ 1")
                continue
            if version != "SSSP/1.0":
                await self._reply(writer, "REJ 2")
                continue
            verb, _, arg = rest.partition(" ")
            if verb == "OPTIONS":
                options = await self._read_options(reader)
                if any(":" not in o for o in options):
                    await self._reply(writer, "REJ 3")
                    continue
                self.options = options
                brief = any(o.replace(" ", "") == "output:brief" for o in options)
                await self._reply(writer, acc, "DONE OK 0000 The function call succeeded", "")
            elif verb == "QUERY" and arg in ("ENGINE", "SERVER"):
                info = self.engine_info if arg == "ENGINE" else self.server_info
                await self._reply(writer, acc, *(f"{k}: {v}" for k, v in info), "")
            elif verb == "SCANDATA" and arg.isdigit():
                size = int(arg)
                if size > self.max_scan_data:
                    await self._reply(writer, "REJ 4")
                    return  # the unread data cannot be told from requests: hang up
                await self._reply(writer, acc)
                data = await reader.readexactly(size)
                self.scanned.append(data)
                if self.mode == "hang":
                    await _forever()
                await self._reply(writer, *self._scan_reply(data, brief, session, number), "")
            elif verb in ("SCANDATA", "SCANFILE", "SCANDIR", "SCANDIRR"):
                await self._reply(writer, "REJ 5")
            else:
                await self._reply(writer, "REJ 1")

    async def _reply(self, writer: asyncio.StreamWriter, *lines: str) -> None:
        writer.write(b"".join(line.encode("utf-8") + self.eol for line in lines))
        await writer.drain()

    async def _read_options(self, reader: asyncio.StreamReader) -> list[str]:
        options: list[str] = []
        while True:
            raw = await reader.readline()
            if not raw:
                raise asyncio.IncompleteReadError(b"", None)
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.requests.append(line)
            self.raw_requests.append(raw)
            if not line:
                return options
            options.append(line)

    def _scan_reply(self, data: bytes, brief: bool, session: str, number: int) -> list[str]:
        """VIRUS / OK lines for every object, then DONE (no trailing empty line)."""
        base = f"/tmp/savid_tmp{session}_{number}"
        if self.mode == "fail":
            return [line.format(location=base) for line in self.fail_lines]
        lines: list[str] = []
        found: set[str] = set()
        for location, blob in _objects(data, base):
            hits = [name for name, sig in self._all_signatures() if sig in blob]
            new = [name for name in hits if name not in found]
            found.update(hits)
            lines.extend(f"VIRUS {name} {location}" for name in new)
            if not brief:
                lines.append(f"OK {'0203' if hits else '0000'} {location}")
        if found:
            lines.append("DONE OK 0203 Virus found during virus scan")
        else:
            lines.append("DONE OK 0000 The function call succeeded")
        return lines

    def _all_signatures(self) -> list[tuple[str, bytes]]:
        return [(EICAR_NAME, EICAR), *self.signatures]


def _objects(data: bytes, base: str) -> list[tuple[str, bytes]]:
    """The raw data and every decoded MIME leaf part, with SAVDI-like locations."""
    objects = [(base, data)]
    with contextlib.suppress(Exception):
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        if message.is_multipart() or message.get("Content-Transfer-Encoding"):
            for index, part in enumerate(message.walk()):
                if part.is_multipart():
                    continue
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload:
                    name = (part.get_filename() or f"part{index}").replace(" ", "_")
                    objects.append((f"{base}/{name}", payload))
    return objects


async def _forever() -> None:
    await asyncio.Event().wait()


@pytest.fixture
async def sssp_server() -> AsyncIterator[SsspTestServer]:
    """A fresh :class:`SsspTestServer` on 127.0.0.1 (free port), closed after the test."""
    server = SsspTestServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()

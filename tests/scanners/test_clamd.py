"""ClamdScanner against a real private clamd (see clamd_fixture.py) and small fake peers.

Covers: corpus messages with EICAR / ClamAV test files (FOUND), clean corpus messages,
TCP and Unix sockets, PING/VERSION, max_size skip, StreamMaxLength exceeded, daemon down,
hanging daemon, and the INSTREAM wire format.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from smtpgate.errors import ScannerError, ScannerTimeout, ScannerUnavailable
from smtpgate.scanners.clamd import CHUNK_SIZE, ClamdScanner

from .clamd_fixture import (
    CORPUS_DIR,
    EICAR,
    EICAR_SIGNATURE,
    TESTFILE_SIGNATURE,
    ClamdProcess,
    start_clamd,
)

INFECTED = {
    "eicar__built_attachment.eml": EICAR_SIGNATURE,
    "clamav__built_archives.eml": TESTFILE_SIGNATURE,
    "clamav__built_clam.exe.eml": TESTFILE_SIGNATURE,
    "clamav__built_clam.pdf.eml": TESTFILE_SIGNATURE,
    "clamav__built_clam.zip.eml": TESTFILE_SIGNATURE,
    "clamav__built_huge_4_attachments.eml": TESTFILE_SIGNATURE,
    "clamav__built_office_lf.eml": TESTFILE_SIGNATURE,
    "clamav__clam.exe.mbox.uu.eml": TESTFILE_SIGNATURE,
    "clamav__clam.mail.eml": TESTFILE_SIGNATURE,
}
CLEAN = [
    "mailpit__plain-text.eml",
    "mailpit__regular-attachment.eml",
    "cpython__msg_02.eml",
    "flanker__fixtures_messages_torture.eml",
    "debian-sa__sample-spam.eml",
    "mime4j__mimetools-testmsgs_multi-2gifs-base64.eml",
]


def corpus(name: str) -> bytes:
    """A corpus message with CRLF line endings (as smtpgate hands it to scanners)."""
    path = CORPUS_DIR / name
    if not path.is_file():
        pytest.skip(f"corpus file {path} not available")
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def eicar_message() -> bytes:
    return b"From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\n\r\n" + EICAR + b"\r\n"


@pytest.fixture(params=["tcp", "unix"])
def address(request: pytest.FixtureRequest, clamd_server: ClamdProcess) -> str:  # noqa: F811
    return clamd_server.tcp_address if request.param == "tcp" else clamd_server.unix_address


@pytest.fixture(scope="module")
def small_clamd() -> Iterator[ClamdProcess]:
    """A second clamd with StreamMaxLength 64 KiB."""
    with start_clamd(stream_max_length=64 * 1024) as instance:
        yield instance


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_clamd() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a loopback server running a given handler; yields its ``host:port``."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()


# -- real clamd ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INFECTED))
async def test_corpus_virus_attachments_are_found(address: str, name: str) -> None:
    result = await ClamdScanner(address, timeout=30).scan(corpus(name))
    assert result.verdict == "infected", result
    assert result.symbols == (INFECTED[name],)
    assert result.scanner == "clamav" and result.kind == "virus"
    assert not result.is_clean
    assert result.detail == INFECTED[name]
    assert result.elapsed > 0


@pytest.mark.parametrize("name", CLEAN)
async def test_clean_corpus_messages(clamd_server: ClamdProcess, name: str) -> None:  # noqa: F811
    result = await ClamdScanner(clamd_server.tcp_address).scan(corpus(name))
    assert result.verdict == "clean", result
    assert result.symbols == ()
    assert result.is_clean
    assert result.detail == "OK"


async def test_raw_eicar_in_body(address: str) -> None:
    result = await ClamdScanner(address).scan(eicar_message())
    assert result.verdict == "infected"
    assert result.symbols == (EICAR_SIGNATURE,)


async def test_empty_message_is_clean(address: str) -> None:
    result = await ClamdScanner(address).scan(b"")
    assert result.verdict == "clean"


async def test_ping_and_version(address: str) -> None:
    scanner = ClamdScanner(address, timeout=5)
    assert await scanner.ping() is True
    version = await scanner.version()
    # No official databases here, so clamd reports just "ClamAV x.y.z"
    # (with them: "ClamAV x.y.z/<db version>/<db date>").
    assert re.fullmatch(r"ClamAV \d+\.\d+\.\d+(/\d+/.+)?", version), version


async def test_max_size_skips_without_contacting_clamd(clamd_server: ClamdProcess) -> None:  # noqa: F811
    message = eicar_message()
    down = ClamdScanner(f"127.0.0.1:{closed_port()}", max_size=len(message) - 1)
    result = await down.scan(message)
    assert result.verdict == "skipped"
    assert result.is_clean
    assert str(len(message)) in result.detail
    # The same message at exactly max_size is scanned (and found).
    at_limit = ClamdScanner(clamd_server.tcp_address, max_size=len(message))
    assert (await at_limit.scan(message)).verdict == "infected"


async def test_stream_max_length_exceeded_is_an_error(small_clamd: ClamdProcess) -> None:
    scanner = ClamdScanner(small_clamd.tcp_address, max_size=100 * 1024 * 1024)
    assert (await scanner.scan(b"x" * 60_000)).verdict == "clean"
    with pytest.raises(ScannerError, match="size limit exceeded") as info:
        await scanner.scan(b"x" * 70_000)
    assert type(info.value) is ScannerError


async def test_stream_max_length_exceeded_mid_upload(small_clamd: ClamdProcess) -> None:
    # 6.7 MB against a 64 KiB limit: clamd answers and closes while we are still
    # uploading; the reply must not be lost to EPIPE/ECONNRESET.
    message = corpus("clamav__built_huge_4_attachments.eml")
    for address in (small_clamd.tcp_address, small_clamd.unix_address):
        scanner = ClamdScanner(address, max_size=len(message))
        with pytest.raises(ScannerError, match="INSTREAM size limit exceeded") as info:
            await scanner.scan(message)
        assert type(info.value) is ScannerError


# -- failures ------------------------------------------------------------------


async def test_daemon_down_tcp() -> None:
    scanner = ClamdScanner(f"127.0.0.1:{closed_port()}", timeout=5)
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        await scanner.scan(eicar_message())
    with pytest.raises(ScannerUnavailable):
        await scanner.version()
    assert await scanner.ping() is False


async def test_daemon_down_unix(tmp_path: Path) -> None:
    scanner = ClamdScanner(f"unix:{tmp_path / 'missing.sock'}", timeout=5)
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        await scanner.scan(eicar_message())


async def test_hanging_daemon_times_out(
    fake_clamd: Callable[[Handler], Awaitable[str]],
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        await asyncio.Event().wait()

    address = await fake_clamd(hang)
    scanner = ClamdScanner(address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ScannerTimeout, match="within 0.5s"):
        await scanner.scan(eicar_message())
    assert 0.4 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    assert await scanner.ping() is False
    assert time.monotonic() - started < 1.5


async def test_closed_without_reply_is_unavailable(
    fake_clamd: Callable[[Handler], Awaitable[str]],
) -> None:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\0")
        writer.close()

    scanner = ClamdScanner(await fake_clamd(close), timeout=5)
    with pytest.raises(ScannerUnavailable, match="without a reply"):
        await scanner.scan(b"hello")


async def test_garbage_reply_is_an_error(fake_clamd: Callable[[Handler], Awaitable[str]]) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\0")
        writer.write(b"what is this\0")
        writer.close()

    scanner = ClamdScanner(await fake_clamd(garbage), timeout=5)
    with pytest.raises(ScannerError, match="unexpected reply"):
        await scanner.scan(b"hello")


async def test_reply_without_eof_is_used_after_timeout(
    fake_clamd: Callable[[Handler], Awaitable[str]],
) -> None:
    async def no_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\0")
        writer.write(b"stream: Fake.Sig FOUND\0")
        await asyncio.Event().wait()

    result = await ClamdScanner(await fake_clamd(no_eof), timeout=0.3).scan(b"hello")
    assert result.verdict == "infected" and result.symbols == ("Fake.Sig",)


async def test_instream_wire_format(fake_clamd: Callable[[Handler], Awaitable[str]]) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(10) == b"zINSTREAM\0"
        while True:
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            if length == 0:
                break
            received.append(await reader.readexactly(length))
        writer.write(b"stream: OK\0")
        writer.close()

    message = bytes(range(256)) * 1000  # 256000 bytes -> 4 chunks
    result = await ClamdScanner(await fake_clamd(record), timeout=5).scan(message)
    assert result.verdict == "clean"
    assert b"".join(received) == message
    assert [len(c) for c in received] == [CHUNK_SIZE] * 3 + [len(message) - 3 * CHUNK_SIZE]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ClamdScanner("no-port")
    with pytest.raises(ValueError):
        ClamdScanner("127.0.0.1:3310", timeout=0)
    with pytest.raises(ValueError):
        ClamdScanner("127.0.0.1:3310", max_size=0)
    assert ClamdScanner("unix:/run/clamav/clamd.ctl").name == "clamav"

"""Tests for the spamd client against a real spamd (loopback) and small fake servers.

Real spamd: GTUBE, Debian's sample spam/non-spam, a clean corpus message, per-user
prefs through ``User:``, TELL learn/forget, PING/version, the Unix socket, an error
status. Fakes only for what spamd cannot be made to do: hang, answer garbage, close early.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from smtpgate.errors import ScannerError, ScannerTimeout, ScannerUnavailable
from smtpgate.scanners.base import Scanner, SpamLearner
from smtpgate.scanners.spamd import SpamdScanner, parse_reply
from tests.scanners.spamd_fixture import (  # noqa: F401  (spamd_server_fixture)
    SPAMD_TEST_RULE,
    SPAMD_TEST_RULE_SCORE,
    SPAMD_TEST_TOKEN,
    SPAMD_TEST_USER,
    SPAMD_TEST_USER_THRESHOLD,
    spamd_instance,
)
from tests.support import CORPUS  # noqa: E402

if not CORPUS.is_dir():  # CI: shared/ sits beside the clone
    CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
DEBIAN_EXAMPLES = Path("/usr/share/doc/spamassassin/examples")


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _load(corpus_name: str, *fallbacks: Path) -> bytes:
    """A corpus message (CRLF), else the first fallback file found (``.gz`` handled)."""
    candidates = [CORPUS / corpus_name, *fallbacks]
    for path in candidates:
        for p in (path, path.with_name(path.name + ".gz")):
            if p.is_file():
                data = p.read_bytes()
                return _crlf(gzip.decompress(data) if p.suffix == ".gz" else data)
    pytest.skip(f"none of {[str(c) for c in candidates]} found")


def _gtube() -> bytes:
    path = CORPUS / "rspamd__functional_messages_gtube.eml"
    if path.is_file():
        return _crlf(path.read_bytes())
    return (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: gtube\r\n\r\n"
        b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
    )


def _plain(body: str, subject: str = "Meeting notes") -> bytes:
    """A well-formed short message (scores ~0 with local rules)."""
    return (
        "From: Alice Example <alice@example.com>\r\n"
        "To: Bob Example <bob@example.com>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 06 May 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- fake servers (protocol edge cases only) ---------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[str]:
    """An asyncio server on 127.0.0.1:0 running ``handler``; yields ``"127.0.0.1:PORT"``."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for task in tasks:
            task.cancel()
        server.close()
        await server.wait_closed()


def answering(reply: bytes, seen: list[bytes] | None = None) -> Handler:
    """Handler: read the request to EOF (client half-close), record it, send ``reply``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        if seen is not None:
            seen.append(request)
        writer.write(reply)
        await writer.drain()

    return handler


async def hanging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Handler: accept, read, never answer."""
    await reader.read()
    await asyncio.sleep(3600)


async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Handler: close without a word."""
    await reader.read()


# -- real spamd: scanning ------------------------------------------------------------------


def test_implements_protocols() -> None:
    scanner = SpamdScanner("127.0.0.1:783")
    checked: Scanner = scanner
    learner: SpamLearner = scanner
    assert checked.name == "spamassassin" and checked.kind == "spam"
    assert learner is scanner


async def test_gtube_is_spam(spamd_server: str) -> None:
    result = await SpamdScanner(spamd_server).scan(_gtube())
    assert result.scanner == "spamassassin" and result.kind == "spam"
    assert result.verdict == "spam"
    assert not result.is_clean
    assert result.score is not None and result.score >= 1000
    assert result.threshold == 5.0
    assert "GTUBE" in result.symbols
    assert result.detail == f"score={result.score:g} required=5"
    assert result.elapsed > 0


async def test_debian_sample_spam(spamd_server: str) -> None:
    message = _load("debian-sa__sample-spam.eml", DEBIAN_EXAMPLES / "sample-spam.txt")
    result = await SpamdScanner(spamd_server).scan(message)
    assert result.verdict == "spam"
    assert result.score is not None and result.score >= result.threshold  # type: ignore[operator]
    assert "GTUBE" in result.symbols  # Debian's sample spam carries the GTUBE string


async def test_debian_sample_nonspam(spamd_server: str) -> None:
    message = _load("debian-sa__sample-nonspam.eml", DEBIAN_EXAMPLES / "sample-nonspam.txt")
    result = await SpamdScanner(spamd_server).scan(message)
    assert result.verdict == "clean"
    assert result.is_clean
    assert result.score is not None and result.score < 5.0
    assert "GTUBE" not in result.symbols


async def test_clean_corpus_message(spamd_server: str) -> None:
    message = _load("spamassassin__nice_mime1.eml")
    result = await SpamdScanner(spamd_server).scan(message)
    assert result.verdict == "clean"
    assert result.score is not None and result.score < 2.0
    assert result.threshold == 5.0


async def test_local_rule_symbol_and_score(spamd_server: str) -> None:
    result = await SpamdScanner(spamd_server).scan(_plain(f"see {SPAMD_TEST_TOKEN} here"))
    assert SPAMD_TEST_RULE in result.symbols
    assert result.score is not None and result.score >= SPAMD_TEST_RULE_SCORE - 0.5
    assert result.verdict == "clean"  # 3 points < 5.0


async def test_user_header_selects_user_prefs(spamd_server: str) -> None:
    message = _plain(f"see {SPAMD_TEST_TOKEN} here")
    default = await SpamdScanner(spamd_server).scan(message)
    as_alice = await SpamdScanner(spamd_server).scan(message, user=SPAMD_TEST_USER)
    by_ctor = await SpamdScanner(spamd_server, user=SPAMD_TEST_USER).scan(message)
    overridden = await SpamdScanner(spamd_server, user=SPAMD_TEST_USER).scan(
        message, user="nobody-special@example.com"
    )
    assert default.threshold == 5.0 and default.verdict == "clean"
    assert as_alice.threshold == SPAMD_TEST_USER_THRESHOLD and as_alice.verdict == "spam"
    assert by_ctor.threshold == SPAMD_TEST_USER_THRESHOLD and by_ctor.verdict == "spam"
    assert overridden.threshold == 5.0 and overridden.verdict == "clean"
    assert as_alice.score == default.score


async def test_unix_socket(spamd_server: str) -> None:
    path = spamd_instance(spamd_server).socket_path
    scanner = SpamdScanner("unix:" + path)
    result = await scanner.scan(_gtube())
    assert result.verdict == "spam" and "GTUBE" in result.symbols
    assert await scanner.ping() is True


async def test_max_size_skips_without_connecting() -> None:
    # Pointed at a closed port: any connection attempt would raise ScannerUnavailable.
    scanner = SpamdScanner(f"127.0.0.1:{_closed_port()}", max_size=100)
    result = await scanner.scan(_gtube())
    assert result.verdict == "skipped"
    assert result.detail == "message larger than max_size"
    assert result.is_clean and result.score is None


async def test_max_size_boundary_is_inclusive(spamd_server: str) -> None:
    message = _gtube()
    result = await SpamdScanner(spamd_server, max_size=len(message)).scan(message)
    assert result.verdict == "spam"


# -- real spamd: TELL, PING, version, errors -------------------------------------------------


async def test_learn_spam_ham_forget_round_trip(spamd_server: str) -> None:
    scanner = SpamdScanner(spamd_server)
    message = _plain(f"learn me {uuid.uuid4().hex}", subject="Training sample")
    assert await scanner.learn(message, True) == "DidSet: local"
    assert await scanner.learn(message, True) == "unchanged"  # already learned as spam
    assert await scanner.learn(message, None) == "DidRemove: local"
    assert await scanner.learn(message, None) == "unchanged"  # nothing left to forget
    assert await scanner.learn(message, False) == "DidSet: local"
    assert await scanner.learn(message, True) == "DidSet: local"  # relearn ham -> spam
    bayes_dir = spamd_instance(spamd_server).bayes_path.parent
    assert any(p.name.startswith("bayes_toks") for p in bayes_dir.iterdir())


async def test_learn_sends_user(spamd_server: str) -> None:
    message = _plain(f"per-user {uuid.uuid4().hex}")
    scanner = SpamdScanner(spamd_server)
    assert await scanner.learn(message, False, user=SPAMD_TEST_USER) == "DidSet: local"


async def test_ping_and_version(spamd_server: str) -> None:
    scanner = SpamdScanner(spamd_server)
    assert await scanner.ping() is True
    version = await scanner.version()
    assert version.startswith("SpamAssassin "), version
    assert version.endswith("; SPAMD/1.5"), version
    assert " on " not in version  # host name dropped
    pong = await scanner.request("PING")
    assert pong.status_line == "SPAMD/1.5 0 PONG"


async def test_error_status_raises_with_code_name(spamd_server: str) -> None:
    with pytest.raises(ScannerError, match=r"76 EX_PROTOCOL") as info:
        await SpamdScanner(spamd_server).request("BOGUS")
    assert type(info.value) is ScannerError


async def test_invalid_user_is_rejected_before_sending() -> None:
    scanner = SpamdScanner(f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ScannerError, match="invalid user name") as info:
        await scanner.scan(b"Subject: x\r\n\r\nx\r\n", user="evil\r\nRemove: local")
    assert type(info.value) is ScannerError
    with pytest.raises(ValueError):
        SpamdScanner("127.0.0.1:783", user="a\nb")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"address": "nohost"}, "host:port"),
        ({"address": "127.0.0.1:99999"}, "malformed"),
        ({"address": "127.0.0.1:783", "timeout": 0}, "timeout"),
        ({"address": "127.0.0.1:783", "max_size": 0}, "max_size"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpamdScanner(**kwargs)  # type: ignore[arg-type]


# -- failures: down, hanging, garbage ------------------------------------------------------


async def test_scanner_down_is_unavailable() -> None:
    scanner = SpamdScanner(f"127.0.0.1:{_closed_port()}", timeout=5)
    with pytest.raises(ScannerUnavailable):
        await scanner.scan(_gtube())
    with pytest.raises(ScannerUnavailable):
        await scanner.learn(_gtube(), True)
    with pytest.raises(ScannerUnavailable):
        await scanner.version()
    assert await scanner.ping() is False


async def test_missing_unix_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ScannerUnavailable):
        await SpamdScanner(f"unix:{tmp_path / 'none.sock'}").scan(b"x")


async def test_hanging_server_times_out() -> None:
    async with fake_server(hanging) as address:
        scanner = SpamdScanner(address, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ScannerTimeout, match="within 0.5s"):
            await scanner.scan(_gtube())
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 1.5
        assert await scanner.ping() is False


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
        b"garbage\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 9.0 / 5.0\r\n\r\nSHORT",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",  # no Spam: header
        b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe ; x / y\r\n\r\n",
    ],
    ids=["http", "garbage", "bad-header", "truncated", "no-spam-header", "bad-spam-header"],
)
async def test_malformed_reply_is_scanner_error(reply: bytes) -> None:
    async with fake_server(answering(reply)) as address:
        with pytest.raises(ScannerError) as info:
            await SpamdScanner(address, timeout=5).scan(_gtube())
    assert type(info.value) is ScannerError


async def test_closed_without_reply_is_unavailable() -> None:
    async with fake_server(closing) as address:
        with pytest.raises(ScannerUnavailable, match="without a reply"):
            await SpamdScanner(address, timeout=5).scan(_gtube())


async def test_request_bytes_half_close_and_lenient_symbols() -> None:
    """The exact SPAMC/1.5 request, and a SYMBOLS body with a trailing CRLF."""
    seen: list[bytes] = []
    reply = (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 18\r\nSpam: False ; -1.5 / 5.0\r\n\r\n"
        b"RULE_A, RULE_B\r\n\r\n"
    )
    async with fake_server(answering(reply, seen)) as address:
        # The fake answers only after reading EOF: this passes only if the client half-closes.
        result = await SpamdScanner(address, timeout=5, user="bob@example.com").scan(b"hello")
    assert seen == [b"SYMBOLS SPAMC/1.5\r\nContent-length: 5\r\nUser: bob@example.com\r\n\r\nhello"]
    assert result.verdict == "clean"
    assert result.score == -1.5 and result.threshold == 5.0
    assert result.symbols == ("RULE_A", "RULE_B")


async def test_tell_request_headers() -> None:
    seen: list[bytes] = []
    reply = b"SPAMD/1.1 0 EX_OK\r\nDidRemove: local\r\n\r\n"
    async with fake_server(answering(reply, seen)) as address:
        assert await SpamdScanner(address).learn(b"m", None) == "DidRemove: local"
        assert await SpamdScanner(address).learn(b"m", False, user="u") == "DidRemove: local"
    assert seen == [
        b"TELL SPAMC/1.5\r\nContent-length: 1\r\nRemove: local\r\n\r\nm",
        b"TELL SPAMC/1.5\r\nContent-length: 1\r\nUser: u\r\nMessage-class: ham\r\n"
        b"Set: local\r\n\r\nm",
    ]


def test_parse_reply_variants() -> None:
    pong = parse_reply(b"SPAMD/1.5 0 PONG\r\n")
    assert (pong.protocol, pong.code, pong.message, pong.headers, pong.body) == (
        "1.5",
        0,
        "PONG",
        {},
        b"",
    )
    lf_only = parse_reply(b"SPAMD/1.1 0 EX_OK\nSpam: True ; 6 / 5\n\nA,B")
    assert lf_only.headers == {"spam": "True ; 6 / 5"} and lf_only.body == b"A,B"
    err = parse_reply(b"SPAMD/1.0 76 Bad header line: X\r\n")
    assert (err.code, err.message) == (76, "Bad header line: X")

"""SsspScanner against the SSSP/1.0 test server (sssp_server.py), over TCP and Unix sockets.

No Sophos engine can run here; the server is written from the SSSP 1.0 description.
Covers: clean / EICAR / configured signatures, request wire format (LF), CRLF and LF
replies, OPTIONS, error DONE, REJ, hang, missing or wrong greeting, version queries.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpgate.errors import ScannerError, ScannerTimeout, ScannerUnavailable
from smtpgate.scanners.sssp import SsspScanner

from .clamd_fixture import CORPUS_DIR
from .sssp_server import EICAR, EICAR_NAME, SsspTestServer, sssp_server  # noqa: F401

CLEAN_MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


def corpus(name: str) -> bytes:
    path = CORPUS_DIR / name
    if not path.is_file():
        pytest.skip(f"corpus file {path} not available")
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture(params=["tcp", "unix"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SsspTestServer]:
    srv = SsspTestServer(signatures=[("Test-Sig-A", b"smtpgate-test-signature-A")])
    if request.param == "tcp":
        await srv.start()
    else:
        await srv.start_unix(tmp_path / "sssp.sock")
    try:
        yield srv
    finally:
        await srv.close()


async def test_clean(server: SsspTestServer) -> None:
    result = await SsspScanner(server.address, timeout=5).scan(CLEAN_MESSAGE)
    assert result.verdict == "clean", result
    assert result.scanner == "sophos" and result.kind == "virus"
    assert result.symbols == ()
    assert result.detail.startswith("0000")
    assert server.scanned == [CLEAN_MESSAGE]
    assert server.requests[:4] == [
        "SSSP/1.0 OPTIONS",
        "output:brief",
        "",
        f"SSSP/1.0 SCANDATA {len(CLEAN_MESSAGE)}",
    ]
    # BYE is sent but not waited for, so the server may or may not have read it.
    assert server.requests[4:] in ([], ["BYE"])


async def test_requests_are_lf_terminated(server: SsspTestServer) -> None:
    await SsspScanner(server.address, timeout=5).scan(CLEAN_MESSAGE)
    assert server.raw_requests[0] == b"SSSP/1.0 OPTIONS\n"
    assert all(raw.endswith(b"\n") and not raw.endswith(b"\r\n") for raw in server.raw_requests)


async def test_eicar_corpus_attachment_is_infected(server: SsspTestServer) -> None:
    message = corpus("eicar__built_attachment.eml")
    result = await SsspScanner(server.address, timeout=5).scan(message)
    assert result.verdict == "infected", result
    assert result.symbols == (EICAR_NAME,)
    assert result.detail == EICAR_NAME
    assert not result.is_clean
    assert server.scanned == [message]


async def test_configured_signature_and_eicar_both_reported(server: SsspTestServer) -> None:
    message = CLEAN_MESSAGE + b"smtpgate-test-signature-A\r\n" + EICAR + b"\r\n"
    result = await SsspScanner(server.address, timeout=5).scan(message)
    assert result.verdict == "infected"
    assert result.symbols == (EICAR_NAME, "Test-Sig-A")


async def test_clean_corpus_message(server: SsspTestServer) -> None:
    result = await SsspScanner(server.address, timeout=5).scan(
        corpus("mailpit__regular-attachment.eml")
    )
    assert result.verdict == "clean"


async def test_without_options_verbose_output_is_tolerated(sssp_server: SsspTestServer) -> None:  # noqa: F811
    scanner = SsspScanner(sssp_server.address, timeout=5, options=())
    result = await scanner.scan(corpus("eicar__built_attachment.eml"))
    assert result.verdict == "infected" and result.symbols == (EICAR_NAME,)
    assert "SSSP/1.0 OPTIONS" not in sssp_server.requests
    assert sssp_server.options == []
    assert (await scanner.scan(CLEAN_MESSAGE)).verdict == "clean"


async def test_lf_only_replies_are_tolerated() -> None:
    async with SsspTestServer(eol=b"\n", greeting=b"OK SSSP/1.0\n") as srv:
        scanner = SsspScanner(srv.address, timeout=5)
        assert (await scanner.scan(EICAR)).symbols == (EICAR_NAME,)
        assert (await scanner.scan(CLEAN_MESSAGE)).verdict == "clean"


async def test_error_done_is_a_scanner_error(sssp_server: SsspTestServer) -> None:  # noqa: F811
    sssp_server.mode = "fail"
    with pytest.raises(ScannerError, match="DONE FAIL 0212") as info:
        await SsspScanner(sssp_server.address, timeout=5).scan(CLEAN_MESSAGE)
    assert type(info.value) is ScannerError


async def test_other_done_code_is_a_scanner_error(sssp_server: SsspTestServer) -> None:  # noqa: F811
    sssp_server.mode = "fail"
    sssp_server.fail_lines = ("DONE OK 0212 Corrupt data",)
    with pytest.raises(ScannerError, match="DONE OK 0212"):
        await SsspScanner(sssp_server.address, timeout=5).scan(CLEAN_MESSAGE)


async def test_too_much_data_is_rejected(sssp_server: SsspTestServer) -> None:  # noqa: F811
    sssp_server.max_scan_data = 10
    with pytest.raises(ScannerError, match=r"REJ 4 \(SCANDATA was trying to send too much"):
        await SsspScanner(sssp_server.address, timeout=5).scan(CLEAN_MESSAGE)
    assert sssp_server.scanned == []


async def test_hang_times_out(server: SsspTestServer) -> None:
    server.mode = "hang"
    started = time.monotonic()
    with pytest.raises(ScannerTimeout, match="within 0.5s"):
        await SsspScanner(server.address, timeout=0.5).scan(CLEAN_MESSAGE)
    assert 0.4 <= time.monotonic() - started < 1.5
    assert server.scanned == [CLEAN_MESSAGE]  # it hung after receiving the data


async def test_missing_greeting_times_out() -> None:
    async with SsspTestServer(greeting=None) as srv:
        with pytest.raises(ScannerTimeout):
            await SsspScanner(srv.address, timeout=0.3).scan(CLEAN_MESSAGE)


async def test_wrong_greeting_is_a_scanner_error() -> None:
    async with SsspTestServer(greeting=b"220 mail.example.com ESMTP\r\n") as srv:
        with pytest.raises(ScannerError, match="unexpected greeting") as info:
            await SsspScanner(srv.address, timeout=5).scan(CLEAN_MESSAGE)
        assert type(info.value) is ScannerError
        assert srv.requests == []  # nothing sent after a bad greeting


async def test_closed_before_greeting_is_unavailable() -> None:
    async with SsspTestServer(mode="close") as srv:
        with pytest.raises(ScannerUnavailable, match="before the greeting"):
            await SsspScanner(srv.address, timeout=5).scan(CLEAN_MESSAGE)


async def test_bad_option_is_rejected(sssp_server: SsspTestServer) -> None:  # noqa: F811
    scanner = SsspScanner(sssp_server.address, timeout=5, options=("no-colon-here",))
    with pytest.raises(ScannerError, match="REJ 3"):
        await scanner.scan(CLEAN_MESSAGE)


async def test_version_and_query(server: SsspTestServer) -> None:
    scanner = SsspScanner(server.address, timeout=5)
    version = await scanner.version()
    assert version == (
        "SAVDI 0.0-smtpgate-test; engine 0.0.0-smtpgate-test; SAV 0.0.0-smtpgate-test; "
        "data 0.0; 1 viruses"
    )
    pairs = await scanner.query("server")
    assert ("method", "SCANDATA") in pairs and ("version", "0.0-smtpgate-test") in pairs
    assert "SSSP/1.0 QUERY ENGINE" in server.requests
    assert "SSSP/1.0 QUERY SERVER" in server.requests


async def test_unknown_query_is_rejected(sssp_server: SsspTestServer) -> None:  # noqa: F811
    with pytest.raises(ScannerError, match="REJ 1"):
        await SsspScanner(sssp_server.address, timeout=5).query("NOSUCH")


async def test_max_size_skips_without_connecting(sssp_server: SsspTestServer) -> None:  # noqa: F811
    scanner = SsspScanner(sssp_server.address, timeout=5, max_size=len(CLEAN_MESSAGE) - 1)
    result = await scanner.scan(CLEAN_MESSAGE)
    assert result.verdict == "skipped" and result.is_clean
    assert sssp_server.connections == 0


async def test_daemon_down(tmp_path: Path) -> None:
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        await SsspScanner(f"unix:{tmp_path / 'none.sock'}", timeout=5).scan(CLEAN_MESSAGE)
    srv = SsspTestServer()
    address = await srv.start()
    await srv.close()
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        await SsspScanner(address, timeout=5).version()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SsspScanner("127.0.0.1")
    with pytest.raises(ValueError):
        SsspScanner("127.0.0.1:4010", options=("a:b\nSSSP/1.0 SCANFILE /etc/passwd",))
    with pytest.raises(ValueError):
        SsspScanner("127.0.0.1:4010", timeout=-1)

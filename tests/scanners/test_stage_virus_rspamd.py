"""The scanner stage end to end with a real clamd, a real rspamd and the SSSP test server."""

from __future__ import annotations

import csv
import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import CORPUS  # noqa: E402

from .sssp_server import sssp_server  # noqa: F401

ROWS = list(csv.DictReader(open(CORPUS / "MANIFEST.tsv", newline=""), delimiter="\t"))
VIRUS_FILES = [r["file"] for r in ROWS if "virus-test" in r["notes"].split(",")]
CLEAN_FILES = [
    "spamassassin__nice_mime1.eml",
    "mailpit__mixed-attachment.eml",
    "cpython__msg_02.eml",
    "notmuch__corpora_html_embedded-image.eml",
]


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send(port: int, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        opts = ["BODY=8BITMIME"] if any(b > 127 for b in message) else []
        s.mail("sender@example.org", opts)
        s.rcpt("rcpt@example.com")
        return s.data(message)


def strip_added(head: bytes) -> bytes:
    out: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.startswith((b"X-Virus-Scanned: ", b"X-Smtpgate-Scan: ")) or (
            line.startswith(b"Received: from client.test ")
        )
        if not skipping:
            out.append(line)
    return b"\r\n".join(out)


def split(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head, body


@pytest.fixture
def clamd_gate(run_app, capture, clamd_server):  # noqa: F811
    return run_app({"scanner": [{"type": "clamav",
                                 "address": f"{clamd_server.host}:{clamd_server.port}",
                                 "max_size": 30_000_000}]}, deliver=capture)


@pytest.mark.parametrize("name", VIRUS_FILES)
def test_virus_attachments_rejected(clamd_gate, capture, name: str) -> None:
    code, text = send(clamd_gate.port, crlf((CORPUS / name).read_bytes()))
    assert code == 554, text
    assert text.startswith(b"5.7.1 Virus found: Smtpgate.Test.")
    assert capture.messages == []


@pytest.mark.parametrize("name", CLEAN_FILES)
def test_clean_corpus_delivered_unchanged_except_headers(clamd_gate, capture, name: str) -> None:
    original = crlf((CORPUS / name).read_bytes())
    code, _ = send(clamd_gate.port, original)
    assert code == 250
    delivered = capture.messages[0][1]
    head, body = split(delivered)
    ohead, obody = split(original)
    assert body == obody
    assert b"\r\nX-Virus-Scanned: ClamAV using smtpgate\r\n" in head
    assert b"\r\nX-Smtpgate-Scan: mx.test; clamav=clean\r\n" in head
    # Remove what smtpgate added; the original header section must remain, byte for byte.
    assert strip_added(head) == ohead


def test_quarantine_action(run_app, capture, clamd_server, tmp_path: Path) -> None:  # noqa: F811
    q = tmp_path / "q"
    app = run_app({"scanner": [{"type": "clamav",
                                "address": f"unix:{clamd_server.socket_path}",
                                "action": "quarantine", "quarantine_path": str(q),
                                "quarantine_reply": "reject"}]}, deliver=capture)
    code, text = send(app.port, crlf((CORPUS / "eicar__built_attachment.eml").read_bytes()))
    assert code == 554 and b"EICAR" in text
    assert capture.messages == []
    assert len(list((q / "new").iterdir())) == 1


def test_clamd_and_spamd_concurrently_in_one_pipeline(run_app, capture, clamd_server,  # noqa: F811
                                                      rspamd_server) -> None:  # noqa: F811
    app = run_app({"scanner": [
        {"type": "rspamd", "address": rspamd_server.address},
        {"type": "clamav", "address": f"{clamd_server.host}:{clamd_server.port}"},
    ]}, deliver=capture)
    code, text = send(app.port, crlf((CORPUS / "rspamd__functional_messages_gtube.eml")
                                     .read_bytes()))
    assert (code, text[:5]) == (550, b"5.7.1")
    code, _ = send(app.port, crlf((CORPUS / "rspamd__functional_messages_transactional.eml")
                                  .read_bytes()))
    assert code == 250
    head, _ = split(capture.messages[0][1])
    assert b"X-Smtpgate-Scan: mx.test; rspamd=" in head and b"clamav=clean" in head
    assert b"X-Spam-Status: " in head


async def test_sophos_sssp_in_pipeline(run_app, capture, sssp_server) -> None:  # noqa: F811
    app = run_app({"scanner": [{"type": "sophos", "address": sssp_server.address}]},
                  deliver=capture)
    eicar = crlf((CORPUS / "eicar__built_attachment.eml").read_bytes())
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await client.sendmail("a@example.org", ["b@example.com"], eicar)
    assert info.value.code == 554 and "Virus found" in info.value.message
    await client.sendmail("a@example.org", ["b@example.com"], b"Subject: ok\r\n\r\nclean\r\n")
    await client.quit()
    assert len(capture.messages) == 1
    assert b"X-Virus-Scanned: Sophos using smtpgate" in capture.messages[0][1]

"""swaks, a real SMTP test client, against embedded smtpgate delivering into a Maildir.

Entry points: ``test_swaks_*``. The Maildir ``new/`` must hold exactly one file: the bytes
swaks sent (read back from its transcript, or from a ``--data`` file we wrote) after one
prepended Received header. RFC 5321 §4.5.2 (dot-stuffing), Maildir (cr.yp.to/proto/maildir).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.app import Smtpgate

from .e2e_support import assert_one_received_then, client_wire_message, running_gate, which

SWAKS = which("swaks")
pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks not installed")


@pytest.fixture
def maildir_gate(tmp_path: Path) -> Iterator[tuple[Smtpgate, Path]]:
    """smtpgate with default settings, except a free port and Maildir delivery into tmp."""
    maildir = tmp_path / "Maildir"
    with running_gate(maildir=maildir) as app:
        yield app, maildir


def run_swaks(port: int, *args: str) -> str:
    """Run swaks against 127.0.0.1:``port``; return its transcript with LF line ends
    (swaks must exit 0)."""
    assert SWAKS is not None
    proc = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--to", "someone@example.com", *args],
        capture_output=True,
        timeout=30,
        check=False,
    )
    # swaks ends the transcript lines of what it sent with CRLF, the rest with LF.
    out = proc.stdout.decode("utf-8", "replace").replace("\r\n", "\n")
    assert proc.returncode == 0, out + proc.stderr.decode("utf-8", "replace")
    return out


def sent_data(transcript: str) -> bytes:
    """The message swaks sent, rebuilt from the `` -> `` lines between 354 and ``.``,
    dot-unstuffed, with CRLF line endings."""
    lines = transcript.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354"))
    out = []
    for line in lines[start + 1 :]:
        assert line.startswith(" -> "), line
        text = line[4:]
        if text == ".":
            break
        out.append(text[1:] if text.startswith(".") else text)
    return "".join(t + "\r\n" for t in out).encode("utf-8")


def only_message(maildir: Path) -> bytes:
    """The single file in ``new/`` (and ``tmp/`` must be empty)."""
    new = sorted((maildir / "new").iterdir())
    assert len(new) == 1, new
    assert list((maildir / "tmp").iterdir()) == []
    return new[0].read_bytes()


def test_swaks_default_message(maildir_gate: tuple[Smtpgate, Path]) -> None:
    """``swaks --server 127.0.0.1:PORT --to someone@example.com``: 250, one Maildir file
    equal to what swaks sent plus one Received header."""
    app, maildir = maildir_gate
    transcript = run_swaks(app.port)
    assert "<-  250 2.0.0" in transcript.split(" -> .\n", 1)[1], transcript
    assert "<** " not in transcript and "<~* " not in transcript, transcript
    expected = sent_data(transcript)
    assert b"This is a test mailing" in expected
    head = assert_one_received_then(only_message(maildir), expected)
    assert b"for <someone@example.com>" in head


def test_swaks_data_file(maildir_gate: tuple[Smtpgate, Path], tmp_path: Path) -> None:
    """``--data @FILE`` with LF endings, dot lines, a dot-only line and no final newline:
    swaks sends CRLF and dot-stuffs; the Maildir file is exactly that, unstuffed."""
    app, maildir = maildir_gate
    raw = (
        b"From: <sender@example.org>\nTo: <someone@example.com>\nSubject: swaks data file\n"
        b"\n.leading dot\n..two dots\n.\n. space\nbody line\n.\nlast line without newline"
    )
    data = tmp_path / "message.eml"
    data.write_bytes(raw)
    transcript = run_swaks(app.port, "--from", "sender@example.org", "--data", f"@{data}")
    assert " -> ..leading dot\n" in transcript and " -> ..\n" in transcript, transcript
    expected = client_wire_message(raw)
    assert sent_data(transcript) == expected
    assert_one_received_then(only_message(maildir), expected)

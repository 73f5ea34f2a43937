"""Issue 8, finding 9: ``smtpgate bsmtp`` reads a batch from a regular file, a pipe or a
terminal, and exits non-zero (saying why on stderr) when the batch ends inside a
transaction or a command was refused.

Real subprocesses, a Maildir in ``tmp_path`` (local delivery), replies read from stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SMTPGATE = [sys.executable, "-m", "smtpgate"]

BATCH = (b"EHLO batch.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
         b"Subject: bsmtp\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
CODES = [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]


def config(tmp_path: Path) -> Path:
    conf = tmp_path / "smtpgate.toml"
    conf.write_text('[maildir]\npath = "mail"\n')
    return conf


def final_codes(stdout: bytes) -> list[bytes]:
    return [ln[:3] for ln in stdout.split(b"\r\n") if ln[3:4] == b" "]


def stored(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "mail" / "new"
    return [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []


def run_with_file(tmp_path: Path, batch: bytes) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "batch.txt"
    path.write_bytes(batch)
    with path.open("rb") as stdin:
        return subprocess.run([*SMTPGATE, "bsmtp", "-c", str(config(tmp_path))], stdin=stdin,
                              capture_output=True, cwd=tmp_path, timeout=60)


def test_batch_from_a_regular_file(tmp_path: Path) -> None:
    """``smtpgate bsmtp < batch.txt``: the README's form (stored nothing before)."""
    out = run_with_file(tmp_path, BATCH)
    assert out.returncode == 0, out.stderr
    assert final_codes(out.stdout) == CODES
    (message,) = stored(tmp_path)
    assert message.endswith(b"Subject: bsmtp\r\n\r\n.dot\r\n")
    assert out.stderr == b""


def test_batch_file_with_lf_line_ends(tmp_path: Path) -> None:
    out = run_with_file(tmp_path, BATCH.replace(b"\r\n", b"\n"))
    assert out.returncode == 0, out.stderr
    assert final_codes(out.stdout) == CODES
    (message,) = stored(tmp_path)
    assert message.endswith(b"Subject: bsmtp\r\n\r\n.dot\r\n")


def test_batch_from_a_pipe(tmp_path: Path) -> None:
    proc = subprocess.Popen([*SMTPGATE, "bsmtp", "-c", str(config(tmp_path))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    out, err = proc.communicate(BATCH, timeout=60)
    assert proc.returncode == 0, err
    assert final_codes(out) == CODES
    assert len(stored(tmp_path)) == 1


def test_batch_from_a_terminal(tmp_path: Path) -> None:
    """Typed at a terminal (a pty here): LF line ends, the session ends at QUIT even
    though the terminal stays open."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([*SMTPGATE, "bsmtp", "-c", str(config(tmp_path))],
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=tmp_path)
        os.close(slave)
        for line in BATCH.split(b"\r\n")[:-1]:
            os.write(master, line + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert final_codes(out) == CODES
    assert len(stored(tmp_path)) == 1


def test_batch_cut_off_inside_data(tmp_path: Path) -> None:
    cut = BATCH[: BATCH.index(b"..dot")]  # no final "." and no QUIT
    out = run_with_file(tmp_path, cut)
    assert out.returncode == 1
    assert final_codes(out.stdout) == CODES[:5]  # up to 354
    assert stored(tmp_path) == []
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr.decode()
    assert lines[0] == "smtpgate: bsmtp: input ended inside DATA: that message was not delivered"


def test_batch_ending_after_mail_is_inside_a_transaction(tmp_path: Path) -> None:
    cut = BATCH[: BATCH.index(b"DATA")]
    out = run_with_file(tmp_path, cut)
    assert out.returncode == 1
    assert b"inside a transaction" in out.stderr
    assert stored(tmp_path) == []


def test_refused_command_gives_a_failure_exit(tmp_path: Path) -> None:
    batch = BATCH.replace(b"MAIL FROM:<a@example.org>", b"MAIL FROM:<no-at-sign")
    out = run_with_file(tmp_path, batch)
    assert out.returncode == 1
    codes = final_codes(out.stdout)
    assert codes[:2] == [b"220", b"250"] and codes[2][:1] == b"5"
    assert stored(tmp_path) == []
    (line,) = out.stderr.decode().splitlines()
    assert line.startswith("smtpgate: bsmtp: ") and "command(s) refused" in line
    assert "first: 5" in line or ": 5" in line


def test_batch_without_quit_outside_a_transaction_is_fine(tmp_path: Path) -> None:
    out = run_with_file(tmp_path, BATCH[: BATCH.index(b"QUIT")])
    assert out.returncode == 0, out.stderr
    assert final_codes(out.stdout) == CODES[:-1]
    assert len(stored(tmp_path)) == 1
